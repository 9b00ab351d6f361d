"""The HTTP side: routes, the API key check, the body limit, loading, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import SafeLlavaError, first_line
from ..generate import Answer
from .media import MediaPolicy, fetch_image
from .protocol import (
    ApiError,
    ChatRequest,
    bad_request,
    chunk,
    completion,
    completion_id,
    event,
    parse_chat_request,
    usage,
)
from .worker import END, Job, Worker

ORIGINAL_SUFFIX = "-original-tower"  # compare mode: the same model through the checkpoint's own tower


@dataclass(frozen=True)
class ServerSettings:
    """How the server answers: its name for the model, its limits and its openings."""

    served_model_name: str
    api_key: str | None = None  # None: no key asked (only sensible on 127.0.0.1)
    max_body_bytes: int = 20 * 2**20
    max_queue: int = 64
    max_batch: int = 8
    batch_wait_s: float = 0.005
    media: MediaPolicy = field(default_factory=MediaPolicy)
    compare: bool = False  # also serve the checkpoint's own tower, as <name>-original-tower
    ping_interval_s: float = 15.0  # a comment line on a stream that has been quiet this long
    shutdown_timeout_s: float = 4.0  # for requests to finish, then for the worker: 10 s at most in all


class ServerState:
    """The model once loaded, its worker, or why loading failed."""

    def __init__(self) -> None:
        self.loaded: Any = None
        self.worker: Worker | None = None
        self.error: str | None = None
        self.ready = threading.Event()

    def begin_shutdown(self) -> None:
        """Stop taking requests, refuse those waiting and stop the running stream (SIGTERM)."""
        if self.worker is not None:
            self.worker.begin_close()


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


class KeyCheck:
    """ASGI middleware: ``Authorization: Bearer <key>`` on every route but the health probe and the page."""

    OPEN = frozenset({("GET", "/health"), ("HEAD", "/health"), ("GET", "/"), ("HEAD", "/")})

    def __init__(self, app: Any, key: str | None):
        self.app = app
        self.key = key.encode() if key else None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.key is None or (scope["method"], scope["path"]) in self.OPEN:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        token = header[7:].strip() if header[:7].lower() == b"bearer " else b""
        if hmac.compare_digest(token, self.key):
            await self.app(scope, receive, send)
            return
        error = ApiError(401, "a valid API key is needed: Authorization: Bearer <key>", "authentication_error",
                         code="invalid_api_key")  # fmt: skip
        await _error_response(error)(scope, receive, send)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to be over ``limit`` bytes."""
    too_large = ApiError(
        413, f"the request body is over {limit // 2**20} MiB (--max-body-mb)", code="request_too_large"
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_large
        parts.append(part)
    return b"".join(parts)


def create_app(
    load_model: Callable[[], Any],
    settings: ServerSettings,
    state: ServerState | None = None,
    on_load_failure: Callable[[str], None] | None = None,
) -> Starlette:
    """The server app; ``load_model`` runs in a thread after start-up, while ``/health`` says 503.

    ``on_load_failure`` hears why loading failed (the command stops then); without it the server
    stays up and says so on every route.
    """
    state = state or ServerState()
    names = {settings.served_model_name: "safe"}
    if settings.compare:
        names[settings.served_model_name + ORIGINAL_SUFFIX] = "original"

    def load() -> None:
        try:
            loaded = load_model()
            variants = None
            if settings.compare:
                from ..compare import TowerComparer, swapped_tower

                comparer = TowerComparer(loaded)
                original = comparer.original_tower

                def variants(name: str) -> Any:
                    return swapped_tower(loaded, original) if name == "original" else contextlib.nullcontext()

            worker = Worker(loaded, settings.max_queue, settings.max_batch, settings.batch_wait_s, variants)
            worker.start()
            state.loaded, state.worker = loaded, worker
        except SafeLlavaError as exc:
            state.error = first_line(exc)
        except Exception as exc:  # reported on /health, not a traceback in a thread
            state.error = f"{type(exc).__name__}: {first_line(exc)}"
        finally:
            state.ready.set()
        if state.error is not None and on_load_failure is not None:
            on_load_failure(state.error)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        threading.Thread(target=load, name="safellava-load", daemon=True).start()
        yield
        state.begin_shutdown()
        if state.worker is not None:
            await run_in_threadpool(state.worker.close, settings.shutdown_timeout_s)

    def available() -> Worker:
        if state.error is not None:
            raise ApiError(
                503, f"the model could not be loaded: {state.error}", "server_error", code="load_failed"
            )
        if state.worker is None:
            raise ApiError(503, "the model is still loading", "server_error", code="loading", retry_after=5)
        return state.worker

    async def health(request: Request) -> Response:
        if state.error is not None:
            return JSONResponse({"status": "error", "message": state.error}, status_code=503)
        if state.worker is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse({"status": "ok"})

    async def models(request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": 0, "owned_by": "safellava"} for name in names
                ],
            }
        )

    async def page(request: Request) -> Response:
        return HTMLResponse(
            resources.files(__package__).joinpath("playground.html").read_text(encoding="utf-8")
        )

    def prepare(request: ChatRequest, variant: str, loop: asyncio.AbstractEventLoop) -> Job:
        engine = state.loaded.engine
        image = fetch_image(request.image_url, settings.media) if request.image_url else None
        try:
            prompt = engine.render(request.turns)
            inputs = engine.prepare([image] if image is not None else [], [prompt])
        except (SafeLlavaError, ValueError) as exc:  # the request's text, not the server
            raise bad_request(first_line(exc), "messages") from None
        try:
            options = engine.fit(inputs, request.options)
        except SafeLlavaError as exc:
            raise bad_request(first_line(exc), "messages", "context_length_exceeded") from None
        return Job(inputs, image, prompt, options, variant, loop, stream=request.stream)

    async def chat_completions(request: Request) -> Response:
        worker = available()
        body = await read_body(request, settings.max_body_bytes)
        parsed = parse_chat_request(body, state.loaded.generation)
        variant = names.get(parsed.model)
        if variant is None:
            raise ApiError(404, f"the model {parsed.model!r} does not exist: use {', '.join(names)}", param="model",
                           code="model_not_found")  # fmt: skip
        loop = asyncio.get_running_loop()
        job = await run_in_threadpool(prepare, parsed, variant, loop)
        if parsed.stream:
            job.chunks = asyncio.Queue()
            worker.submit(job)
            return StreamingResponse(
                _events(job, parsed, settings),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        job.future = loop.create_future()
        worker.submit(job)
        answer: Answer = await job.future
        counts = usage(answer.prompt_tokens, answer.completion_tokens)
        return JSONResponse(
            completion(completion_id(), parsed.model, answer.text, answer.finish_reason, counts)
        )

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return _error_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found" if exc.status_code == 404 else "method_not_allowed"
        return _error_response(
            ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=kind)
        )

    async def internal_error(request: Request, exc: Exception) -> Response:
        return _error_response(ApiError(500, f"internal error: {type(exc).__name__}", "server_error"))

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/", page, methods=["GET"]),
        ],
        exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )
    app.add_middleware(KeyCheck, key=settings.api_key)
    app.state.safellava = state
    return app


async def _events(job: Job, request: ChatRequest, settings: ServerSettings) -> AsyncIterator[str]:
    """The server-sent events of a streamed answer; leaving early (a client gone) stops generation."""
    assert job.chunks is not None
    ident = completion_id()
    final: Answer | None = None
    try:
        yield chunk(ident, request.model, {"role": "assistant", "content": ""})
        while True:
            try:
                item = await asyncio.wait_for(job.chunks.get(), timeout=settings.ping_interval_s)
            except asyncio.TimeoutError:
                yield ": ping\n\n"
                continue
            if item is END:
                break
            if isinstance(item, ApiError):
                yield event(item.body())
            elif isinstance(item, Answer):
                final = item
            else:
                yield chunk(ident, request.model, {"content": item})
        if final is not None:
            yield chunk(ident, request.model, {}, final.finish_reason)
            if request.include_usage:
                yield chunk(
                    ident, request.model, None, counts=usage(final.prompt_tokens, final.completion_tokens)
                )
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # no-op once the answer is complete; stops generating when the client left
