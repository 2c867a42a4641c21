"""Host memory: where offloaded tensors live, counted apart from the device's.

Offloading techniques move tensors from the GPU to host RAM: saved activations (``offloaded``, here),
optimizer state (``optimizers.HostAdamW``). On a GPU the two memories are different devices; on a
CPU-only machine they are the same RAM, so the course keeps them apart the one honest way it can:
a technique hands each tensor it offloads to ``HOST`` (``HOST.copy``, or ``HOST.keep`` for one it
made under ``HOST.computing()``, where the host does the work). ``HOST`` counts the bytes it holds
and their peak; ``measure.track`` skips those storages and whatever is made under
``HOST.computing()``, and reports the peak as ``Measurement.host_peak_bytes``. Bringing a tensor
back is an ordinary copy, counted as device bytes, as the host-to-device copy on a GPU allocates
device memory.

This module sits below ``measure`` and the techniques, so both can import it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch.multiprocessing.reductions import StorageWeakRef

# Saved tensors smaller than this stay on the device (torchtune's ``OffloadActivations`` default):
# each copy costs a transfer's fixed latency (microseconds) for no memory worth having; in a decoder
# they are the norms' per-token 1/rms of a short sequence, rotary tables and scalars.
MIN_OFFLOAD_BYTES = 1024


class HostPool:
    """The host memory that offloaded tensors occupy, counted beside the tracker's device pool.

    ``bytes`` is what the storages it holds take now. ``peak`` is the most that the storages kept
    since ``reset_peak`` held at once: storages kept before do not count, and freeing one of them
    (earlier work collected by the garbage collector) does not lower it. A storage is held from
    ``keep`` until the last tensor on it is freed. See the module docstring.
    """

    def __init__(self) -> None:
        self.bytes = 0
        self.peak = 0
        self._held: dict[int, tuple[int, int]] = {}  # storage key -> (bytes, the period it was kept in)
        self._period = 0  # how many times reset_peak ran
        self._period_bytes = 0  # held by the storages kept in this period
        self._computing = 0

    @staticmethod
    def _key(tensor: torch.Tensor) -> int:
        return StorageWeakRef(tensor.untyped_storage()).cdata

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """Count ``tensor``'s storage as host bytes (once) until it is freed; returns ``tensor``."""
        storage = tensor.untyped_storage()
        key = self._key(tensor)
        if key not in self._held:
            self._held[key] = storage.nbytes(), self._period
            self.bytes += storage.nbytes()
            self._period_bytes += storage.nbytes()
            self.peak = max(self.peak, self._period_bytes)
            weakref.finalize(storage, self._release, key)
        return tensor

    def _release(self, key: int) -> None:
        n_bytes, period = self._held.pop(key, (0, -1))
        self.bytes -= n_bytes
        if period == self._period:
            self._period_bytes -= n_bytes

    def holds(self, tensor: torch.Tensor) -> bool:
        """True when ``tensor`` lives in a storage this pool counts."""
        return self._key(tensor) in self._held

    @property
    def is_computing(self) -> bool:
        """True inside ``computing()``."""
        return self._computing > 0

    @contextlib.contextmanager
    def computing(self) -> Iterator[None]:
        """A block whose operations run on the host: what they make is not device memory (the
        tracker skips it); ``keep`` what should count as host bytes."""
        self._computing += 1
        try:
            yield
        finally:
            self._computing -= 1

    def copy(self, tensor: torch.Tensor, pin_memory: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A host copy of ``tensor`` with its strides, in ``dtype`` (default: its own), counted as host bytes.

        Pinned when asked, for a CUDA source: the copy is then asynchronous, so synchronize before the
        host reads it (the copy back to the GPU is ordered after it on the same stream).
        """
        with self.computing():
            host = torch.empty_like(tensor, dtype=dtype, device="cpu", pin_memory=pin_memory)
            host.copy_(tensor.detach(), non_blocking=pin_memory)
        return self.keep(host)

    def reset_peak(self) -> None:
        """Start a new peak, of the storages kept from now on."""
        self._period += 1
        self._period_bytes = self.peak = 0


HOST = HostPool()  # the one host pool: techniques put offloaded tensors here, ``measure.track`` reads its peak


def _is_parameter(tensor: torch.Tensor) -> bool:
    """A parameter or a view of one (``weight.t()``): resident on the device whatever autograd saves."""
    return isinstance(tensor, torch.nn.Parameter) or isinstance(tensor._base, torch.nn.Parameter)


class OffloadedActivations(torch.autograd.graph.saved_tensors_hooks):
    """A context in which the tensors autograd saves for backward are kept in host memory (``HOST``).

    Forward copies each saved tensor of at least ``min_bytes`` to the host (pinned on CUDA, so the
    copies can run asynchronously) and backward copies it back to its device when the node that saved
    it runs; the host copy is freed with that node. As in torchtune's ``OffloadActivations``,
    parameters stay: the weights are resident on the device anyway, so copying them would cost
    transfers and host memory for nothing (``save_on_cpu`` copies them too); so do views of them and
    small tensors (``MIN_OFFLOAD_BYTES``). A tensor that several operations save (the normed input of
    q, k and v) is copied once. Under non-reentrant activation checkpointing a checkpointed layer
    saves only its inputs, and it saves them through this context: the layers' inputs go to the host,
    which is Unsloth's "offloaded gradient checkpointing". Values are unchanged: gradients are
    bitwise those of the step without it.
    """

    def __init__(self, device: str | torch.device, min_bytes: int = MIN_OFFLOAD_BYTES) -> None:
        self.pin_memory = torch.device(device).type == "cuda"
        self.min_bytes = min_bytes
        self._copies: dict[tuple, tuple[StorageWeakRef, torch.Tensor]] = {}  # saved tensor -> its host copy
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor | tuple[torch.device, torch.Tensor]:
        if _is_parameter(tensor) or tensor.numel() * tensor.element_size() < self.min_bytes:
            return tensor
        storage = StorageWeakRef(tensor.untyped_storage())
        key = (storage.cdata, tensor.storage_offset(), tensor.shape, tensor.stride(), tensor.dtype, tensor._version)
        known = self._copies.get(key)
        if known is None or known[0].expired():  # a storage freed since, its address reused: not the same tensor
            known = self._copies[key] = (storage, HOST.copy(tensor, pin_memory=self.pin_memory))
        return tensor.device, known[1]

    def _unpack(self, packed: torch.Tensor | tuple[torch.device, torch.Tensor]) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=self.pin_memory, copy=True)

    def __exit__(self, *args: object) -> None:
        self._copies.clear()  # the graph holds the copies from here on, and frees each after its node
        super().__exit__(*args)


def offloaded(device: str | torch.device) -> OffloadedActivations:
    """The context that keeps what forward saves for backward in host memory (``OffloadedActivations``)
    for a model on ``device``: wrap the forward pass (and the loss) in it; backward runs outside."""
    return OffloadedActivations(device)
