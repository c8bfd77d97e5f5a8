"""SentencePiece BPE from GGUF metadata (tokenizer.ggml.model 'llama') as a `tokenizers` backend.

Also home to the GGUF token-type codes, which `tokenizer` reads for byte-level vocabularies too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers

from kvformer.errors import CheckpointError

# GGUF token types (llama.cpp's llama_token_type, the sentencepiece model's too): 1 normal,
# 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte (<0xNN>, SentencePiece's byte fallback).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6

# Tokens llama.cpp makes control tokens whatever type the file gives them, because they end a
# generation (its list of end-of-generation markers).
_LLAMA_CPP_CONTROL_NAMES = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
))


def _added_tokens(tokens: list[str], types: list[int]) -> list[tuple[int, str, bool]]:
    """(id, text, special) of each token matched as a whole in the text before the rest is
    tokenized, as llama.cpp matches them: control and unknown tokens (special: `encode_plain`
    and `skip_special_tokens` leave them out) and user-defined ones (ordinary text). Like
    llama.cpp, a token named as an end-of-generation marker is a control token whatever its
    type in the file."""
    added = []
    for index, (token, kind) in enumerate(zip(tokens, types)):
        if token in _LLAMA_CPP_CONTROL_NAMES:
            kind = _CONTROL
        if kind in (_CONTROL, _UNKNOWN, _USER_DEFINED):
            added.append((index, token, kind != _USER_DEFINED))
    return added


def _sentencepiece_backend(meta: Mapping[str, Any], where: str) -> tokenizers.Tokenizer:
    """A SentencePiece BPE vocabulary (tokenizer.ggml.model = 'llama': Llama 2, Mistral,
    TinyLlama, Phi-3, Gemma) as a `tokenizers` BPE.

    SentencePiece merges the adjacent pair whose merged piece scores highest; the merges
    are therefore every split of a piece into two pieces of the vocabulary, ranked by the
    merged piece's score (then its id, then the left part's length). Spaces are '▁'; with
    tokenizer.ggml.add_space_prefix (the default, Gemma's files say false) a '▁' also
    starts the text and every stretch of text after an added token, even one that starts
    with a space, as llama.cpp and SentencePiece do (transformers' Metaspace skips it there).
    Characters outside the vocabulary become their UTF-8 bytes (<0xNN> pieces). Control and
    unknown pieces are special tokens, user-defined ones tokens matched as a whole in the
    text (`_added_tokens`).
    """
    tokens = meta.get("tokenizer.ggml.tokens")
    scores = meta.get("tokenizer.ggml.scores")
    if not tokens or scores is None:
        raise CheckpointError(f"{where}: the SentencePiece tokenizer has no "
                              f"{'tokens' if not tokens else 'scores'}; the file is incomplete")
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if not len(tokens) == len(types) == len(scores):
        raise CheckpointError(f"{where}: {len(tokens)} tokens, {len(types)} token types and "
                              f"{len(scores)} scores; the file is corrupt")
    if meta.get("tokenizer.ggml.remove_extra_whitespaces"):
        raise CheckpointError(f"{where}: tokenizer.ggml.remove_extra_whitespaces is set, a "
                              "SentencePiece normalization kvformer does not implement; load "
                              "the model's tokenizer.json with Tokenizer.from_dir instead")
    if meta.get("tokenizer.ggml.precompiled_charsmap"):
        raise CheckpointError(f"{where}: tokenizer.ggml.precompiled_charsmap is set (a "
                              "SentencePiece normalizer kvformer does not implement); load the "
                              "model's tokenizer.json with Tokenizer.from_dir instead")
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise CheckpointError(f"{where}: the vocabulary has duplicate tokens; the file is corrupt")
    unk = next((t for t, kind in zip(tokens, types) if kind == _UNKNOWN), None)
    ranked = []
    for merged, score in zip(tokens, scores):
        index = vocab[merged]
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, index, cut, left, right))
    ranked.sort()
    backend = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=[(left, right) for *_, left, right in ranked], unk_token=unk,
        fuse_unk=True, byte_fallback=any(kind == _BYTE for kind in types)))
    # Spaces become '▁' and, with the prefix, a '▁' starts every stretch of text: the whole
    # text and each piece after an added token (the normalizer sees each piece on its own).
    # Unlike Metaspace's prepend_scheme, the '▁' is added even when the piece already starts
    # with a space or '▁': llama.cpp writes " " + text, as SentencePiece's dummy prefix does.
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    space = normalizers.Replace(" ", "▁")
    backend.normalizer = (normalizers.Sequence([normalizers.Prepend("▁"), space]) if prefix
                          else space)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    added = [AddedToken(t, special=special, normalized=False)
             for _, t, special in _added_tokens(tokens, types)]
    backend.add_special_tokens([t for t in added if t.special])
    backend.add_tokens([t for t in added if not t.special])
    return backend
