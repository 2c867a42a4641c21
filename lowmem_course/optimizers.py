"""The course's one optimizer factory, keyed by the optimizer names of its recipes.

    adamw             torch's AdamW, fused kernel: two fp32 moments, updated in place
    adamw8bit         bitsandbytes' AdamW8bit: both moments in 1 byte (blockwise quantized)
    paged-adamw8bit   the same in CUDA unified memory, paged to host RAM when the GPU is full
    sgd               plain SGD: no state
    sgd-momentum      SGD with momentum 0.9: one moment

Every optimizer covers the model's trainable parameters only (a LoRA model's adapters). Two ways to
run it that save memory on one GPU, both behind ``torch.optim.Optimizer``'s surface (``param_groups``
for the learning rate, ``state_dict`` for checkpoints, ``step``, ``zero_grad``):

    StepInBackward    any of them, one per parameter, stepped in backward as each gradient is made;
                      the gradient is freed at once (recipe token step-in-backward)
    HostAdamW         AdamW with its state, an fp32 copy of the parameters and the step in host
                      memory; each gradient moves to the host as it is made (offload-optimizer)
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch

from lowmem_course.host import HOST
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


class StepInBackward(torch.optim.Optimizer):
    """One optimizer per parameter, each stepped in backward as soon as its parameter's gradient is whole.

    PyTorch's recipe ("How to save memory by fusing the optimizer step into the backward pass"): a
    ``register_post_accumulate_grad_hook`` on each parameter runs its own optimizer's step and frees
    the gradient, so backward holds one parameter's gradient at a time instead of all of them. The
    hooks stay on the parameters: make one per model. ``step`` does nothing (the hooks did it),
    ``zero_grad`` finds the gradients already gone. ``param_groups`` are the per-parameter
    optimizers' own groups (one each), so setting ``group["lr"]`` reaches them; ``state`` is their
    state, so ``state_dict`` and ``load_state_dict`` round-trip as for one optimizer with one group
    per parameter. Nothing can see all gradients at once: no clipping by the global norm, no loss
    scaler, no gradient accumulation (``steps.train_step`` refuses them).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], make: Callable[[list[torch.nn.Parameter]],
                                                                           torch.optim.Optimizer]) -> None:
        params = list(params)
        self.optimizers = [make([p]) for p in params]
        super().__init__(params, {})
        self._share()
        for p, optimizer in zip(params, self.optimizers):
            p.register_post_accumulate_grad_hook(functools.partial(self._step_parameter, optimizer))

    def _share(self) -> None:
        """Make this optimizer's groups and state the per-parameter optimizers' own objects."""
        self.param_groups = [optimizer.param_groups[0] for optimizer in self.optimizers]
        self.state = defaultdict(dict)
        for optimizer in self.optimizers:
            (p,) = optimizer.param_groups[0]["params"]
            self.state[p] = optimizer.state[p]  # the dict that optimizer fills in place

    @staticmethod
    def _step_parameter(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> None:
        optimizer.step()
        param.grad = None

    def step(self, closure: None = None) -> None:
        """Nothing to do: each parameter was stepped in backward."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()`` of an optimizer over the same parameters, one group per parameter."""
        groups, states = state_dict["param_groups"], state_dict["state"]
        if len(groups) != len(self.optimizers):
            raise ValueError(f"the state dict has {len(groups)} parameter groups, this optimizer "
                             f"{len(self.optimizers)}")
        for optimizer, group in zip(self.optimizers, groups):
            (index,) = group["params"]
            optimizer.load_state_dict({"state": {0: states[index]} if index in states else {},
                                       "param_groups": [{**group, "params": [0]}]})
        self._share()


class HostAdamW(torch.optim.AdamW):
    """AdamW whose state, an fp32 copy of the parameters and the step itself live in host memory.

    The idea of DeepSpeed's ZeRO-Offload and torchao's ``CPUOffloadOptimizer``, in short: the
    optimizer works on host fp32 copies of the trainable parameters; a
    ``register_post_accumulate_grad_hook`` on each device parameter adds its gradient, in fp32, into
    the host copy's ``grad`` (so micro-batches accumulate there) and frees the device gradient.
    ``step`` runs AdamW on the host and copies the updated values into the device parameters (rounded
    to their dtype: the fp32 host copy is the master weight). The device keeps the parameters and
    one gradient at a time; the host keeps 16 bytes per trainable parameter (fp32 copy, gradient,
    two moments) and a 4-byte step count per tensor, all in ``HOST``. ``param_groups`` and
    ``state_dict`` are AdamW's own, over the host copies; ``load_state_dict`` also refreshes the
    host copies from the device parameters, so load the weights first. The copies are synchronous
    (torchao overlaps them with pinned buffers and streams).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3, **options: Any) -> None:
        self.device_params = list(params)
        host_params = [HOST.copy(p, dtype=torch.float32) for p in self.device_params]
        super().__init__(host_params, lr=lr, **options)
        for p, host_param in zip(self.device_params, host_params):
            p.register_post_accumulate_grad_hook(functools.partial(self._take_gradient, host_param))

    @staticmethod
    def _take_gradient(host_param: torch.Tensor, param: torch.Tensor) -> None:
        with HOST.computing():
            if host_param.grad is None:
                host_param.grad = HOST.copy(param.grad, dtype=torch.float32)
            else:
                host_param.grad += HOST.copy(param.grad)  # a later micro-batch: staged, then added
        param.grad = None

    def _host_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _keep_state(self) -> None:
        for state in self.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    HOST.keep(value)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        """AdamW on the host, then the new values into the device parameters."""
        with HOST.computing():
            super().step()
            self._keep_state()
        for p, host_param in zip(self.device_params, self._host_params()):
            p.copy_(host_param)

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """AdamW's ``load_state_dict`` on the host; the host copies refreshed from the device parameters."""
        with HOST.computing():
            super().load_state_dict(state_dict)
            self._keep_state()
            for p, host_param in zip(self.device_params, self._host_params()):
                host_param.copy_(p)


def make_optimizer(model: torch.nn.Module, name: OptimizerName = "adamw", lr: float = 1e-4, *, zero: bool = False,
                   step_in_backward: bool = False, offload: bool = False, **options: Any) -> torch.optim.Optimizer:
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

    ``step_in_backward=True`` makes one optimizer per parameter, stepped in backward
    (``StepInBackward``); ``offload=True`` (AdamW only) keeps AdamW's state and step on the host
    (``HostAdamW``). Neither goes with ZeRO or with the other.
    """
    cls, defaults = _optimizer_class(name)
    params = [p for p in model.parameters() if p.requires_grad]
    options = {**defaults, **options}
    if (step_in_backward or offload) and zero:
        raise ValueError("step_in_backward and offload run on one GPU: not with zero")
    if step_in_backward and offload:
        raise ValueError("step_in_backward steps on the device, offload on the host: choose one")
    if offload:
        if name != "adamw":
            raise ValueError(f"offload keeps AdamW's fp32 state on the host: not {name}")
        return HostAdamW(params, lr=lr, **options)
    if step_in_backward:
        return StepInBackward(params, functools.partial(cls, lr=lr, **options))
    if zero:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=cls, lr=lr, **options)
    return cls(params, lr=lr, **options)
