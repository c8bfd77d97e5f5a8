"""Fixed English texts the benchmarks measure perplexity on (written for kvformer)."""

# About 645 tokens for SmolLM2's tokenizer: `kvformer bench` cuts its prompts from it and
# measures perplexity on it.
ENGLISH = """\
The history of the printing press begins in the middle of the fifteenth century, when \
Johannes Gutenberg, a goldsmith from Mainz, combined several existing technologies into a \
single practical system. Movable type had been used in East Asia for centuries, but the \
large number of characters in Chinese writing made it difficult to scale. In Europe, the \
Latin alphabet required only a few dozen letters, numerals and marks of punctuation, so a \
printer could cast thousands of small metal pieces and arrange them again and again. \
Gutenberg developed an alloy of lead, tin and antimony that melted at a low temperature and \
cooled quickly into durable letters. He adapted the screw press that farmers used to make \
wine and olive oil, and he mixed an oil-based ink that stuck to metal better than the \
water-based inks used by scribes.

The results spread with remarkable speed. Within fifty years of the first printed Bible, \
presses were operating in more than two hundred cities across the continent, and millions \
of books had been produced. The price of a book fell sharply, and reading ceased to be a \
privilege of monasteries, universities and wealthy households. Merchants printed price lists \
and calendars; governments printed laws and proclamations; scholars exchanged corrected \
editions of ancient texts and argued about them in pamphlets. Historians still debate how \
much the press caused the great changes of the following centuries and how much it simply \
accelerated them, but few doubt that the reformation of the church, the growth of modern \
science and the rise of newspapers would have looked very different without it.

Printing also changed the way people thought about language itself. Because a printer \
wanted to sell the same book in many towns, spelling and grammar slowly became more uniform, \
and regional dialects gave way to standard written forms. Dictionaries and grammars \
appeared, teachers used the same textbooks in different schools, and the idea of a correct \
way to write became widespread. At the same time, the sheer quantity of printed material \
created new problems. Readers complained that there were too many books to read, and \
librarians invented catalogues, indexes and systems of classification to help them find \
what they needed.

Today the digital screen has replaced paper for many purposes, yet the basic questions \
raised by the printing press remain familiar. Who controls what is published? How can \
readers tell reliable information from rumor? What happens to a culture when the cost of \
copying a text falls almost to zero? The answers are still being worked out, and they will \
shape the way the next generation learns, argues and remembers.

The workshops themselves were noisy, crowded places. An apprentice might spend years \
learning to set type by hand, picking each letter from a wooden case and placing it upside \
down and backwards in a small frame, line after line, until a page was complete. Another \
worker inked the forme with leather balls stuffed with wool, a third pulled the heavy bar \
of the press, and the damp sheets were hung on lines across the room to dry. Mistakes were \
common, and careful printers hired correctors who read every proof against the manuscript. \
A busy shop could print more than a thousand sheets in a day, a number that no monastery \
full of scribes could have matched in a month.
"""

# More of the same story, so that ENGLISH + MORE_ENGLISH is over 1,000 tokens: the KV-cache
# comparison (kvformer.tools.bench.kv) measures perplexity on the two together.
MORE_ENGLISH = """\
Paper mattered as much as metal. Early European printers bought their sheets from mills \
that beat old linen rags into a pulp, lifted a thin layer of it from a vat on a fine wire \
screen, and pressed and dried each sheet by hand. Rags were never plentiful, and as the \
demand for books grew, the price of paper became the largest cost of an edition. A printer \
who misjudged how many copies would sell could be ruined by a warehouse of unsold pages, \
so many editions were small, and popular titles were printed again only when the first run \
had gone.

The trade also travelled along the roads of commerce. Fairs in Frankfurt and Leipzig \
became markets where printers, booksellers and authors met twice a year to exchange \
stock, settle debts and announce new titles. Catalogues listing the books offered at each \
fair were printed and sold in their turn, and they give historians a record of what people \
wanted to read: sermons and schoolbooks, almanacs and herbals, travel stories, music, and \
a steady stream of practical manuals on arithmetic, surveying and medicine.

Not everyone welcomed the flood. Rulers worried about pamphlets that mocked them, and \
churches worried about opinions they considered dangerous. Licences, lists of forbidden \
books and official censors appeared within a few decades of the first presses. Printers \
answered by moving across borders, by printing without their names, or by inventing false \
places of publication on their title pages. The struggle between the wish to control \
what is printed and the ease of printing it anyway has continued ever since, and each new \
technology of copying has revived it in a new form.

By the end of the eighteenth century, iron presses replaced wooden ones, and in the \
nineteenth century steam power, cylinders and machines that made paper from wood pulp \
multiplied the output of a single shop many times over. Newspapers could then be printed \
overnight in hundreds of thousands of copies, and cheap novels were sold at railway \
stations to travellers who wanted something to read on the journey. Each of these steps \
made printed words cheaper and more common, until they became so ordinary that most people \
stopped noticing them at all.
"""
