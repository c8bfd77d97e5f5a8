"""SentencePiece vocabularies in GGUF files (tokenizer.ggml.model = 'llama': Llama 2,
Mistral, TinyLlama, Phi-3, Gemma) encode and decode exactly as transformers' tokenizer for
the same vocabulary.

Two small SentencePiece BPE models are trained here (nothing is downloaded): one in the
Llama style (a '▁' prefix, byte fallback, chat markers as user-defined pieces) and one in
Gemma's (no prefix, turn markers, '\\n\\n' as a piece). The reference is transformers'
tokenizer built from the .model file; the GGUF metadata is written as llama.cpp's
converter writes it (pieces, scores, token types from the model, added tokens marked
user-defined or control, add_space_prefix false for Gemma).
"""

from __future__ import annotations

import json
import random

import pytest

spm = pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf")  # transformers reads the .model's normalizer with it
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from kvformer.errors import CheckpointError  # noqa: E402
from kvformer.formats.tokenizer.tokenizer import Tokenizer  # noqa: E402

WORDS = ("the quick brown fox jumps over lazy dog hello world transformer attention cache "
         "token model python code def return import class self print value key query "
         "naïve café über straße 東京 日本語 привет мир 123 4567 89 emoji 😀 ok").split()
STYLES = {
    "llama": dict(add_dummy_prefix=True, user_defined_symbols=["<|user|>", "<|end|>"]),
    "gemma": dict(add_dummy_prefix=False,
                  user_defined_symbols=["<start_of_turn>", "<end_of_turn>", "\n\n"]),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """style -> (transformers tokenizer, GGUF-style metadata)."""
    root = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
                                for _ in range(2000)), encoding="utf-8")
    out = {}
    for style, options in STYLES.items():
        prefix = root / style
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(prefix), vocab_size=420, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
            pad_id=-1, remove_extra_whitespaces=False, split_digits=True,
            normalization_rule_name="identity", minloglevel=2, **options)
        folder = root / f"{style}-hf"
        folder.mkdir()
        (folder / "tokenizer.model").write_bytes(prefix.with_suffix(".model").read_bytes())
        cls = "LlamaTokenizer" if style == "llama" else "GemmaTokenizer"
        (folder / "tokenizer_config.json").write_text(json.dumps(dict(
            tokenizer_class=cls, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
            add_bos_token=True, add_eos_token=False, legacy=True)))
        hf = transformers.AutoTokenizer.from_pretrained(str(folder))
        out[style] = (hf, _gguf_metadata(prefix.with_suffix(".model"), hf, style))
    return out


def _gguf_metadata(model_file, hf, style: str) -> dict:
    """tokenizer.* keys as llama.cpp's converter writes them from tokenizer.model plus the
    added tokens transformers lists (user-defined, or control when special)."""
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        kind = (2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 5 if sp.IsUnused(i)
                else 6 if sp.IsByte(i) else 1)
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        types.append(kind)
    for token_id, added in sorted(hf.added_tokens_decoder.items()):
        while token_id >= len(tokens):
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(-10000.0)
            types.append(5)
        tokens[token_id], scores[token_id] = added.content, -1000.0
        types[token_id] = 3 if added.special else 4
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False}
    if style == "gemma":
        meta["tokenizer.ggml.add_space_prefix"] = False
    return meta


def _strings() -> list[str]:
    """More than 200 strings: prose, code, Unicode, emoji, runs of spaces, numbers, chat
    markup, edges."""
    fixed = [
        "", " ", "  ", "\n", "\n\n\n", "\t", " leading", "trailing ", "  two  spaces  ",
        "Hello world", "hello, World!", "The quick brown fox.", "naïve café über straße",
        "東京は日本語", "привет, мир", "مرحبا بالعالم", "😀", "👩‍💻 codes", "🇫🇷 flag", "a😀b",
        "0", "1234567890", "3.14159", "-42", "1e-5", "1,000,000", "x = y + 2 * z",
        "def f(x):\n    return x ** 2\n", "import torch\nprint(torch.__version__)",
        "for (int i = 0; i < n; i++) { sum += a[i]; }", "<html><body>hi</body></html>",
        "{\"key\": [1, 2, 3], \"v\": null}", "C:\\path\\to\\file.txt", "~/.cache/kv",
        "<|user|>\nWhat is 2 + 2?<|end|>\n<|assistant|>", "<|user|>hi<|end|>",
        "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n",
        "<s>bos in text</s>", "<unk>", "text <|end|> more", "\n\nparagraph\n\nbreak",
        "tabs\tand\tspaces", "mixed 東京 and english", "ÀÉÎÕÜ àéîõü", "Ωμέγα", "ß ẞ",
        "zero\u200bwidth", "nbsp\u00a0here", "line\r\nbreak", "   \n   ", "end.",
    ]
    rng = random.Random(42)
    pieces = WORDS + ["<|user|>", "<|end|>", "<start_of_turn>", "<end_of_turn>", "\n", "\n\n",
                      "  ", "   ", "\t", "!", "?", ".", ",", "(", ")", "{", "}", "🚀", "ü",
                      "99", "2024", "_", "-", "'s", "don't"]
    generated = []
    for _ in range(220):
        n = rng.randint(1, 10)
        generated.append("".join(rng.choice(pieces) + rng.choice(["", " ", " ", "  "])
                                 for _ in range(n)))
    return fixed + generated


STRINGS = _strings()


@pytest.mark.parametrize("style", list(STYLES))
def test_encode_and_decode_equal_transformers(models, style):
    hf, meta = models[style]
    ours = Tokenizer.from_gguf(meta)
    assert len(STRINGS) >= 200
    for text in STRINGS:
        want = hf.encode(text, add_special_tokens=False)
        got = ours.encode(text, add_special_tokens=False)
        assert got == want, (text, ours.backend.encode(text, add_special_tokens=False).tokens,
                             hf.convert_ids_to_tokens(want))
        if not text.startswith("<s>"):  # kvformer does not double a BOS the text has
            assert ours.encode(text) == hf.encode(text), text  # BOS as transformers adds it
        assert ours.decode(got) == hf.decode(want), text
        assert ours.decode(got, skip_special_tokens=True) == \
            hf.decode(want, skip_special_tokens=True), text


def test_byte_fallback_and_streaming(models):
    hf, meta = models["llama"]
    ours = Tokenizer.from_gguf(meta)
    ids = ours.encode("a🦀b", add_special_tokens=False)  # not in the training text
    spelled = [ours.id_to_token(i) for i in ids]
    at = spelled.index("<0xF0>")
    assert spelled[at:at + 4] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"]  # its UTF-8 bytes
    stream = ours.stream_decoder()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == ours.decode(ids) == "a🦀b"
    assert pieces[at:at + 3] == ["", "", ""]  # the crab waits for its last byte


def test_spm_options_kvformer_does_not_implement_are_refused(models):
    _, meta = models["llama"]
    for key, value in (("tokenizer.ggml.remove_extra_whitespaces", True),
                       ("tokenizer.ggml.precompiled_charsmap", [1, 2, 3])):
        with pytest.raises(CheckpointError, match=key.rsplit(".", 1)[1]):
            Tokenizer.from_gguf({**meta, key: value})
    with pytest.raises(CheckpointError, match="'ugm'"):
        Tokenizer.from_gguf({**meta, "tokenizer.ggml.model": "ugm"})


# Templates in the form these models ship (Gemma's turns and role check; Phi-3's markers).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first = messages[0]['content'] + '\\n\\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/...') }}"
    "{% endif %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}"
    "{% else %}{{ eos_token }}{% endif %}")


@pytest.mark.parametrize("style, template", [("gemma", GEMMA_TEMPLATE),
                                             ("llama", PHI3_TEMPLATE)])
def test_chat_templates_render_in_the_sandbox_as_transformers_does(models, style, template):
    from kvformer.errors import ChatTemplateError

    hf, meta = models[style]
    ours = Tokenizer.from_gguf({**meta, "tokenizer.chat_template": template})
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2 + 2? 東京 😀"},
                {"role": "assistant", "content": " 4 "},
                {"role": "user", "content": "And 3 + 3?"}]
    text = ours.apply_chat_template(messages, add_generation_prompt=True)
    want = hf.apply_chat_template(messages, chat_template=template, tokenize=False,
                                  add_generation_prompt=True)
    assert text == want
    assert ours.encode(text, add_special_tokens=False) == hf.encode(text,
                                                                    add_special_tokens=False)
    if style == "gemma":
        with pytest.raises(ChatTemplateError, match="alternate"):
            ours.apply_chat_template([messages[1], messages[1]])  # user twice
