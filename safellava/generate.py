"""The inference engine: conversation -> prompt text -> inputs -> ``generate`` -> text, batched or streamed.

Every use (caption, chat, batch, compare, the server) goes through one ``Engine``, so there is
one way to build inputs, one way to decode, and one out-of-memory policy: a batch that runs out of
accelerator memory is halved and retried, the smaller size is kept, and an image that does not fit
even alone is reported with ``OOM_MESSAGE``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .config import GenerationOptions
from .errors import OutOfMemoryError, UsageError
from .prompts import Turn, render_prompt, single_turn

log = logging.getLogger("safellava")

OOM_MESSAGE = (
    "out of GPU memory even for one image: try --quantize 4bit, a smaller model or a lower --max-new-tokens"
)


@dataclass(frozen=True)
class Answer:
    """One generated answer and what it took."""

    text: str  # without special tokens and surrounding whitespace, cut before a stop text
    prompt_tokens: int  # the prompt's tokens, the image's included (no padding)
    completion_tokens: int  # tokens generated, an end-of-sequence token included
    finish_reason: str  # "stop": ended by the model or a stop text; "length": max_new_tokens reached


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to the first stop text, and whether one was found."""
    cuts = [index for index in (text.find(s) for s in stop) if index != -1]
    return (text[: min(cuts)], True) if cuts else (text, False)


def generation_kwargs(options: GenerationOptions, tokenizer: Any) -> dict[str, Any]:
    """Keyword arguments for ``model.generate``: greedy at temperature 0, else sampling."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": options.max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
    }
    if options.temperature > 0:
        kwargs.update(do_sample=True, temperature=options.temperature, top_p=options.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if options.stop:
        kwargs.update(stop_strings=list(options.stop), tokenizer=tokenizer)
    return kwargs


def free_accelerator_memory() -> None:
    """Return cached CUDA blocks after an out-of-memory error, so a smaller retry can fit."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class BatchSizer:
    """Batch size that halves on CUDA out-of-memory and stays reduced for the rest of the run."""

    def __init__(self, batch_size: int):
        self.requested = batch_size
        self.size = batch_size

    def shrink(self, failed: int) -> None:
        """Halve (rounding up) the size below that of a batch of ``failed`` items that ran out of memory."""
        self.size = max(1, (min(self.size, failed) + 1) // 2)

    def run(self, items: Sequence[Any], step: Callable[[Sequence[Any]], list[Any]]) -> list[Any]:
        """Apply ``step`` to consecutive batches of ``items``, retrying smaller batches on out-of-memory.

        An item that runs out of memory on its own gets ``None`` as its result.
        """
        import torch

        results: list[Any] = []
        start = 0
        while start < len(items):
            chunk = items[start : start + self.size]
            try:
                results.extend(step(chunk))
            except torch.OutOfMemoryError:
                free_accelerator_memory()
                if len(chunk) > 1:
                    self.shrink(len(chunk))
                    continue
                results.append(None)
            start += len(chunk)
        return results


class BaseEngine:
    """What every engine shares: the prompt in the model's format and the batch sizer."""

    prompt_format: str
    _sizer: BatchSizer | None = None

    def render(self, turns: Sequence[Turn]) -> str:
        """The prompt text for a conversation, ending where the assistant's answer begins."""
        raise NotImplementedError

    def caption_prompt(self, options: GenerationOptions) -> str:
        """The prompt text for captioning one image with ``options.prompt`` (and its system prompt)."""
        return self.render(single_turn(options.prompt, options.system))

    def sizer(self, batch_size: int) -> BatchSizer:
        """The batch sizer for a requested size: an out-of-memory cut holds while the same size is asked for."""
        if self._sizer is None or self._sizer.requested != batch_size:
            self._sizer = BatchSizer(batch_size)
        return self._sizer

    def caption(
        self, images: Sequence[Any], options: GenerationOptions, prepared: Any = None
    ) -> list[str | None]:
        """Captions of RGB images; ``None`` for one that does not fit in memory even alone."""
        raise NotImplementedError

    def caption_all(self, images: Sequence[Any], options: GenerationOptions) -> list[str]:
        """Captions of RGB images; ``OutOfMemoryError`` if one does not fit even alone."""
        captions = self.caption(images, options)
        if any(caption is None for caption in captions):
            raise OutOfMemoryError(OOM_MESSAGE)
        return [caption for caption in captions if caption is not None]


class Engine(BaseEngine):
    """One loaded LLaVA and its processor, turning conversations and images into text."""

    def __init__(self, model: Any, processor: Any, prompt_format: str):
        self.model = model
        self.processor = processor
        self.prompt_format = prompt_format
        self._local = threading.local()
        # The thread itself, not its id: ids are reused once a thread ends (the loading thread of the
        # server does), and a shared tokenizer must not be used from two threads.
        self._owner = threading.current_thread()
        self._capped: set[int] = set()  # max_new_tokens values already reported as capped

    def render(self, turns: Sequence[Turn]) -> str:
        """The prompt text for a conversation, ending where the assistant's answer begins."""
        return render_prompt(self.processor, turns, self.prompt_format)

    def _thread_processor(self) -> Any:
        if threading.current_thread() is self._owner:
            return self.processor
        if getattr(self._local, "processor", None) is None:
            # A private copy per thread: a shared tokenizer is not safe across threads.
            self._local.processor = copy.deepcopy(self.processor)
        return self._local.processor

    def prepare(self, images: Sequence[Any], prompts: Sequence[str]) -> Any:
        """Tokenize prompts and preprocess images (none: text only) into one left-padded batch on the CPU.

        Safe to call from worker threads while the model generates.
        """
        processor = self._thread_processor()
        return processor(images=list(images) or None, text=list(prompts), padding=True, return_tensors="pt")

    def _on_device(self, inputs: Any) -> Any:
        return inputs.to(self.model.device, dtype=self.model.dtype)

    @property
    def context_length(self) -> int:
        """How many tokens the language model attends to: prompt (with the image) and answer together."""
        config = self.model.config
        return int(getattr(config, "text_config", config).max_position_embeddings)

    def fit(self, inputs: Any, options: GenerationOptions) -> GenerationOptions:
        """Options whose answer fits the context after this prompt; a ``UsageError`` if the prompt alone does not.

        A ``max_new_tokens`` beyond the room left is capped, and said once (on the ``safellava`` logger).
        """
        prompt_tokens = int(inputs["input_ids"].shape[1])
        room = self.context_length - prompt_tokens
        if room < 1:
            raise UsageError(
                f"the prompt takes {prompt_tokens} tokens with the image, and the model's context is "
                f"{self.context_length}: shorten the prompt"
            )
        if options.max_new_tokens <= room:
            return options
        if options.max_new_tokens not in self._capped:
            self._capped.add(options.max_new_tokens)
            log.warning(
                "max_new_tokens %d does not fit the model's context of %d tokens after a %d-token prompt: "
                "answers stop at %d tokens",
                options.max_new_tokens,
                self.context_length,
                prompt_tokens,
                room,
            )
        return dataclasses.replace(options, max_new_tokens=room)

    def generate(self, inputs: Any, options: GenerationOptions) -> list[str]:
        """One ``generate`` call on prepared inputs; the decoded answers, stripped."""
        return [answer.text for answer in self.answer(inputs, options)]

    def end_token_ids(self) -> set[int]:
        """The tokens that end an answer."""
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        return ids | ({self.processor.tokenizer.eos_token_id} - {None})

    def answer(self, inputs: Any, options: GenerationOptions) -> list[Answer]:
        """One ``generate`` call on prepared inputs: each answer with its token counts and why it ended."""
        import torch
        from transformers import set_seed

        options = self.fit(inputs, options)
        inputs = self._on_device(inputs)
        kwargs = generation_kwargs(options, self.processor.tokenizer)
        if options.seed is not None:
            set_seed(options.seed)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **kwargs)
        prompt_length = inputs["input_ids"].shape[1]
        new_tokens = output[:, prompt_length:]
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        ends = self.end_token_ids()
        pad = kwargs["pad_token_id"]
        answers = []
        for row, text, prompt in zip(new_tokens.tolist(), texts, prompt_tokens, strict=True):
            while row and row[-1] == pad and pad not in ends:  # a row that finished before the others
                row.pop()
            ended = next((i + 1 for i, token in enumerate(row) if token in ends), None)
            text, stopped = cut_at_stop(text, options.stop)
            reason = "stop" if ended is not None or stopped else "length"
            answers.append(Answer(text.strip(), int(prompt), ended or len(row), reason))
        return answers

    def caption(
        self, images: Sequence[Any], options: GenerationOptions, prepared: Any = None
    ) -> list[str | None]:
        """Captions of RGB images in batches of ``options.batch_size``; ``None`` for one that does not fit alone.

        ``prepared`` holds the inputs of exactly ``images`` when a worker built them beforehand.
        """
        import torch

        sizer = self.sizer(options.batch_size)
        prompt = self.caption_prompt(options)
        if prepared is not None:
            try:
                return list(self.generate(prepared, options))
            except torch.OutOfMemoryError:
                del prepared
                free_accelerator_memory()
            if len(images) == 1:
                return [None]
            sizer.shrink(len(images))
        return sizer.run(
            images, lambda chunk: self.generate(self.prepare(chunk, [prompt] * len(chunk)), options)
        )

    def stream(
        self,
        inputs: Any,
        options: GenerationOptions,
        on_finish: Callable[[str], None] | None = None,
    ) -> StreamingAnswer:
        """Start generating one answer from prepared inputs, streamed chunk by chunk.

        ``on_finish`` receives the answer's text once, when it ends or is stopped.
        """
        options = self.fit(inputs, options)
        return StreamingAnswer(self.model, self.processor, self._on_device(inputs), options, on_finish)


def stop_when_set(event: Any) -> Any:
    """A stopping criterion that ends generation of the whole batch once ``event`` is set."""
    import torch
    from transformers import StoppingCriteria

    class StopWhenSet(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            # On the inputs' device: transformers ORs it with a tensor there (CUDA, MPS).
            return torch.full(
                (input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device
            )

    return StopWhenSet()


class StreamingAnswer:
    """Text chunks of one answer as ``generate`` produces them in a background thread.

    Iterate to receive the chunks; ``stop()`` ends generation early (Ctrl-C). Afterwards ``text``
    holds what was generated, ``num_tokens`` how many tokens and ``seconds`` how long it took.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        inputs: Any,
        options: GenerationOptions,
        on_finish: Callable[[str], None] | None = None,
    ):
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        stop_event = threading.Event()
        self._stop_event = stop_event
        self.prompt_tokens = int(inputs["input_ids"].shape[1])
        self._stop_texts = options.stop
        self._max_new_tokens = options.max_new_tokens
        self.hit_stop_text = False
        self._streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._error: BaseException | None = None
        self._output: Any = None
        self.chunks: list[str] = []
        self._on_finish = on_finish
        self.stopped = False
        self.seconds = 0.0
        kwargs = {
            **inputs,
            **generation_kwargs(options, processor.tokenizer),
            "streamer": self._streamer,
            "stopping_criteria": StoppingCriteriaList([stop_when_set(stop_event)]),
        }
        if options.seed is not None:
            from transformers import set_seed

            set_seed(options.seed)
        self._thread = threading.Thread(target=self._generate, args=(model, kwargs), daemon=True)
        self._started = time.perf_counter()
        self._thread.start()

    def _generate(self, model: Any, kwargs: dict[str, Any]) -> None:
        import torch

        try:
            with torch.inference_mode():
                self._output = model.generate(**kwargs)
        except BaseException as exc:  # handed to the reading thread, which re-raises it
            self._error = exc
            self._streamer.end()

    def __iter__(self) -> Iterator[str]:
        """The answer's text as it comes, without the whitespace it starts with, ending before a stop text."""
        held = ""  # text that could be the start of a stop text, not yet given out
        keep = max((len(text) for text in self._stop_texts), default=1) - 1
        for chunk in self._streamer:
            if not self.chunks and not held:
                chunk = chunk.lstrip()
            held += chunk
            held, found = cut_at_stop(held, self._stop_texts)
            ready, held = (
                (held, "") if found else (held[: len(held) - keep], held[len(held) - keep :] if keep else "")
            )
            if ready:
                self.chunks.append(ready)
                yield ready
            if found:
                self.hit_stop_text = True
                self.stop()
                return
        if held:
            self.chunks.append(held)
            yield held
        self._finish()

    def stop(self) -> None:
        """Stop generating; the text so far is kept."""
        self.stopped = True
        self._stop_event.set()
        self._finish()

    def _finish(self) -> None:
        self._thread.join()
        self.seconds = time.perf_counter() - self._started
        if self._on_finish is not None and self._error is None:
            on_finish, self._on_finish = self._on_finish, None
            on_finish(self.text)
        if self._error is not None:
            import torch

            error, self._error = self._error, None
            if isinstance(error, torch.OutOfMemoryError):
                free_accelerator_memory()
                raise OutOfMemoryError(OOM_MESSAGE) from None
            raise error

    @property
    def text(self) -> str:
        """The answer so far, without surrounding whitespace."""
        return "".join(self.chunks).strip()

    @property
    def num_tokens(self) -> int:
        """Number of tokens generated (known once generation has ended)."""
        return 0 if self._output is None else int(self._output.shape[1] - self.prompt_tokens)

    @property
    def finish_reason(self) -> str:
        """``stop`` (the model ended, a stop text, or ``stop()``) or ``length`` (max_new_tokens reached)."""
        if self.stopped or self.hit_stop_text or self.num_tokens < self._max_new_tokens:
            return "stop"
        return "length"
