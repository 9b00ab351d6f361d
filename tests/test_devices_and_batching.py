"""Device/dtype choices, generation settings, and the batch that halves on CUDA out-of-memory."""

from __future__ import annotations

import pytest
import torch

from safellava.config import GenerationOptions
from safellava.devices import resolve_placement
from safellava.errors import SafeLlavaError, UsageError
from safellava.generate import BatchSizer, generation_kwargs


@pytest.mark.parametrize(
    ("device", "dtype", "quantize", "expected_device", "expected_dtype"),
    [
        ("cpu", "auto", "none", "cpu", torch.float32),
        ("cpu", "auto", "4bit", "cpu", torch.bfloat16),
        ("cpu", "auto", "8bit", "cpu", torch.float16),
        ("cpu", "bfloat16", "none", "cpu", torch.bfloat16),
    ],
)
def test_cpu_placements(device, dtype, quantize, expected_device, expected_dtype):
    placement = resolve_placement(device, dtype, quantize)
    assert placement.device == expected_device
    assert placement.dtype == expected_dtype
    assert placement.device_map == {"": "cpu"}


def test_auto_picks_cuda_in_half_precision_over_all_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    placement = resolve_placement("auto", "auto", "none")
    assert (placement.device, placement.device_map, placement.dtype) == ("cuda", "auto", torch.float16)
    assert resolve_placement("cuda:1", "auto", "4bit").device_map == {"": "cuda:1"}
    with pytest.raises(UsageError, match="this machine has 2 CUDA device"):
        resolve_placement("cuda:2", "auto", "none")


def test_auto_falls_back_to_cpu_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    placement = resolve_placement("auto", "auto", "none")
    assert (placement.device, placement.dtype) == ("cpu", torch.float32)


@pytest.mark.parametrize(
    ("device", "dtype", "quantize", "message"),
    [
        ("cuda", "auto", "none", "CUDA is not available"),
        ("cpu", "float32", "4bit", "not --dtype float32"),
    ],
)
def test_impossible_placements_are_usage_errors(monkeypatch, device, dtype, quantize, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match=message):
        resolve_placement(device, dtype, quantize)


def test_mps_is_refused_with_quantization(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with pytest.raises(UsageError, match="bitsandbytes has no MPS kernels"):
        resolve_placement("mps", "auto", "4bit")
    assert resolve_placement("mps", "auto", "none").device_map == {"": "mps"}


class _Tokenizer:
    pad_token_id = None
    eos_token_id = 2


def test_greedy_and_sampling_generation_kwargs():
    greedy = generation_kwargs(GenerationOptions(max_new_tokens=5), _Tokenizer())
    assert greedy["do_sample"] is False
    assert greedy["max_new_tokens"] == 5
    assert greedy["pad_token_id"] == 2
    sampled = generation_kwargs(GenerationOptions(temperature=0.7, top_p=0.9), _Tokenizer())
    assert (sampled["do_sample"], sampled["temperature"], sampled["top_p"]) == (True, 0.7, 0.9)


def test_sampling_with_a_seed_is_reproducible(safe_llava, images):
    kwargs = {"temperature": 1.5, "seed": 7, "max_new_tokens": 8}
    first = safe_llava.caption(str(images[0]), **kwargs)
    assert safe_llava.caption(str(images[0]), **kwargs) == first
    others = {safe_llava.caption(str(images[0]), **{**kwargs, "seed": s}) for s in range(8, 12)}
    assert others - {first}, "different seeds never changed the sampled caption"


def test_batch_halves_on_out_of_memory_and_stays_reduced():
    calls: list[int] = []

    def step(chunk):
        calls.append(len(chunk))
        if len(chunk) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [item * 10 for item in chunk]

    sizer = BatchSizer(8)
    assert sizer.run(list(range(7)), step) == [i * 10 for i in range(7)]
    assert calls == [7, 4, 2, 2, 2, 1]
    assert sizer.size == 2
    calls.clear()
    assert sizer.run([1, 2, 3], step) == [10, 20, 30]
    assert calls == [2, 1]


def test_out_of_memory_on_a_single_image_is_reported():
    def step(chunk):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(SafeLlavaError, match="out of GPU memory captioning a single image"):
        BatchSizer(2).run([1, 2], step)
