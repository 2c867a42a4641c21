"""The course's one optimizer factory, keyed by the optimizer names of its recipes.

    adamw             torch's AdamW, fused kernel: two fp32 moments, updated in place
    adamw8bit         bitsandbytes' AdamW8bit: both moments in 1 byte (blockwise quantized)
    paged-adamw8bit   the same in CUDA unified memory, paged to host RAM when the GPU is full
    sgd               plain SGD: no state
    sgd-momentum      SGD with momentum 0.9: one moment

Every optimizer covers the model's trainable parameters only (a LoRA model's adapters).
"""

from __future__ import annotations

from typing import Any

import torch

from lowmem_course.recipe import OPTIMIZERS, OptimizerName

MIN_8BIT_SIZE = 4096  # elements: bitsandbytes keeps the state of smaller tensors in fp32


def _optimizer_class(name: str) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The optimizer class of ``name`` and the options the course gives it."""
    if name == "adamw":
        return torch.optim.AdamW, {"fused": True}
    if name == "sgd":
        return torch.optim.SGD, {}
    if name == "sgd-momentum":
        return torch.optim.SGD, {"momentum": 0.9}
    if name in ("adamw8bit", "paged-adamw8bit"):
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.PagedAdamW8bit
        return optimizer, {"min_8bit_size": MIN_8BIT_SIZE}
    raise ValueError(f"unknown optimizer {name!r}: choose from {', '.join(OPTIMIZERS)}")


def make_optimizer(model: torch.nn.Module, name: OptimizerName = "adamw", lr: float = 1e-4, *, zero: bool = False,
                   **options: Any) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of ``OPTIMIZERS``) over ``model``'s trainable parameters, at learning rate ``lr``.

    AdamW uses the fused kernel, which updates in place without per-parameter temporaries, so a
    step holds exactly parameters + gradients + two moments (``fused=False`` gives torch's default
    multi-tensor kernel, whose results differ in the last bits). The 8-bit AdamW quantizes the
    moments of tensors of at least ``min_8bit_size`` (default ``MIN_8BIT_SIZE``) elements only;
    smaller ones (the LoRA matrices of a small model) keep fp32 moments. Paged moments live in CUDA
    unified memory, which the driver moves to host RAM when the GPU runs out; on a CPU bitsandbytes
    falls back to the plain 8-bit optimizer (with a warning). ``options`` override the course's
    (``betas``, ``weight_decay``, ``fused``, ``min_8bit_size``, ...). ``zero=True`` wraps it in
    ``ZeroRedundancyOptimizer`` (ZeRO-1: each rank of a process group keeps 1/N of the state).
    """
    cls, defaults = _optimizer_class(name)
    params = [p for p in model.parameters() if p.requires_grad]
    if zero:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=cls, lr=lr, **{**defaults, **options})
    return cls(params, lr=lr, **{**defaults, **options})
