"""The OpenAI Chat Completions wire format: request and response schemas, the error envelope,
the mapping from OpenAI messages to CogVLM's query, history and image, and from the engine's
events to a completion or its stream of chunks.

Fields OpenAI clients do not know (`boxes`, `repetition_penalty`, `top_k`, `template_version`)
are extras that those clients ignore or never send.
"""

from __future__ import annotations

import json
import logging
from contextlib import aclosing
from dataclasses import dataclass
from typing import Annotated, Any, AsyncGenerator, AsyncIterator, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from ..errors import SettingsError
from ..generation import GenerationConfig
from ..grounding import parse_boxes
from .engine import Event, Job

log = logging.getLogger("cogvlm.serve")


class APIError(Exception):
    """An error for the client: an HTTP status and OpenAI's envelope. The message is written
    by this package, never taken from another exception."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- requests --------------------------------------------------------------------------------


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class ImageURL(_Schema):
    url: str
    detail: Literal["auto", "low", "high"] = "auto"


class TextPart(_Schema):
    type: Literal["text"]
    text: str


class ImagePart(_Schema):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Schema):
    """A turn; CogVLM has no system prompt, so only user and assistant turns are accepted."""

    role: Literal["user", "assistant"]
    content: Union[str, list[ContentPart]]
    name: str | None = None


class StreamOptions(_Schema):
    include_usage: bool = False


class ChatCompletionRequest(_Schema):
    """The OpenAI request body, plus the official CogVLM demo's `repetition_penalty`."""

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="0 or absent: greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    n: int | None = Field(None, ge=1, le=1)
    stop: Union[str, list[str], None] = Field(None, max_length=4)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    template_version: Literal["base", "chat", "vqa"] | None = Field(
        None, description="CogVLM prompt template (default: the model's)"
    )


@dataclass(frozen=True)
class Conversation:
    """What CogVLM takes: the last question, the (question, answer) pairs before it, one image."""

    query: str
    history: list[tuple[str, str]]
    image_url: str | None


def to_conversation(messages: list[Message]) -> Conversation:
    """Map OpenAI turns to CogVLM's: user and assistant alternate, the last is the user's.

    Images may be in any user turn; CogVLM puts its one image before the whole conversation,
    so the same URL repeated counts once and two different images are refused."""
    roles = [m.role for m in messages]
    if roles[-1] != "user" or any(r == roles[i - 1] for i, r in enumerate(roles) if i):
        raise APIError(
            400, "messages must alternate user and assistant turns and end with a user turn", param="messages"
        )
    texts, urls = [], []
    for i, message in enumerate(messages):
        parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        images = [p.image_url.url for p in parts if isinstance(p, ImagePart)]
        if images and message.role != "user":
            raise APIError(400, "images are accepted in user messages only", param=f"messages.{i}.content")
        urls += [u for u in images if u not in urls]
        texts.append(" ".join(p.text for p in parts if isinstance(p, TextPart)))
    if len(urls) > 1:
        raise APIError(
            400, f"{len(urls)} different images given; CogVLM takes one image per conversation", param="messages"
        )
    history = list(zip(texts[:-1:2], texts[1:-1:2]))
    return Conversation(query=texts[-1], history=history, image_url=urls[0] if urls else None)


def generation_config(
    request: ChatCompletionRequest, prompt_tokens: int, context: int, default_max_tokens: int | None
) -> GenerationConfig:
    """Decoding settings of a request; temperature absent or 0 means greedy, as the official
    demo (temperature <= 1e-5); no max_tokens means up to the default, or the context's end.
    Raises APIError 400 when the answer cannot fit the context."""
    wanted = request.max_completion_tokens or request.max_tokens
    max_new = wanted or min(default_max_tokens or context, context - prompt_tokens)
    if max_new < 1 or prompt_tokens + max_new > context:
        asked = (
            f"{prompt_tokens + wanted} tokens ({prompt_tokens} in the messages, image included, "
            f"{wanted} in the completion)"
            if wanted
            else f"{prompt_tokens} tokens in the messages"
        )
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens. "
            f"However, you requested {asked}. Please reduce the length of the messages "
            "or completion.",
            param="messages",
            code="context_length_exceeded",
        )
    sampling = request.temperature is not None and request.temperature > 1e-5
    stop = request.stop if isinstance(request.stop, list) else [request.stop] if request.stop else []
    settings = {
        "max_new_tokens": max_new,
        "do_sample": sampling,
        "seed": request.seed,
        "stop": tuple(stop),
        "temperature": request.temperature if sampling else None,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "repetition_penalty": request.repetition_penalty,
    }
    try:
        return GenerationConfig(**{k: v for k, v in settings.items() if v is not None})
    except SettingsError as e:  # our own one-line messages (ranges), safe to show
        raise APIError(400, str(e)) from None


# ---- responses -------------------------------------------------------------------------------


def _optional(default: Any = None, description: str | None = None) -> Any:
    """A field left out of the JSON while it is None (extras and optional deltas)."""
    return Field(default, description=description, exclude_if=lambda v: v is None)


class Box(BaseModel):
    """A grounding box: the phrase, xyxy relative to the image (0-1), and in pixels."""

    label: str
    box: list[float]
    pixels: list[int] | None = _optional(description="xyxy in pixels of the image, when there is one")


class Usage(BaseModel):
    """Tokens; prompt_tokens counts the image's tokens, which are part of CogVLM's sequence."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None
    boxes: list[Box] | None = _optional(description="grounding boxes in the answer (extra field)")


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = _optional()
    content: str | None = _optional()
    boxes: list[Box] | None = _optional(description="grounding boxes, in the last chunk (extra field)")


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed answer (`data: {...}`; the stream ends with
    `data: [DONE]`). The last chunk with choices carries finish_reason, and boxes if any."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = _optional()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "cogvlm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def sse(data: BaseModel | dict[str, Any] | str) -> str:
    """One server-sent event line pair."""
    if isinstance(data, BaseModel):
        data = data.model_dump_json()
    elif isinstance(data, dict):
        data = json.dumps(data, ensure_ascii=False)
    return f"data: {data}\n\n"


@dataclass
class Reply:
    """Builds one request's answer from its events: a ChatCompletion, or SSE chunks."""

    id: str
    created: int
    model: str
    job: Job
    image_size: tuple[int, int] | None
    timeout_s: float

    def usage(self) -> Usage:
        done = len(self.job.tokens)
        return Usage(
            prompt_tokens=self.job.prompt_tokens, completion_tokens=done, total_tokens=self.job.prompt_tokens + done
        )

    def boxes(self, text: str) -> list[Box] | None:
        size = self.image_size or (None, None)
        return [Box(**b.to_dict(*size)) for b in parse_boxes(text)] or None

    def error(self, event: Event) -> APIError:
        if event.error == "timeout":
            return APIError(
                504,
                f"the answer took longer than this server's limit of {self.timeout_s:g} s",
                type="server_error",
                code="timeout",
            )
        if event.error == "shutdown":
            return APIError(503, "the server is shutting down", type="server_error", code="shutdown")
        if event.error == "out_of_memory":  # this request's alone: the others go on, memory comes back
            return APIError(
                503,
                "the server ran out of memory for this request; retry later",
                type="server_error",
                code="out_of_memory",
                headers={"Retry-After": "1"},
            )
        if event.error == "non_finite":  # the model's numbers for this answer went NaN or inf
            return APIError(
                500, "internal error while generating the answer", type="server_error", code="internal_error"
            )
        return APIError(500, "internal error while generating the answer", type="server_error")

    async def complete(self, events: AsyncGenerator[Event, None]) -> ChatCompletion | None:
        """The whole answer, or None when the client left before it was done."""
        text = ""
        async with aclosing(events):  # returning early still closes the event source
            async for event in events:
                if event.kind == "text":
                    text += event.text
                elif event.kind == "done":
                    message = AssistantMessage(content=text, boxes=self.boxes(text))
                    return ChatCompletion(
                        id=self.id,
                        created=self.created,
                        model=self.model,
                        usage=self.usage(),
                        choices=[Choice(message=message, finish_reason=event.finish_reason)],
                    )
                elif event.kind == "error":
                    raise self.error(event)
        return None

    def chunk(self, delta: Delta, finish_reason: str | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)],
        )

    async def stream(self, events: AsyncGenerator[Event, None], include_usage: bool) -> AsyncIterator[str]:
        """SSE: a role chunk, text chunks, a last chunk with finish_reason (and boxes), the usage
        chunk when asked, then [DONE]. An error after the headers is an error event, then [DONE]."""
        yield sse(self.chunk(Delta(role="assistant", content="")))
        text = ""
        try:
            async for event in events:
                if event.kind == "text":
                    text += event.text
                    yield sse(self.chunk(Delta(content=event.text)))
                elif event.kind == "done":
                    yield sse(self.chunk(Delta(boxes=self.boxes(text)), event.finish_reason))
                    if include_usage:
                        yield sse(
                            ChatCompletionChunk(
                                id=self.id, created=self.created, model=self.model, choices=[], usage=self.usage()
                            )
                        )
                elif event.kind == "error":
                    error = self.error(event)
                    log.error("request %s: %s", self.job.request_id, error.message)
                    yield sse(error.body())
                else:
                    return
        except Exception:
            log.exception("request %s: streaming failed", self.job.request_id)
            yield sse(APIError(500, "internal error", type="server_error").body())
        yield "data: [DONE]\n\n"
