"""``POST /v1/embeddings``: one vector per input, in OpenAI's format.

The pooling: the mean over the input's tokens of the last hidden states after the final
norm (``Transformer.hidden_states``, what the LM head reads), L2-normalized, in float32.
kvformer's models declare no pooling of their own (a GGUF that names one is refused at
load), so this is always the pooling. Each input runs alone (one forward of B=1 on the
engine thread, between two steps of the running sequences), so its vector does not depend
on the other inputs of the request: batched and alone, the vectors are the same bits.

Inputs are a string, a list of strings, a list of token ids or a list of such lists;
strings are tokenized as completions' prompts are (with the tokenizer's special tokens).
``encoding_format`` ``"float"`` (lists of numbers) or ``"base64"`` (the float32 bytes,
little-endian, as OpenAI sends them). ``dimensions`` is refused (400) unless it is the
model's width: cutting a vector short only keeps its meaning for models trained for it.
"""

from __future__ import annotations

import asyncio
import base64
import sys

import numpy as np
import torch
from fastapi import Request

from kvformer.serve.routes import Server, encode_text
from kvformer.serve.scheduler import EngineClosedError, QueueFullError
from kvformer.serve.schemas import APIError, EmbeddingRequest, parse_body
from kvformer.serve.streaming import engine_error

MAX_INPUTS = 2048  # OpenAI's limit of inputs per request


def pooled(model, ids: list[int]) -> torch.Tensor:
    """The embedding of one input: mean of the final-norm hidden states, L2-normalized
    (float32, [d_model]). Engine thread only."""
    hidden = model.hidden_states(torch.tensor([ids], device=model.device))[0].float()
    return torch.nn.functional.normalize(hidden.mean(dim=0), dim=0).cpu()


async def embeddings(srv: Server, request: Request) -> dict:
    """POST /v1/embeddings."""
    srv.check_auth(request)
    req: EmbeddingRequest = parse_body(EmbeddingRequest, await srv.read_json(request))
    srv.check_model(req.model)
    fmt = req.encoding_format or "float"
    if fmt not in ("float", "base64"):
        raise APIError(400, f"encoding_format={fmt!r} is invalid: use 'float' or 'base64'",
                       param="encoding_format", code="invalid_value")
    width = srv.engine.model.cfg.d_model
    if req.dimensions is not None and req.dimensions != width:
        raise APIError(400, f"dimensions={req.dimensions} is not supported: this model's "
                            f"embeddings have {width} dimensions (leave dimensions out)",
                       param="dimensions", code="unsupported_value")
    inputs = await asyncio.to_thread(token_inputs, srv, req.input)
    model = srv.engine.model
    futures = []
    try:
        if not srv.engine.alive:  # nobody would run the jobs
            raise EngineClosedError("the engine has stopped")
        for ids in inputs:
            futures.append(srv.engine.call(lambda ids=ids: pooled(model, ids)))
    except (EngineClosedError, QueueFullError) as exc:
        for f in futures:
            f.cancel()  # those not started yet are skipped
        raise engine_error(exc, srv.retry_after) from None
    vectors = [await asyncio.wrap_future(f) for f in futures]
    data = [{"object": "embedding", "index": i, "embedding": encode(v, fmt)}
            for i, v in enumerate(vectors)]
    n = sum(len(ids) for ids in inputs)
    return {"object": "list", "data": data, "model": srv.model_name,
            "usage": {"prompt_tokens": n, "total_tokens": n}}


def token_inputs(srv: Server, given) -> list[list[int]]:
    """The request's inputs as token ids, each checked (on a worker thread: tokenizing a
    batch takes a while)."""
    if isinstance(given, str) or (given and isinstance(given[0], int)):
        given = [given]
    if not given:
        raise APIError(400, "input is empty: give a string, a list of strings or token ids",
                       param="input", code="invalid_value")
    if len(given) > MAX_INPUTS:
        raise APIError(400, f"input has {len(given)} items; at most {MAX_INPUTS} per request",
                       param="input", code="invalid_value")
    vocab, limit = srv.engine.model.cfg.vocab_size, srv.engine.max_seq_len
    out = []
    for i, item in enumerate(given):
        param = f"input[{i}]"
        if isinstance(item, str):
            if srv.tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send token ids",
                               param=param)
            if not item:
                raise APIError(400, f"{param} is an empty string", param=param,
                               code="invalid_value")
            ids = encode_text(srv, item, param)
        else:
            ids = list(item)
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"{param} has token ids outside [0, {vocab}): {bad[:5]}",
                               param=param, code="invalid_value")
        if not ids:
            raise APIError(400, f"{param} has no tokens", param=param, code="invalid_value")
        if len(ids) > limit:
            raise APIError(400, f"{param} has {len(ids)} tokens; this model's maximum "
                                f"context length is {limit}", param=param,
                           code="context_length_exceeded")
        out.append(ids)
    return out


def encode(vector: torch.Tensor, fmt: str) -> list[float] | str:
    values = vector.numpy().astype(np.float32)
    if fmt == "float":
        return values.tolist()
    if sys.byteorder != "little":
        values = values.byteswap()
    return base64.b64encode(values.tobytes()).decode("ascii")
