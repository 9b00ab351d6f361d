"""Captions for one or many images: batched ``generate`` calls, halving the batch on GPU OOM."""

from __future__ import annotations

from collections.abc import Sequence
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
    """Tokenize prompts and preprocess images into one left-padded batch on the model's device."""
    inputs = processor(images=list(images), text=list(prompts), padding=True, return_tensors="pt")
    return inputs.to(device, dtype=dtype) if hasattr(inputs, "to") else inputs


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
    import torch
    from transformers import set_seed

    prompt = render_prompt(processor, single_turn(options.prompt, options.system), prompt_format)
    inputs = build_inputs(processor, images, [prompt] * len(images), model.device, model.dtype)
    if options.seed is not None:
        set_seed(options.seed)
    with torch.inference_mode():
        output = model.generate(**inputs, **generation_kwargs(options, processor.tokenizer))
    return decode_new_tokens(processor, output, inputs["input_ids"].shape[1])


class BatchSizer:
    """Batch size that halves on CUDA out-of-memory and stays reduced for the rest of the run."""

    def __init__(self, batch_size: int):
        self.size = batch_size

    def run(self, items: Sequence[Any], step: Any) -> list[Any]:
        """Apply ``step`` to consecutive batches of ``items``, retrying smaller batches on OOM."""
        import torch

        results: list[Any] = []
        start = 0
        while start < len(items):
            chunk = items[start : start + self.size]
            try:
                results.extend(step(chunk))
            except torch.OutOfMemoryError:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if self.size == 1:
                    raise SafeLlavaError(
                        "out of GPU memory captioning a single image: try --quantize 4bit, "
                        "a smaller model or a lower --max-new-tokens"
                    ) from None
                self.size = max(1, self.size // 2)
                continue
            start += len(chunk)
        return results
