"""The HTTP server: OpenAI-compatible routes over the engine, the web page, and the guards
around them (API key, body size, request ids, errors in OpenAI's envelope)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
import uuid
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncGenerator, AsyncIterator, Callable

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware import Middleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import PromptError
from ..pipeline import Pipeline
from .engine import Engine, EngineSettings, Event, Job, QueueFull
from .media import MediaPolicy, fetch_image
from .protocol import (
    APIError,
    ChatCompletion,
    ChatCompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    Reply,
    generation_config,
    to_conversation,
)

log = logging.getLogger("cogvlm.serve")
STATIC = Path(__file__).parent / "static"
#: Paths anyone may read without the API key; everything else needs it (deny by default).
OPEN_PATHS = ("/", "/health")
OPEN_PREFIXES = ("/static/",)


@dataclass(frozen=True)
class ServeSettings:
    """Everything the server is configured with, apart from where it listens."""

    model_names: tuple[str, ...] = ("cogvlm", "cogvlm-chat-17b")  # the first is the main id
    api_key: str | None = None
    max_body_bytes: int = 20 * 2**20
    default_max_tokens: int | None = None  # None: up to the context length
    engine: EngineSettings = field(default_factory=EngineSettings)
    media: MediaPolicy = field(default_factory=MediaPolicy)


class ServerState:
    """The pipeline and engine once loaded; 'loading', 'ready' or 'failed'."""

    def __init__(self, source: Pipeline | Callable[[], Pipeline], settings: ServeSettings) -> None:
        self.source, self.settings = source, settings
        self.status, self.engine, self.pipeline = "loading", None, None
        self.created = int(time.time())

    def start(self) -> None:
        if callable(self.source):
            threading.Thread(target=self._load, name="cogvlm-load", daemon=True).start()
        else:
            self._load()

    def _load(self) -> None:
        try:
            pipeline = self.source() if callable(self.source) else self.source
            self.engine = Engine(pipeline, self.settings.engine).start()
            self.pipeline, self.status = pipeline, "ready"
        except Exception:
            log.exception("loading the model failed")
            self.status = "failed"

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.close()

    def ready(self) -> tuple[Pipeline, Engine]:
        if self.status != "ready":
            message = "the model is still loading" if self.status == "loading" else "the model failed to load"
            raise APIError(503, message, type="server_error", code=f"model_{self.status}", headers={"Retry-After": "5"})
        return self.pipeline, self.engine


def create_app(source: Pipeline | Callable[[], Pipeline], settings: ServeSettings | None = None) -> FastAPI:
    """The server app around a loaded Pipeline, or around a loader that is called in the
    background at startup (GET /health answers 503 until it returns)."""
    settings = settings or ServeSettings()
    state = ServerState(source, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start()
        yield
        state.stop()

    guards = [
        Middleware(RequestContext),
        Middleware(ApiKeyAuth, key=settings.api_key),
        Middleware(BodyLimit, limit=settings.max_body_bytes),
    ]
    app = FastAPI(title="cogvlm", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None, middleware=guards)
    _add_error_handlers(app, settings)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    errors = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 429, 500, 503, 504)}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health", responses={503: {"description": "loading, or the model failed to load"}})
    async def health() -> JSONResponse:
        stats = state.engine.stats() if state.engine else {}
        return JSONResponse({"status": state.status, **stats}, status_code=200 if state.status == "ready" else 503)

    @app.get("/v1/models", response_model=ModelList, responses=errors)
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=state.created) for name in settings.model_names])

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses=errors)
    async def get_model(model_id: str) -> ModelCard:
        _check_model(model_id, settings)
        return ModelCard(id=model_id, created=state.created)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={**errors, 200: {"content": {"text/event-stream": {}}}},
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        pipeline, engine = state.ready()
        _check_model(body.model, settings)
        conversation = to_conversation(body.messages)
        image = await fetch_image(conversation.image_url, settings.media) if conversation.image_url else None
        try:
            sample = await asyncio.to_thread(
                pipeline.build, conversation.query, image, conversation.history, body.template_version
            )
        except PromptError as e:  # this package's one-line messages
            raise APIError(400, str(e), param="messages") from None
        config = generation_config(body, len(sample["input_ids"]), pipeline.context_length, settings.default_max_tokens)
        request_id = request.state.request_id
        try:
            job = engine.submit(sample, config, request_id)
        except QueueFull:
            raise APIError(
                429,
                "the server is busy: every slot and the queue are full; retry later",
                type="rate_limit_exceeded",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        reply = Reply(
            f"chatcmpl-{request_id}",
            int(time.time()),
            body.model,
            job,
            image.size if image else None,
            settings.engine.timeout_s,
        )
        events = _events(job, engine, request)
        if body.stream:
            # The headers wait for the first event, so a request that fails before its first
            # token (out of memory in its prefill, out of time in the queue) gets its own status.
            first = await anext(events, None)
            if first is None or first.kind not in ("text", "done"):
                await events.aclose()
                if first is not None and first.kind == "error":
                    raise reply.error(first)
                return Response(status_code=499)  # the client left
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                reply.stream(_prepend(first, events), include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await reply.complete(events) or Response(status_code=499)  # 499: the client left

    return app


def _check_model(name: str, settings: ServeSettings) -> None:
    if name not in settings.model_names:
        raise APIError(
            404,
            f"The model '{name[:100]}' does not exist; this server has {', '.join(settings.model_names)}",
            param="model",
            code="model_not_found",
        )


async def _events(job: Job, engine: Engine, request: Request) -> AsyncGenerator[Event, None]:
    """The job's events until it ends; a client that disconnects cancels it (and ends this)."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        engine.cancel(job)
        job.events.put_nowait(Event("cancelled"))

    watcher = asyncio.create_task(watch())
    try:
        while True:
            event = await job.events.get()
            yield event
            if event.kind != "text":
                return
    finally:
        watcher.cancel()
        engine.cancel(job)


async def _prepend(first: Event, events: AsyncGenerator[Event, None]) -> AsyncGenerator[Event, None]:
    """`first`, then the rest of `events` (closed when this generator is)."""
    async with aclosing(events):
        yield first
        async for event in events:
            yield event


# ---- guards and errors ---------------------------------------------------------------------


class RequestContext:
    """Gives each request an id (X-Request-Id, and in the completion id), logs every 5xx with
    it, and answers an unexpected exception with a generic 500 envelope, never its text."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message).append("x-request-id", request_id)
                if message["status"] >= 500:
                    log.error(
                        "request %s: %s %s answered %d", request_id, scope["method"], scope["path"], message["status"]
                    )
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s: %s %s failed", request_id, scope["method"], scope["path"])
            if started:
                raise
            error = APIError(500, "internal error", type="server_error")
            await JSONResponse(error.body(), status_code=500)(scope, receive, send_with_id)


class ApiKeyAuth:
    """With a key, every path but OPEN_PATHS needs `Authorization: Bearer KEY` (constant-time)."""

    def __init__(self, app: Any, key: str | None) -> None:
        self.app, self.key = app, key.encode() if key else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and self.key and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
                error = APIError(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer KEY'",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                return await _error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for a body over the limit: before reading when Content-Length says so, else while
    reading (raised as FastAPI's HTTPException, which its body parsing passes on)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            return await _error_response(_too_large(self.limit))(scope, receive, send)
        total = 0

        async def limited() -> dict:
            nonlocal total
            message = await receive()
            total += len(message.get("body", b""))
            if total > self.limit:
                raise HTTPException(413)
            return message

        await self.app(scope, limited, send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over this server's limit of {limit} bytes", code="request_too_large")


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _add_error_handlers(app: FastAPI, settings: ServeSettings) -> None:
    """Every error in OpenAI's envelope; FastAPI's 422 becomes 400, as OpenAI answers."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            return _error_response(APIError(400, "the request body is not valid JSON"))
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        message = f"{param}: {first['msg']}" if param else f"the request body must be a JSON object ({first['msg']})"
        return _error_response(APIError(400, message[:300], param=param))

    texts = {404: "no such route", 405: "method not allowed on this route"}

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 413:
            return _error_response(_too_large(settings.max_body_bytes))
        message = texts.get(exc.status_code, "the request could not be handled")
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        return _error_response(APIError(exc.status_code, message, type=kind, headers=exc.headers))
