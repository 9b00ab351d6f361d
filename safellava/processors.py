"""The processor of a llava-hf checkpoint, preparing images as the original LLaVA does."""

from __future__ import annotations

from typing import Any

from .config import ModelOptions
from .errors import ModelLoadError, load_failure


def load_hf_processor(options: ModelOptions, pad: bool) -> Any:
    """The checkpoint's processor on the PIL backend, padding images to a square when ``pad``.

    Tokens are padded on the left for batched generation.
    """
    from transformers import AutoProcessor

    try:
        # The PIL backend, as the original LLaVA's CLIPImageProcessor, also where torchvision is installed.
        processor = AutoProcessor.from_pretrained(options.model, revision=options.revision, backend="pil")
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(
            f"cannot load the processor of {options.model}: {load_failure(options.model, exc)}"
        ) from None
    processor.tokenizer.padding_side = "left"
    if pad:
        processor.image_processor = padding_image_processor(processor.image_processor)
    return processor


def padding_image_processor(image_processor: Any) -> Any:
    """The same image processor, padding each image to a square of the mean colour first.

    That is the original's ``expand2square(image, tuple(int(x * 255) for x in image_mean))``
    followed by the CLIP processor: nothing of a wide or tall image is cropped away.
    """
    from transformers import LlavaImageProcessorPil

    settings = {
        k: v
        for k, v in image_processor.to_dict().items()
        if k not in ("image_processor_type", "processor_class")
    }
    return LlavaImageProcessorPil(**{**settings, "do_pad": True})
