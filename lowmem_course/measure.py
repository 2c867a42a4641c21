"""Measure memory: the one ruler every notebook uses.

``track`` runs a block of code and records the peak bytes of the tensors it touches, split into
parameters, gradients, optimizer state, activations and temporaries. It relies on PyTorch's own
tracker (``torch.distributed._tools.mem_tracker.MemTracker``), which sees every tensor storage that
is created or freed, so the numbers are exact bytes (process RSS is not used: the allocator keeps
freed memory and under-reports peaks). On CUDA the allocator's own peak is recorded beside it.

``simulate`` runs the same training or inference step on a **real-size** config under
``FakeTensorMode``: tensors carry shapes and dtypes but no storage, so a 1.5B-parameter step is
measured on a laptop without allocating it.

Device bytes and host bytes. Offloading techniques hand each tensor they move to host RAM to
``host.HOST`` (see ``lowmem_course.host``). The tracker skips the storages ``HOST`` holds and the
tensors made under ``HOST.computing()``, so ``peak_bytes`` and its breakdown are device bytes, and
``track`` reports the peak of the bytes ``HOST`` held as ``Measurement.host_peak_bytes``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType
from torch.distributed.tensor import DTensor
from transformers import PretrainedConfig

from lowmem_course import family, steps
from lowmem_course.host import HOST
from lowmem_course.optimizers import OptimizerName, make_optimizer  # measure.make_optimizer: the one factory
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

    ``breakdown`` splits ``peak_bytes`` (device bytes) at the moment of the peak. ``host_peak_bytes``
    is the peak of the host bytes offloaded tensors held during the block (``HOST``).
    ``allocator_peak_bytes`` is CUDA's ``max_memory_allocated`` over the block (None on CPU), and
    ``snapshot_path`` the allocator history file to drop on https://pytorch.org/memory_viz when one
    was asked for.
    """

    label: str = ""
    device: str = "cpu"
    peak_bytes: int = 0
    breakdown: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    allocator_peak_bytes: int | None = None
    snapshot_path: str | None = None
    host_peak_bytes: int = 0

    def __str__(self) -> str:
        rows = [f"{self.label or 'measurement'} on {self.device}: peak {format_bytes(self.peak_bytes)}"]
        rows += [f"  {name:<12} {format_bytes(n)}" for name, n in self.breakdown.items() if n]
        if self.host_peak_bytes:
            rows.append(f"  host peak    {format_bytes(self.host_peak_bytes)} (offloaded)")
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
                        param.register_post_accumulate_grad_hook(self._track_accumulated),
                    )
        return memory

    def _pre_fw_hook(self, module: torch.nn.Module, inputs: object) -> None:
        # PyTorch's refuses a module that runs again at the top level, taking it for the next
        # iteration mixed into this one's per-module stats. ``track`` reads only the device-wide peak,
        # so each forward call starts the module's stats afresh: one step may run the model once per
        # micro-batch, or the LM head once per chunk of the loss.
        if not self._mod_tracker.is_bw:
            self.memory_tracking.pop(module, None)
        super()._pre_fw_hook(module, inputs)

    def _track_gradient(self, grad: torch.Tensor) -> None:
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

    def _track_accumulated(self, param: torch.Tensor) -> None:
        if param.grad is not None:  # None when an earlier hook took it (a step in backward, an offloaded optimizer)
            self._track_gradient(param.grad)

    # Host memory (``HOST``) is not device memory: skip what it holds and what is made on the host.
    def _track(self, reftype: object, t: torch.Tensor) -> None:
        if not (HOST.is_computing or HOST.holds(t)):
            super()._track(reftype, t)

    def _update_and_maybe_create_winfos(self, t: torch.Tensor, reftype: object,
                                        update_existing: bool = False) -> set:
        if HOST.is_computing or HOST.holds(t):
            return set()
        return super()._update_and_maybe_create_winfos(t, reftype, update_existing)


def _device_of(stateful: tuple[object, ...]) -> torch.device:
    for obj in stateful:
        if isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                return p.device
    return torch.device("cpu")


def _host_bytes(stateful: tuple[object, ...]) -> int:
    """Bytes of the ``HOST`` storages that ``stateful`` holds: an optimizer's parameters, their
    gradients and its state (``optimizers.HostAdamW`` keeps them on the host), a module's own tensors."""
    tensors: list[torch.Tensor] = []
    for obj in stateful:
        if isinstance(obj, torch.optim.Optimizer):
            params = [p for group in obj.param_groups for p in group["params"]]
            tensors += params + [p.grad for p in params if p.grad is not None]
            tensors += [v for state in obj.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        elif isinstance(obj, torch.nn.Module):
            tensors += [*obj.parameters(), *obj.buffers()]
        elif isinstance(obj, torch.Tensor):
            tensors.append(obj)
    return storage_bytes(*[t for t in tensors if HOST.holds(t)])


@contextlib.contextmanager
def track(*stateful: torch.nn.Module | torch.optim.Optimizer | torch.Tensor, label: str = "",
          snapshot_path: str | None = None) -> Iterator[Measurement]:
    """Record the peak memory of the ``with`` block; the ``Measurement`` is filled in on exit.

    ``stateful`` are the models, optimizers and tensors created *before* the block whose memory
    counts (a model's parameters and gradients, an optimizer's state); everything created inside
    the block counts automatically. Host bytes count the same way: those ``stateful`` holds in
    ``HOST`` (an offloaded optimizer's state) plus what ``HOST`` gains inside the block, so host
    storages left over from earlier work do not count (blocks do not nest: each resets ``HOST``'s
    peak). Example::

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
    host_stateful = _host_bytes(stateful)
    HOST.reset_peak()
    with tracker:
        yield result
    result.host_peak_bytes = host_stateful + HOST.peak
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


def _arrays(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The dense arrays that hold ``tensor``: itself, a DTensor's local shard, or a sparse tensor's parts."""
    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    if tensor.layout == torch.strided:
        return (tensor,)
    if tensor.layout == torch.sparse_coo:
        return tensor._values(), tensor._indices()  # as stored, coalesced or not
    if tensor.layout in (torch.sparse_csr, torch.sparse_bsr):
        return tensor.values(), tensor.crow_indices(), tensor.col_indices()
    if tensor.layout in (torch.sparse_csc, torch.sparse_bsc):
        return tensor.values(), tensor.ccol_indices(), tensor.row_indices()
    raise ValueError(f"storage_bytes cannot read a tensor of layout {tensor.layout}")


def storage_bytes(*tensors: torch.Tensor, counted: set[tuple[str, int]] | None = None) -> int:
    """Bytes of the distinct storages that hold ``tensors``, each storage counted once.

    Storages, not ``numel``: a view counts the whole storage it views, tensors that share a storage
    (tied weights, DDP's gradient bucket views, FSDP's padded shards) count it once. A sparse tensor
    counts its arrays (COO: values and indices; CSR/BSR: values, row pointers and column indices;
    CSC/BSC likewise), a DTensor the local shard this rank holds. ``counted`` (updated in place)
    holds the storages counted by earlier calls, which are not counted again: several calls then
    split one total, as ``quantize.storage_breakdown`` does.
    """
    counted = set() if counted is None else counted
    total = 0
    for tensor in tensors:
        for array in _arrays(tensor):
            storage = array.untyped_storage()
            key = (str(storage.device), storage.data_ptr())
            if key not in counted:
                counted.add(key)
                total += storage.nbytes()
    return total


StepFunction = Callable[[torch.nn.Module, torch.optim.Optimizer, torch.Tensor], object]


def measure_train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
                       autocast_dtype: torch.dtype | None = None, label: str = "", warmup_steps: int = 1,
                       snapshot_path: str | None = None, step: StepFunction | None = None) -> Measurement:
    """Peak memory of one training step in steady state.

    ``warmup_steps`` unmeasured steps run first, so the optimizer state already exists during the
    measured step's forward and backward, as it does for every step of a real run but the first.
    ``step(model, optimizer, input_ids)`` is the step measured; the default is ``steps.train_step``
    under autocast in ``autocast_dtype``. Pass your own (a loss scaler, labels, a chunked loss) and
    give it its autocast dtype yourself.
    """
    if step is None:
        step = functools.partial(steps.train_step, autocast_dtype=autocast_dtype)
    elif autocast_dtype is not None:
        raise ValueError("autocast_dtype applies to the default step only: pass it to your step instead")
    for _ in range(warmup_steps):
        step(model, optimizer, input_ids)
    with track(model, optimizer, label=label, snapshot_path=snapshot_path) as measurement:
        step(model, optimizer, input_ids)
    return measurement


def simulate(cfg: PretrainedConfig, mode: Literal["train", "inference"] = "train", batch: int = 1, seq: int = 1024,
             dtype: torch.dtype = torch.float32, optimizer: OptimizerName = "adamw",
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
