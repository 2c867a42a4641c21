"""Host memory: where offloaded tensors live, counted apart from the device's.

Offloading techniques move tensors from the GPU to host RAM. On a GPU the two memories are different devices; on a
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


class HostPool:
    """The host memory that offloaded tensors occupy, counted beside the tracker's device pool.

    ``bytes`` is what the storages it holds take now, ``peak`` the most since ``reset_peak``. A
    storage is held from ``keep`` until the last tensor on it is freed. See the module docstring.
    """

    def __init__(self) -> None:
        self.bytes = 0
        self.peak = 0
        self._held: dict[int, int] = {}  # storage key -> bytes
        self._computing = 0

    @staticmethod
    def _key(tensor: torch.Tensor) -> int:
        return StorageWeakRef(tensor.untyped_storage()).cdata

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """Count ``tensor``'s storage as host bytes (once) until it is freed; returns ``tensor``."""
        storage = tensor.untyped_storage()
        key = self._key(tensor)
        if key not in self._held:
            self._held[key] = storage.nbytes()
            self.bytes += storage.nbytes()
            self.peak = max(self.peak, self.bytes)
            weakref.finalize(storage, self._release, key)
        return tensor

    def _release(self, key: int) -> None:
        self.bytes -= self._held.pop(key, 0)

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
        """Start a new peak from the bytes held now."""
        self.peak = self.bytes


HOST = HostPool()  # the one host pool: techniques put offloaded tensors here, ``measure.track`` reads its peak
