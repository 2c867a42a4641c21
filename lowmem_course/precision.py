"""Mixed precision: the right autocast for a device, a loss scaler only where fp16 needs one,
and what rounding to bf16 does to a small update.

The ladder the course climbs, all with ``torch.amp``::

    fp32                        weights, gradients, maths in fp32
    bf16-mixed                  fp32 master weights, forward under autocast(bfloat16)
    fp16-mixed                  the same in float16, with a GradScaler against underflow
    bf16                        the weights themselves in bfloat16 (watch small updates)

The step itself is ``steps.train_step(..., autocast_dtype=compute_dtype(p), scaler=make_scaler(...))``.
Bytes everywhere; nothing here prints.
"""

from __future__ import annotations

import contextlib
from typing import Literal, get_args

import torch

Precision = Literal["fp32", "bf16-mixed", "fp16-mixed", "bf16"]  # the recipes' names for the training ladder
PRECISIONS: tuple[str, ...] = get_args(Precision)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # weights stored in 16/32 bits, by name


def bf16_supported(device: str | torch.device) -> bool:
    """True where bfloat16 maths runs natively: CPUs, Ampere-or-newer CUDA GPUs, recent Apple GPUs.

    T4/V100-class GPUs (compute capability < 8) answer False: use fp16 with a scaler there.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if dev.type == "mps":
        return torch.backends.mps.is_available() and torch.backends.mps.is_macos_or_newer(14, 0)
    return dev.type == "cpu"


def autocast_dtype(device: str | torch.device) -> torch.dtype:
    """The low-precision dtype to compute in on ``device``: bfloat16 where supported, else float16."""
    return torch.bfloat16 if bf16_supported(device) else torch.float16


def parameter_dtype(precision: Precision) -> torch.dtype:
    """The dtype the weights are stored in for ``precision`` (bf16 only for pure "bf16")."""
    _check(precision)
    return torch.bfloat16 if precision == "bf16" else torch.float32


def compute_dtype(precision: Precision) -> torch.dtype:
    """The autocast dtype of ``precision``; float32 (no autocast) for "fp32" and pure "bf16"."""
    _check(precision)
    return {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}.get(precision, torch.float32)


def _check(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")


def autocast(device: str | torch.device, dtype: torch.dtype | None = None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``device`` in ``dtype`` (default: ``autocast_dtype(device)``).

    ``torch.float32`` gives a context that changes nothing, so one code path serves every rung.
    """
    dev = torch.device(device)
    dtype = dtype or autocast_dtype(dev)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast computes in bfloat16 or float16, got {dtype}")
    return torch.autocast(dev.type, dtype=dtype)


def make_scaler(device: str | torch.device, dtype: torch.dtype, init_scale: float = 2.0**16,
                growth_interval: int = 2000) -> torch.amp.GradScaler:
    """A ``torch.amp.GradScaler`` that scales only for float16 compute and is a no-op otherwise.

    bf16 has fp32's exponent range, so its gradients do not underflow and need no scaling; a
    disabled scaler passes ``scale(loss)``, ``step`` and ``update`` straight through.
    """
    dev = torch.device(device)
    return torch.amp.GradScaler(dev.type, init_scale=init_scale, growth_interval=growth_interval,
                                enabled=dtype == torch.float16)


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (float32) rounded to bfloat16 up or down at random, in proportion to the distance.

    bfloat16 is float32 with the low 16 bits of the mantissa cut off; adding uniform noise to those
    16 bits before cutting rounds up with probability equal to the dropped fraction, so the rounding
    is right on average and small updates survive in expectation.
    """
    if x.dtype != torch.float32:
        raise ValueError(f"stochastic rounding starts from float32, got {x.dtype}")
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def unchanged_fraction(before: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, float]:
    """Per parameter name, the fraction (0..1) of elements still equal to ``before`` (a state_dict copy).

    A value near 1 after an optimizer step means the updates were smaller than half a unit in the
    last place of the weights' dtype and were rounded away.
    """
    return {name: (p.detach() == before[name]).float().mean().item() for name, p in model.named_parameters()}
