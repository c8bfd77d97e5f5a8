"""SentencePiece vocabularies in GGUF files (tokenizer.ggml.model = 'llama': Llama 2,
Mistral, TinyLlama, Phi-3, Gemma) encode and decode as transformers' tokenizer for the same
vocabulary, except where transformers and llama.cpp disagree: there kvformer is llama.cpp
(tests/test_tokenizer_llama_cpp.py) and, on text without added tokens, SentencePiece itself.

Two small SentencePiece BPE models are trained (tests/tokenizer_vocabs.py; nothing is
downloaded): one in the Llama style (a '▁' prefix, byte fallback, chat markers as
user-defined pieces) and one in Gemma's (no prefix, turn markers, '\\n\\n' as a piece). The
reference is transformers' tokenizer built from the .model file; the GGUF metadata is written
as llama.cpp's converter writes it from the model and transformers' added tokens (pieces,
scores, token types from the model, added tokens marked user-defined or control,
add_space_prefix false for Gemma).
"""

from __future__ import annotations

import json

import pytest

spm = pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf")  # transformers reads the .model's normalizer with it
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from tokenizer_vocabs import STYLES, strings, train_spm  # noqa: E402

from kvformer.errors import CheckpointError  # noqa: E402
from kvformer.formats.tokenizer.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """style -> (transformers tokenizer, GGUF-style metadata, sentencepiece processor)."""
    root = tmp_path_factory.mktemp("spm")
    out = {}
    for style in STYLES:
        model = train_spm(style, root)
        folder = root / f"{style}-hf"
        folder.mkdir()
        (folder / "tokenizer.model").write_bytes(model.read_bytes())
        cls = "LlamaTokenizer" if style == "llama" else "GemmaTokenizer"
        (folder / "tokenizer_config.json").write_text(json.dumps(dict(
            tokenizer_class=cls, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
            add_bos_token=True, add_eos_token=False, legacy=True)))
        hf = transformers.AutoTokenizer.from_pretrained(str(folder))
        out[style] = (hf, _gguf_metadata(model, hf, style),
                      spm.SentencePieceProcessor(model_file=str(model)))
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


STRINGS = strings()


def _pieces(text: str, added: list[str]) -> list[str]:
    """The stretches of text between the added tokens written in it."""
    pieces, rest = [], text
    while rest:
        at = [(rest.find(a), -len(a), a) for a in added if a in rest]
        if not at:
            break
        start, _, token = min(at)
        pieces.append(rest[:start])
        rest = rest[start + len(token):]
    return [p for p in [*pieces, rest] if p]


# Where transformers and llama.cpp differ. (1) The '▁' prefix (Llama style): llama.cpp, like
# SentencePiece, writes " " + text for the text and for each stretch after an added token;
# transformers' Metaspace pre-tokenizer skips the prefix when the stretch already starts with
# a space or '▁', so "  leading spaces", " ", "<|end|> x" or "▁x" get one '▁' fewer there.
# On such text kvformer is llama.cpp (and SentencePiece itself, when no added token is written
# in the text). (2) llama.cpp makes every end-of-generation marker a control token whatever
# the file says (here <|end|> and <end_of_turn>, user-defined in these files), so
# skip_special_tokens drops them where transformers keeps them.
PROMOTED = ("<|end|>", "<end_of_turn>")


def _prefix_differs(text: str, style: str, added: list[str]) -> bool:
    return style == "llama" and any(p[0] in " ▁" for p in _pieces(text, added))


@pytest.mark.parametrize("style", list(STYLES))
def test_encode_and_decode_equal_transformers(models, style):
    hf, meta, sp = models[style]
    ours = Tokenizer.from_gguf(meta)
    added = [t.content for t in ours.backend.get_added_tokens_decoder().values()]
    promoted = {ours.token_to_id(t) for t in PROMOTED} - {None}
    assert len(STRINGS) >= 200
    differing = 0
    for text in STRINGS:
        want = hf.encode(text, add_special_tokens=False)
        got = ours.encode(text, add_special_tokens=False)
        if _prefix_differs(text, style, added):
            differing += 1
            assert got != want, text  # (so that the rule above stays exact)
            if not any(a in text for a in added):
                assert got == sp.encode(text), text
        else:
            assert got == want, (text, ours.backend.encode(text, add_special_tokens=False).tokens,
                                 hf.convert_ids_to_tokens(want))
            if not text.startswith("<s>"):  # kvformer does not double a BOS the text has
                assert ours.encode(text) == hf.encode(text), text  # BOS as transformers adds it
        assert ours.decode(want) == hf.decode(want), text
        kept = [i for i in want if i not in promoted]
        assert ours.decode(want, skip_special_tokens=True) == \
            hf.decode(kept, skip_special_tokens=True), text
    assert (differing > 0) == (style == "llama")


def test_byte_fallback_and_streaming(models):
    hf, meta, _ = models["llama"]
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
    _, meta, _ = models["llama"]
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

    hf, meta, _ = models[style]
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
    else:
        # A control token's spelling typed in a message stays text, and the stretch of text
        # between the template's tokens is encoded whole: one '▁' prefix after <|user|>, as
        # llama.cpp gives that stretch with no special token parsed.
        typed = [{"role": "user", "content": "hi <s> there </s>"}]
        ids = ours.encode_chat(typed)
        user, end = ours.token_to_id("<|user|>"), ours.token_to_id("<|end|>")
        assert ids[:ids.index(end) + 1] == \
            [user, *ours.encode_plain("\nhi <s> there </s>"), end]
        assert [i for i in ids if i in ours.special_ids] == [end]
