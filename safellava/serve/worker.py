"""The one model behind the server: a worker thread fed by a bounded queue.

Requests are prepared (image decoded, prompt rendered and tokenized, checked against the context) in
the handlers' threads; the worker only generates. Greedy non-streaming requests with the same
settings that arrive within ``batch_wait_s`` of each other go into one ``generate`` call (answers
equal the unbatched ones); a streaming request runs alone, chunk by chunk, and stops when its client
goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..config import GenerationOptions
from ..errors import OutOfMemoryError
from ..generate import OOM_MESSAGE, Answer, free_accelerator_memory
from .protocol import ApiError

END = object()  # the last item of a stream's chunk queue


def shutting_down() -> ApiError:
    """The answer to a request that arrives, or still waits, while the server stops."""
    return ApiError(503, "the server is shutting down", "server_error", code="shutting_down", retry_after=5)


def out_of_memory() -> ApiError:
    """The answer to a request that does not fit in accelerator memory even alone."""
    return ApiError(503, OOM_MESSAGE, "server_error", code="out_of_memory", retry_after=5)


@dataclass
class Job:
    """One request on its way through the worker."""

    inputs: Any  # prepared on the CPU for this request alone
    image: Any  # the RGB image, or None (kept to prepare a batch together)
    prompt: str
    options: GenerationOptions
    variant: str  # "safe" or "original" (compare mode)
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    future: asyncio.Future[Any] | None = None  # non-streaming: the Answer
    chunks: asyncio.Queue[Any] | None = None  # streaming: text chunks, then a final dict, then END
    cancelled: threading.Event = field(default_factory=threading.Event)

    def batch_key(self) -> Any:
        """Jobs with equal keys may share one ``generate`` call; None: never batched."""
        if self.stream or self.options.temperature > 0:
            return None  # sampling draws from one random stream: batched answers would differ
        return (self.variant, self.image is not None, dataclasses.replace(self.options, prompt=""))

    def resolve(self, result: Any) -> None:
        """Hand the result (an Answer or an ApiError) to the waiting handler."""
        assert self.future is not None

        def settle() -> None:
            if self.future is not None and not self.future.done():
                if isinstance(result, Exception):
                    self.future.set_exception(result)
                else:
                    self.future.set_result(result)

        self.loop.call_soon_threadsafe(settle)

    def emit(self, item: Any) -> None:
        """Hand one stream item to the waiting handler."""
        assert self.chunks is not None
        self.loop.call_soon_threadsafe(self.chunks.put_nowait, item)


class Worker:
    """Runs jobs on one model, one ``generate`` at a time."""

    def __init__(
        self,
        loaded: Any,
        max_queue: int = 64,
        max_batch: int = 8,
        batch_wait_s: float = 0.005,
        variants: Callable[[str], Any] | None = None,
    ):
        self.loaded = loaded
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.variants = variants  # variant name -> context manager that puts its tower in place
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.closing = False
        self.busy_with: Job | None = None
        self._held: deque[Job] = deque()  # taken from the queue while batching, not batchable with it
        self._thread = threading.Thread(target=self._run, name="safellava-worker", daemon=True)

    def start(self) -> None:
        """Start taking jobs."""
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; a full queue or a closing server is a 429/503 with Retry-After."""
        if self.closing:
            raise shutting_down()
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise ApiError(
                429,
                f"the queue is full ({self.queue.maxsize} requests waiting): retry shortly",
                "rate_limit_error",
                code="queue_full",
                retry_after=1,
            ) from None

    def begin_close(self) -> None:
        """Stop taking jobs, refuse those waiting (503), and stop a running stream; a running batch ends."""
        self.closing = True
        running = self.busy_with
        if running is not None and running.stream:
            running.cancelled.set()
        waiting = list(self._held)
        self._held.clear()
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                waiting.append(job)
        self._fail(waiting, shutting_down())

    def close(self, timeout_s: float) -> None:
        """``begin_close``, then wait for the worker thread to finish what it runs."""
        self.begin_close()
        self.queue.put(None)
        self._thread.join(timeout_s)

    def _next(self, block: bool = True, timeout: float | None = None) -> Job | None:
        if self._held:
            return self._held.popleft()
        return self.queue.get(block=block, timeout=timeout)

    def _run(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            if self.closing:
                self._fail([job], shutting_down())
                continue
            self.busy_with = job
            try:
                if job.stream:
                    self._stream(job)
                else:
                    self._answer(self._batch_with(job))
            finally:
                self.busy_with = None

    def _batch_with(self, first: Job) -> list[Job]:
        """``first`` and the compatible jobs that arrive within the batch window."""
        key = first.batch_key()
        batch = [first]
        if key is None or self.max_batch < 2:
            return batch
        deadline = time.monotonic() + self.batch_wait_s
        later: list[Job] = []
        while len(batch) < self.max_batch:
            wait = deadline - time.monotonic()
            if wait <= 0:
                break
            try:
                job = self.queue.get(timeout=wait)
            except queue.Empty:
                break
            if job is None:
                self.queue.put(None)  # the stop signal, for after this batch
                break
            (batch if job.batch_key() == key else later).append(job)
        self._held.extend(later)
        return batch

    def _tower(self, variant: str) -> Any:
        return self.variants(variant) if self.variants is not None else contextlib.nullcontext()

    def _answer(self, batch: list[Job]) -> None:
        import torch

        engine = self.loaded.engine
        first = batch[0]
        try:
            with self._tower(first.variant):
                if len(batch) == 1:
                    answers = engine.answer(first.inputs, first.options)
                else:
                    images = [job.image for job in batch if job.image is not None]
                    inputs = engine.prepare(images, [job.prompt for job in batch])
                    answers = engine.answer(inputs, first.options)
        except Exception as exc:
            oom = isinstance(exc, torch.OutOfMemoryError)
            if oom:
                free_accelerator_memory()
            if len(batch) > 1:  # too big together, or one request's failure: each alone, then
                for job in batch:
                    self._answer([job])
                return
            self._fail(batch, out_of_memory() if oom else _internal(exc))
            return
        for job, answer in zip(batch, answers, strict=True):
            job.resolve(answer)

    def _stream(self, job: Job) -> None:
        engine = self.loaded.engine
        try:
            with self._tower(job.variant):
                answer = engine.stream(job.inputs, job.options)
                for text in _chunks(answer, job):
                    job.emit(text)
            job.emit(Answer(answer.text, answer.prompt_tokens, answer.num_tokens, answer.finish_reason))
        except OutOfMemoryError:
            job.emit(out_of_memory())
        except Exception as exc:
            job.emit(_internal(exc))
        job.emit(END)

    def _fail(self, jobs: list[Job], error: ApiError) -> None:
        for each in jobs:
            if each.stream:
                each.emit(error)
                each.emit(END)
            else:
                each.resolve(error)


def _chunks(answer: Any, job: Job) -> Iterator[str]:
    """The answer's chunks until it ends or the client goes away (then generation stops)."""
    for text in answer:
        if job.cancelled.is_set():
            answer.stop()
            return
        yield text


def _internal(exc: Exception) -> ApiError:
    from ..errors import SafeLlavaError, first_line

    if isinstance(exc, SafeLlavaError):
        return ApiError(400, first_line(exc))
    return ApiError(500, f"internal error: {type(exc).__name__}: {first_line(exc)}", "server_error")
