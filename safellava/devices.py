"""Device, dtype and device-map choices: CUDA in half precision where present, else the CPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import UsageError


@dataclass(frozen=True)
class Placement:
    """Where the model goes: a device name for inputs, a device map for loading, a dtype."""

    device: str  # "cpu", "cuda", "cuda:1", "mps"
    device_map: Any  # "auto" (spread over all GPUs) or {"": device}
    dtype: Any  # torch.dtype


def resolve_placement(device: str, dtype: str, quantize: str) -> Placement:
    """Turn ``--device``/``--dtype``/``--quantize`` into a concrete placement, or raise UsageError."""
    import torch

    cuda = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    if device.startswith("cuda") and not cuda:
        raise UsageError(f"--device {device}: CUDA is not available here (use --device cpu)")
    if device.startswith("cuda:") and not int(device.split(":", 1)[1]) < torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available here (use --device cpu)")
    if quantize != "none" and device == "mps":
        raise UsageError(f"--quantize {quantize} needs CUDA or the CPU (bitsandbytes has no MPS kernels)")

    if dtype == "auto":
        if device == "cpu" and quantize == "none":
            resolved = torch.float32
        elif device == "cpu" and quantize == "4bit":
            resolved = torch.bfloat16  # bitsandbytes' CPU 4-bit kernels compute in bfloat16
        else:
            resolved = torch.float16  # CUDA, and LLM.int8, which computes in float16
    else:
        resolved = getattr(torch, dtype)
    if quantize != "none" and resolved == torch.float32:
        raise UsageError(f"--quantize {quantize} computes in float16 or bfloat16, not --dtype float32")

    device_map = "auto" if device == "cuda" else {"": device}
    return Placement(device=device, device_map=device_map, dtype=resolved)
