"""Tokenizer vocabularies of every kind kvformer reads from GGUF, written into small GGUF
files llama.cpp can load, and a battery of strings to encode with them.

Used by tests/test_tokenizer_llama_cpp.py (kvformer against llama.cpp), by
tests/test_tokenizer_spm.py (the SentencePiece models) and by
tests/data/record_llama_cpp_ids.py (which records llama.cpp's ids for machines without it).

Kinds (`KINDS`):
- spm-llama, spm-gemma: SentencePiece BPE models trained here (nothing is downloaded) in the
  Llama style (a '▁' prefix, byte fallback, chat markers as user-defined pieces) and Gemma's
  (no prefix, turn markers, '\\n\\n' as a piece); the GGUF metadata is what llama.cpp's
  converter writes for them (`spm_metadata`).
- bpe-<pre>: the default model's byte-level BPE vocabulary (SmolLM2) under each
  tokenizer.ggml.pre that kvformer implements and llama.cpp knows by that name.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np

# ---- SentencePiece models ---------------------------------------------------------------------

WORDS = ("the quick brown fox jumps over lazy dog hello world transformer attention cache "
         "token model python code def return import class self print value key query "
         "naïve café über straße 東京 日本語 привет мир 123 4567 89 emoji 😀 ok").split()
STYLES = {
    "llama": dict(add_dummy_prefix=True, user_defined_symbols=["<|user|>", "<|end|>"]),
    "gemma": dict(add_dummy_prefix=False,
                  user_defined_symbols=["<start_of_turn>", "<end_of_turn>", "\n\n"]),
}
# The trainer's settings; sentencepiece trains the same model from the same corpus and settings
# (tests/test_tokenizer_llama_cpp.py checks the vocabulary against the recorded fingerprint).
TRAINER = dict(vocab_size=420, model_type="bpe", byte_fallback=True, character_coverage=1.0,
               unk_id=0, bos_id=1, eos_id=2, pad_id=-1, remove_extra_whitespaces=False,
               split_digits=True, normalization_rule_name="identity", minloglevel=2,
               num_threads=1)


def corpus() -> str:
    """The training text: 2000 lines of random WORDS (seeded)."""
    rng = random.Random(0)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
                     for _ in range(2000))


def train_spm(style: str, root: Path) -> Path:
    """Train the style's SentencePiece model under root; returns the .model file."""
    import sentencepiece as spm

    root.mkdir(parents=True, exist_ok=True)
    text = root / "corpus.txt"
    if not text.exists():
        text.write_text(corpus(), encoding="utf-8")
    prefix = root / style
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(prefix),
                                   **TRAINER, **STYLES[style])
    return prefix.with_suffix(".model")


def spm_metadata(model_file: Path, style: str) -> dict:
    """tokenizer.* keys as llama.cpp's converter writes them for the model: pieces, scores and
    types from the .model (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte), the
    special and user-defined pieces scored -1000. The Gemma style is written as from a
    tokenizer_config.json that lists <unk> as a special token (type control) and says
    add_space_prefix false; the Llama style's <unk> keeps the type unknown, as a file
    converted from tokenizer.model alone has it."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    user_defined = set(STYLES[style]["user_defined_symbols"])
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        piece = sp.IdToPiece(i)
        kind = (2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 5 if sp.IsUnused(i)
                else 6 if sp.IsByte(i) else 4 if piece in user_defined else 1)
        if kind in (2, 3, 4):
            scores.append(-1000.0)
            types.append(3 if kind == 2 and style == "gemma" else kind)
        else:
            scores.append(sp.GetScore(i))
            types.append(kind)
        tokens.append(piece)
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False}
    if style == "gemma":
        meta["tokenizer.ggml.add_space_prefix"] = False
    return meta


# ---- byte-level BPE ---------------------------------------------------------------------------

# One tokenizer.ggml.pre per family of split that kvformer implements (the name llama.cpp
# knows it by); `byte_level_aliases` gives the family's other names.
BYTE_LEVEL_PRES = ("smollm", "gpt-2", "llama-bpe", "qwen2", "default")
KINDS = ("spm-llama", "spm-gemma", *(f"bpe-{pre}" for pre in BYTE_LEVEL_PRES))
# A file with no tokenizer.ggml.pre: llama.cpp's 'default' split.
NO_PRE = "(none)"


def byte_level_aliases() -> dict[str, str]:
    """Every other tokenizer.ggml.pre kvformer reads -> the one of BYTE_LEVEL_PRES it
    splits as; 'gpt2' is left out (kvformer's own name for 'gpt-2': llama.cpp refuses it) and
    NO_PRE stands for a file without the key."""
    from kvformer.formats.tokenizer.tokenizer import _PRE_TOKENIZER_FAMILIES

    aliases = {NO_PRE: "default"}
    for names, *_ in _PRE_TOKENIZER_FAMILIES:
        (representative,) = [n for n in names if n in BYTE_LEVEL_PRES]
        aliases.update((n, representative) for n in names
                       if n not in (representative, "gpt2"))
    return aliases


def byte_level_metadata(pre: str) -> dict | None:
    """The default model's tokenizer (SmolLM2's byte-level BPE, 49152 tokens) with
    tokenizer.ggml.pre = pre (none for NO_PRE); None when the default model is not
    installed."""
    from kvformer.formats.gguf.reader import read_metadata
    from kvformer.formats.load import default_model_path

    try:
        path = default_model_path()
    except Exception:  # noqa: BLE001 - the default model is not installed
        return None
    meta = {k: v for k, v in read_metadata(path).items()
            if k.startswith("tokenizer.ggml.") and k != "tokenizer.ggml.pre"}
    if pre != NO_PRE:
        meta["tokenizer.ggml.pre"] = pre
    return meta


def metadata(kind: str, root: Path) -> dict | None:
    """The GGUF tokenizer metadata of a kind (SentencePiece models are trained under root);
    None when it cannot be made here."""
    if kind.startswith("spm-"):
        style = kind[4:]
        return spm_metadata(train_spm(style, root / "spm"), style)
    return byte_level_metadata(kind[4:])


def fingerprint(meta: dict) -> str:
    """A hash of everything in the metadata that decides the ids."""
    keys = sorted(k for k in meta if k.startswith("tokenizer.ggml."))
    blob = json.dumps([[k, meta[k]] for k in keys], ensure_ascii=False, default=list)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def llama_cpp_ids(path: Path, texts: list[str], special: bool = True) -> list[list[int]]:
    """llama.cpp's ids of each text with the GGUF file's vocabulary (no BOS added): special
    True parses control and user-defined tokens written in the text (kvformer's `encode`),
    False only user-defined ones (kvformer's `encode_plain`)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return [llm.tokenize(t.encode("utf-8"), add_bos=False, special=special) for t in texts]
    finally:
        llm.close()


def write_gguf(path: Path, meta: dict, name: str = "tokenizer-test") -> Path:
    """A llama GGUF with the tokenizer metadata, the hyperparameters llama.cpp wants before
    it reads a vocabulary, and tiny random F32 tensors (enough for vocab_only loading)."""
    import gguf

    d, ff, n_head = 8, 16, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_block_count(1)
    w.add_feed_forward_length(ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(meta["tokenizer.ggml.tokens"]))
    for key, value in meta.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif key == "tokenizer.ggml.scores":
            w.add_array(key, [float(x) for x in value])
        else:
            w.add_array(key, list(value))
    rng = np.random.default_rng(0)
    vocab = len(meta["tokenizer.ggml.tokens"])
    shapes = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,),
              "blk.0.attn_norm.weight": (d,), "blk.0.ffn_norm.weight": (d,),
              "blk.0.attn_q.weight": (d, d), "blk.0.attn_k.weight": (d, d),
              "blk.0.attn_v.weight": (d, d), "blk.0.attn_output.weight": (d, d),
              "blk.0.ffn_gate.weight": (ff, d), "blk.0.ffn_up.weight": (ff, d),
              "blk.0.ffn_down.weight": (d, ff)}
    for tensor, shape in shapes.items():
        w.add_tensor(tensor, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- strings ----------------------------------------------------------------------------------

def strings() -> list[str]:
    """Over 300 strings: whitespace at the edges and in runs, tabs, newlines and '\\r\\n',
    many scripts, combining marks, emoji (ZWJ sequences, flags, skin tones), numbers, code,
    URLs, chat markers real and fake, the empty string; then random mixtures of them."""
    fixed = [
        # whitespace
        "", " ", "  ", "   ", "\n", "\n\n", "\n\n\n", "\t", "\t\t", "\r\n", "\r", " \n ",
        " leading", "  leading spaces and   runs", "   three", "trailing ", "trailing   ",
        "  two  spaces  ", "   \n   ", "a\nb", "a\n\nb", "a \n b", "line\r\nbreak\r\n",
        "tabs\tand\tspaces", "\tindented", "    four", "x\u00a0y", "nbsp\u00a0here", "\u3000wide",
        "em\u2003space", "\u2028sep", "\x0bvt\x0cff", "\x85next", "zero\u200bwidth",
        "▁", "▁▁x", "a▁b", " ▁ ", "a\x1cb", "\x1d\x1e\x1f", "\x00", "a\x00b",
        # prose and scripts
        "Hello world", "hello, World!", "The quick brown fox.", "end.", "I'm sure you'll "
        "see WE'RE here, don't", "naïve café über straße", "ÀÉÎÕÜ àéîõü", "Ωμέγα", "ß ẞ",
        "東京は日本語", "中文字符测试", "한국어 텍스트", "привет, мир", "مرحبا بالعالم",
        "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก", "Γειά σου Κόσμε", "ქართული",
        "e\u0301 combining", "a\u0308\u0301", "ñ vs n\u0303", "Z\u0351\u0334a\u0360lgo",
        "mixed 東京 and english", "ｆｕｌｌｗｉｄｔｈ", "ﬁ ligature",
        # emoji
        "😀", "a😀b", "😀😀😀", "👩‍💻 codes", "👨‍👩‍👧‍👦", "🇫🇷 flag", "🇯🇵🇺🇸", "👍🏽",
        "❤️", "🦀 crab", "🏳️‍🌈",
        # numbers
        "0", "42", "1234567890", "12345678901234567890", "3.14159", "-42", "1e-5",
        "1,000,000", "2024-01-31", "0x1F", "v1.2.3", "٣٤٥ arabic digits", "①②③", "½ ²",
        "€100 and ¥5", "©®™",
        # code and urls
        "x = y + 2 * z", "def f(x):\n    return x ** 2\n", "import torch\nprint(torch.__version__)",
        "for (int i = 0; i < n; i++) { sum += a[i]; }", "<html><body>hi</body></html>",
        "{\"key\": [1, 2, 3], \"v\": null}", "C:\\path\\to\\file.txt", "~/.cache/kv",
        "https://example.com/path?q=1&r=two#frag", "user@example.org", "a->b && c || !d",
        "    if x:\n        pass\n", "$HOME/bin:$PATH", "SELECT * FROM t WHERE id=1;",
        "`code` foo_bar-baz", "x^2~y|z <= 3",
        # chat markers, real and fake
        "<|user|>\nWhat is 2 + 2?<|end|>\n<|assistant|>", "<|user|>hi<|end|>",
        "<|user|> hi <|end|>", "<|end|>  two spaces", "<|end|>\nnewline",
        "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n",
        "<start_of_turn> spaced<end_of_turn>", "<|im_start|>user\nhi<|im_end|>\n",
        "<|im_start|>assistant", "<|endoftext|>", "text<|endoftext|>more",
        "<|im_start|> x<|im_end|>", "<s>bos in text</s>", "<s> a", "</s>", "<unk>", "<unk> x",
        "text <|end|> more", "<|im_start", "<|", "|>", "<||>", "<| end |>", "<<|end|>>",
        "<|fake_marker|>", "[INST] hi [/INST]", "<<SYS>>\nsys\n<</SYS>>",
        # misc punctuation
        "...", "!!!", "???", "—–-", "«quotes» “curly” ‘single’", "¿Qué? ¡Sí!",
        "\n\nparagraph\n\nbreak", "a  b   c    d", "end with newline\n", "\n\n\nx",
    ]
    rng = random.Random(42)
    pieces = WORDS + ["<|user|>", "<|end|>", "<start_of_turn>", "<end_of_turn>",
                      "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "\n", "\n\n",
                      "  ", "   ", "\t", "\r\n", "!", "?", ".", ",", "(", ")", "{", "}", "🚀",
                      "ü", "99", "2024", "_", "-", "'s", "don't", "👩‍💻", "🇫🇷", "e\u0301",
                      "한국", "नम", "▁"]
    generated = []
    for _ in range(240):
        n = rng.randint(1, 10)
        generated.append("".join(rng.choice(pieces) + rng.choice(["", " ", " ", "  ", "\n"])
                                 for _ in range(n)))
    return list(dict.fromkeys(fixed + generated))
