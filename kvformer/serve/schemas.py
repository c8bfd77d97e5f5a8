"""The API's request bodies (pydantic models of OpenAI's JSON) and its error answers.

Bodies are strict (``"5"`` is not an integer) and keep unknown fields, so that each field
of OpenAI's schema can be honoured, refused, or accepted as a label on purpose (see
``routes``). ``APIError`` is every error the API answers: OpenAI's body, ``{"error":
{"message", "type", "param", "code"}}``, with an HTTP status.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class _Body(BaseModel):
    # strict: "5" is not an integer and 1.5 is not one either. Unknown fields are kept
    # (``model_extra``): the routes refuse those of OpenAI's schema that would change the
    # output (``REFUSED``) and ignore the rest.
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Body):
    include_usage: bool | None = None


class _Common(_Body):
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (llama.cpp, vLLM); -1 means off
    min_p: float | None = None  # extension
    repetition_penalty: float | None = None  # extension
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None  # extension: keep going past the end-of-text token
    best_of: int | None = None
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}}
    response_format: dict[str, Any] | None = None
    user: str | None = None  # the labels: accepted, change nothing
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class FunctionCall(_Body):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Body):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's result: which call it answers
    name: str | None = None


class FunctionDef(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of the arguments
    strict: bool | None = None  # the arguments always follow it when the grammar applies


class ToolDef(_Body):
    type: str = "function"
    function: FunctionDef


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[ToolDef] | None = None
    tool_choice: str | dict[str, Any] | None = None  # none | auto | required | a function
    parallel_tool_calls: bool | None = None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class EmbeddingRequest(_Body):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: str | None = None  # "float" (default) | "base64"
    dimensions: int | None = None
    user: str | None = None


class ResponsesRequest(_Body):
    """OpenAI's Responses API (``/v1/responses``)."""

    model: str | None = None
    input: str | list[dict[str, Any]]  # messages, function_call, function_call_output
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None  # {"type": "function", "name", "parameters"}
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None  # {"format": {"type": "json_schema", ...}}
    previous_response_id: str | None = None
    stream: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None  # the labels: accepted, change nothing
    user: str | None = None
    truncation: str | None = None
    include: list[str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class AnthropicMessage(_Body):
    role: str
    content: str | list[dict[str, Any]]  # text, tool_use and tool_result blocks


class AnthropicRequest(_Body):
    """Anthropic's Messages API (``/v1/messages``)."""

    model: str | None = None
    max_tokens: int
    messages: list[AnthropicMessage]
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None  # {"format": {"type": "json_schema", ...}}
    metadata: dict[str, Any] | None = None  # labels: accepted, change nothing
    service_tier: str | None = None


def parse_body(cls: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got "
                            f"{type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ""
        for part in err["loc"]:  # ('messages', 0, 'role'); union members show up as 'str'
            if isinstance(part, int):
                param += f"[{part}]"
            elif part.isidentifier() and part not in ("str", "int", "float", "bool"):
                param += f".{part}" if param else part
        param = param or None
        raise APIError(422, f"{param or 'body'}: {err['msg']}"
                            + (f" (got {err['input']!r})" if "input" in err
                               and not isinstance(err["input"], (dict, list)) else ""),
                       param=param, code="invalid_type") from None
