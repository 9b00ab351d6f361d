"""Device and dtype choices: CUDA in half precision where present, else the CPU in float32."""

from __future__ import annotations

import pytest
import torch

from safellava.devices import resolve_placement
from safellava.errors import UsageError


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
