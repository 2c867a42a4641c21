"""Measure memory: the one ruler every notebook uses.

``track`` runs a block of code and records the peak bytes of the tensors it touches, split into
parameters, gradients, optimizer state, activations and temporaries. It relies on PyTorch's own
tracker (``torch.distributed._tools.mem_tracker.MemTracker``), which sees every tensor storage that
is created or freed, so the numbers are exact bytes (process RSS is not used: the allocator keeps
freed memory and under-reports peaks). On CUDA the allocator's own peak is recorded beside it.

``simulate`` runs the same training or inference step on a **real-size** config under
``FakeTensorMode``: tensors carry shapes and dtypes but no storage, so a 1.5B-parameter step is
measured on a laptop without allocating it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import asdict, dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType
from transformers import PretrainedConfig

from lowmem_course import family, steps
from lowmem_course.units import format_bytes

# MemTracker's categories, renamed to the course's words.
_CATEGORIES = {
    "Parameter": "parameters", "Buffer": "buffers", "Gradient": "gradients",
    "Optstate": "optimizer", "Activation": "activations", "Temp": "temporaries", "Other": "other",
}
CATEGORIES = tuple(_CATEGORIES.values())


@dataclass
class Measurement:
    """Peak memory of one block of code, in bytes.

    ``breakdown`` splits ``peak_bytes`` at the moment of the peak. ``allocator_peak_bytes`` is
    CUDA's ``max_memory_allocated`` over the block (None on CPU), and ``snapshot_path`` the allocator
    history file to drop on https://pytorch.org/memory_viz when one was asked for.
    """

    label: str = ""
    device: str = "cpu"
    peak_bytes: int = 0
    breakdown: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    allocator_peak_bytes: int | None = None
    snapshot_path: str | None = None

    def __str__(self) -> str:
        rows = [f"{self.label or 'measurement'} on {self.device}: peak {format_bytes(self.peak_bytes)}"]
        rows += [f"  {name:<12} {format_bytes(n)}" for name, n in self.breakdown.items() if n]
        if self.allocator_peak_bytes is not None:
            rows.append(f"  (CUDA allocator peak {format_bytes(self.allocator_peak_bytes)})")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        """A JSON-ready dict of the measurement."""
        return asdict(self)


class _Tracker(MemTracker):
    """PyTorch's MemTracker, made to work on partly frozen models (LoRA, QLoRA), and fast.

    PyTorch's version registers a gradient hook on every parameter it meets, which raises on a
    parameter that does not require gradients; this one hooks only the trainable ones. It also keeps
    only the device-wide peak (what ``track`` reports): PyTorch's updates every module's own peak
    after every operator, which made a full-size step under ``simulate`` about 4x slower.
    """

    def _update_peak_stats(self, peak_state: object) -> None:
        for dev, dev_snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < dev_snap[_TOTAL_KEY]:
                self._peak_mem[dev] = dev_snap[_TOTAL_KEY]
                self._peak_mem_snap[dev] = deepcopy(dev_snap)

    def _track_module_params_and_buffers(self, module: torch.nn.Module,
                                         install_grad_hooks: bool = True) -> tuple[int, int]:
        memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        if install_grad_hooks:
            for param in module.parameters():
                if param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(self._track_gradient),
                        param.register_post_accumulate_grad_hook(lambda p: self._track_gradient(p.grad)),
                    )
        return memory

    def _track_gradient(self, grad: torch.Tensor) -> None:
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)


def _device_of(stateful: tuple[object, ...]) -> torch.device:
    for obj in stateful:
        if isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def track(*stateful: torch.nn.Module | torch.optim.Optimizer | torch.Tensor, label: str = "",
          snapshot_path: str | None = None) -> Iterator[Measurement]:
    """Record the peak memory of the ``with`` block; the ``Measurement`` is filled in on exit.

    ``stateful`` are the models, optimizers and tensors created *before* the block whose memory
    counts (a model's parameters and gradients, an optimizer's state); everything created inside
    the block counts automatically. Example::

        with track(model, optimizer, label="fp32 step") as m:
            train_step(model, optimizer, batch)
        print(m.peak_bytes, m.breakdown["activations"])
    """
    device = _device_of(stateful)
    result = Measurement(label=label, device=str(device))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        if snapshot_path:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
    tracker = _Tracker()
    tracker.track_external(*stateful)
    with tracker:
        yield result
    snapshots = tracker.get_tracker_snapshot("peak")
    snap = snapshots.get(device) or max(snapshots.values(), key=lambda s: s["Total"], default={"Total": 0})
    result.peak_bytes = int(snap["Total"])
    result.breakdown = {name: int(snap.get(kind, 0)) for kind, name in _CATEGORIES.items()}
    if cuda:
        torch.cuda.synchronize(device)
        result.allocator_peak_bytes = torch.cuda.max_memory_allocated(device)
        if snapshot_path:
            torch.cuda.memory._dump_snapshot(snapshot_path)
            torch.cuda.memory._record_memory_history(enabled=None)
            result.snapshot_path = snapshot_path


def make_optimizer(model: torch.nn.Module, name: str = "adamw", lr: float = 1e-4) -> torch.optim.Optimizer:
    """The optimizer ``name`` ("adamw", "sgd" or "sgd-momentum") over the trainable parameters.

    AdamW uses the fused kernel, which updates in place without per-parameter temporaries, so a
    step holds exactly parameters + gradients + two moments.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, fused=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "sgd-momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}: choose adamw, sgd or sgd-momentum")


def measure_train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
                       autocast_dtype: torch.dtype | None = None, label: str = "", warmup_steps: int = 1,
                       snapshot_path: str | None = None) -> Measurement:
    """Peak memory of one training step in steady state.

    ``warmup_steps`` unmeasured steps run first, so the optimizer state already exists during the
    measured step's forward and backward, as it does for every step of a real run but the first.
    """
    for _ in range(warmup_steps):
        steps.train_step(model, optimizer, input_ids, autocast_dtype)
    with track(model, optimizer, label=label, snapshot_path=snapshot_path) as measurement:
        steps.train_step(model, optimizer, input_ids, autocast_dtype)
    return measurement


def simulate(cfg: PretrainedConfig, mode: str = "train", batch: int = 1, seq: int = 1024,
             dtype: torch.dtype = torch.float32, optimizer: str = "adamw",
             autocast_dtype: torch.dtype | None = None, label: str = "") -> Measurement:
    """Measure a real step of ``cfg`` at full size without allocating it.

    The model, optimizer and batch are fake tensors (``FakeTensorMode``); the tracker sees their
    exact sizes. ``mode`` is "train" (one steady-state training step with ``optimizer``, after one
    unmeasured warm-up step) or "inference" (a prefill forward pass that fills the KV cache).
    ``dtype`` is the dtype the parameters are built in; ``autocast_dtype`` runs the forward under
    autocast (mixed precision). Takes seconds for a 1.5B model and about a minute for 7B.
    """
    if mode not in ("train", "inference"):
        raise ValueError(f"mode must be 'train' or 'inference', got {mode!r}")
    label = label or f"{cfg.name_or_path} {mode} b={batch} s={seq} (simulated)"
    previous_dtype = torch.get_default_dtype()
    with FakeTensorMode():
        torch.set_default_dtype(dtype)
        try:
            model = family.build(cfg, device="cpu", dtype=dtype, seed=None)
        finally:
            torch.set_default_dtype(previous_dtype)
        input_ids = steps.random_batch(cfg.vocab_size, batch, seq)
        if mode == "inference":
            model.eval()
            with track(model, label=label) as measurement:
                cache = steps.prefill_step(model, input_ids)
                del cache
            return measurement
        opt = make_optimizer(model, optimizer)
        return measure_train_step(model, opt, input_ids, autocast_dtype=autocast_dtype, label=label)
