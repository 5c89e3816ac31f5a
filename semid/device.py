"""Which torch device a run uses, and what that device can do.

Device names are "auto", "cpu", "cuda" (the current GPU) and "cuda:N" (GPU N, for a machine with several
that is not using CUDA_VISIBLE_DEVICES to pick one). Every command, config and script resolves them here,
so a name that works in one place works in all of them and fails in all of them with the same message.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from semid.config import DEVICE_NAMES, is_device_name


def resolve_device(name: str) -> torch.device:
    """The device a name stands for on this machine; a GPU it lacks is an error that says what it has."""
    if not is_device_name(name):
        raise ValueError(f"device {name!r} is not one of {DEVICE_NAMES}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device is {name!r} but no CUDA device is available (use 'auto' or 'cpu')")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise RuntimeError(f"device is {name!r} but this machine has {count} CUDA device(s), "
                               f"cuda:0 to cuda:{count - 1}")
    return device


def device_available(name: str) -> bool:
    """Whether `resolve_device(name)` would succeed here (a saved model falls back to 'auto' when not)."""
    try:
        resolve_device(name)
    except (ValueError, RuntimeError):
        return False
    return True


@contextlib.contextmanager
def as_current(device: torch.device) -> Iterator[None]:
    """Make `device` the current CUDA device for the block; nothing on the CPU.

    Tensors name their device, but CUDA streams, graph capture and Triton launches use the current one, which
    for a model on cuda:1 is still cuda:0 unless it is set.
    """
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        yield


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively on this device: a CUDA GPU from Ampere on (bf16 tensor
    cores), or a CPU with AVX512-BF16 or AMX.

    There bf16 autocast about halves the step of the default model (2-core AMD EPYC: 0.146 -> 0.075 s), as it
    does on a GPU. A CPU without these instructions emulates bf16 and would run slower, so it stays in fp32.
    """
    if device.type == "cuda":  # before Ampere (T4, V100) bf16 is emulated, and slower than fp32
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's, private: absent in some builds
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
