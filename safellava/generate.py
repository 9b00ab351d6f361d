"""Captions for one or many images: batched ``generate`` calls, halving the batch on GPU OOM."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from PIL import Image

from .config import GenerationOptions
from .errors import SafeLlavaError
from .prompts import render_prompt, single_turn


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
    return kwargs


def build_inputs(
    processor: Any, images: Sequence[Image.Image], prompts: Sequence[str], device: Any, dtype: Any
) -> Any:
    """Tokenize prompts and preprocess images (none: text only) into one left-padded batch."""
    inputs = processor(images=list(images) or None, text=list(prompts), padding=True, return_tensors="pt")
    return inputs.to(device, dtype=dtype)


def decode_new_tokens(processor: Any, output_ids: Any, prompt_length: int) -> list[str]:
    """Text of the generated continuation of each sequence, special tokens dropped."""
    texts = processor.batch_decode(output_ids[:, prompt_length:], skip_special_tokens=True)
    return [text.strip() for text in texts]


def caption_batch(
    model: Any,
    processor: Any,
    images: Sequence[Image.Image],
    options: GenerationOptions,
    prompt_format: str,
) -> list[str]:
    """Caption a batch of RGB images with one ``generate`` call."""
    prompt = render_prompt(processor, single_turn(options.prompt, options.system), prompt_format)
    inputs = build_inputs(processor, images, [prompt] * len(images), model.device, model.dtype)
    return generate_captions(model, processor, inputs, options)


def generate_captions(model: Any, processor: Any, inputs: Any, options: GenerationOptions) -> list[str]:
    """One ``generate`` call on prepared inputs (on the model's device); the decoded answers."""
    import torch
    from transformers import set_seed

    if options.seed is not None:
        set_seed(options.seed)
    with torch.inference_mode():
        output = model.generate(**inputs, **generation_kwargs(options, processor.tokenizer))
    return decode_new_tokens(processor, output, inputs["input_ids"].shape[1])


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

    def run(self, items: Sequence[Any], step: Any, alone: Callable[[Any], Any] | None = None) -> list[Any]:
        """Apply ``step`` to consecutive batches of ``items``, retrying smaller batches on OOM.

        An item that runs out of memory on its own gets ``alone(item)`` as its result; without
        ``alone`` that stops the run with a ``SafeLlavaError``.
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
                if alone is None:
                    raise SafeLlavaError(
                        "out of GPU memory captioning a single image: try --quantize 4bit, "
                        "a smaller model or a lower --max-new-tokens"
                    ) from None
                results.append(alone(chunk[0]))
            start += len(chunk)
        return results


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
    holds what was generated and ``num_tokens``/``tokens_per_second`` how fast it came.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        inputs: Any,
        options: GenerationOptions,
        on_finish: Callable[[str], None] | None = None,
    ):
        import threading

        from transformers import StoppingCriteriaList, TextIteratorStreamer

        stop_event = threading.Event()
        self._stop_event = stop_event
        self._prompt_length = inputs["input_ids"].shape[1]
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
        """The answer's text as it comes, without the whitespace it starts with."""
        for chunk in self._streamer:
            if not self.chunks:
                chunk = chunk.lstrip()
            if chunk:
                self.chunks.append(chunk)
                yield chunk
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
                raise SafeLlavaError(
                    "out of GPU memory: try --quantize 4bit or a lower --max-new-tokens"
                ) from None
            raise error

    @property
    def text(self) -> str:
        """The answer so far, without surrounding whitespace."""
        return "".join(self.chunks).strip()

    @property
    def num_tokens(self) -> int:
        """Number of tokens generated (known once generation has ended)."""
        return 0 if self._output is None else int(self._output.shape[1] - self._prompt_length)

    @property
    def tokens_per_second(self) -> float:
        """Generation speed, from the start of ``generate`` to its end."""
        return self.num_tokens / self.seconds if self.seconds else 0.0


def stream_answer(
    model: Any,
    processor: Any,
    prompt: str,
    image: Image.Image | None,
    options: GenerationOptions,
    on_finish: Callable[[str], None] | None = None,
) -> StreamingAnswer:
    """Start generating an answer to a prompt (with or without an image), streamed chunk by chunk.

    ``on_finish`` receives the answer's text once, when it ends or is stopped.
    """
    images = [image] if image is not None else []
    inputs = build_inputs(processor, images, [prompt], model.device, model.dtype)
    return StreamingAnswer(model, processor, inputs, options, on_finish)
