"""Choosing a numeric precision the hardware actually runs fast.

On a CPU, ``bf16-mixed`` is only worth it with native bf16 instructions (AVX512-BF16 or AMX). Without
them oneDNN emulates bf16 and training gets much slower (TinyVGG-sized networks about 10x on an
AVX2-only CPU, see the docs' Epoch speed page), so the CLI falls back to ``32-true`` there.
"""

from functools import cache
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn

BF16_PRECISIONS = ("bf16-mixed", "bf16-true", "bf16")
#: CPU flags (``/proc/cpuinfo``) of bf16 arithmetic that oneDNN runs natively: x86's AVX512-BF16 and
#: AMX-BF16, Arm's BF16. An AVX-512 CPU without them emulates bf16, though oneDNN's own check
#: (``torch.ops.mkldnn._is_mkldnn_bf16_supported``, private too) answers yes there.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags, from ``/proc/cpuinfo`` (empty where there is none: not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, Arm
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions oneDNN uses (AVX512-BF16, AMX-BF16 or Arm BF16)."""
    return bool(cpu_flags() & NATIVE_BF16_FLAGS)


def runs_on_cpu(accelerator: str | None) -> bool:
    """Whether a Trainer with this ``accelerator`` setting would run on the CPU."""
    accelerator = accelerator or "auto"
    if accelerator == "cpu":
        return True
    if accelerator != "auto":
        return False
    return not (torch.cuda.is_available() or torch.backends.mps.is_available())


def resolve_precision(precision: str | int | None, accelerator: str | None = "auto") -> str | int | None:
    """Return ``precision``, or ``"32-true"`` with a warning for bf16 on a CPU without native bf16.

    Args:
        precision: What the Trainer was asked for (e.g. ``"bf16-mixed"``).
        accelerator: The Trainer's ``accelerator`` setting (``"auto"``, ``"cpu"``, ``"gpu"``...).

    Returns:
        The precision to train with.
    """
    if str(precision) in BF16_PRECISIONS and runs_on_cpu(accelerator) and not cpu_has_native_bf16():
        rank_zero_warn(
            f"precision={precision!r} asked for on a CPU without native bf16 (AVX512-BF16/AMX): emulated bf16 "
            "is several times slower, so training runs in '32-true'. Pass --bf16_fallback=false to force bf16."
        )
        return "32-true"
    return precision
