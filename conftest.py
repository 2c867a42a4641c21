"""pytest set-up shared by the package's tests and the notebooks (run by nbval).

- **Notebooks run on another CPU's kernels.** Their stored outputs are built with this machine's
  native kernels (AVX-512, AVX2, NEON, ...); nbval runs each notebook's kernel with
  ``ATEN_CPU_CAPABILITY=default``, PyTorch's portable scalar kernels, so an output whose digits
  depend on the CPU fails here and never lands. Set ``ATEN_CPU_CAPABILITY`` yourself (``avx2``,
  ``avx512``) to run them on another kernel set; the package's tests keep the native kernels. The
  kernels also get ``TQDM_DISABLE=1``, as when the notebooks are built: no progress bar
  (``lab.progress``) in the outputs compared.
- **Two or more processes**: pytest-xdist runs the files on up to 4 workers (``-n auto`` in
  pyproject.toml), each file on one worker (``--dist loadfile``: a notebook's cells share a kernel).
  Each worker, and every kernel or subprocess it starts, computes on one thread
  (``OMP_NUM_THREADS=1``): workers that each spun up a thread per core would fight over the cores.
- **Markers**: ``slow`` (over about 10 s), ``browser`` (headless Chromium), ``binder`` (a fresh
  virtual environment), ``gpu`` (a CUDA GPU). Every notebook cell is ``slow``, so
  ``pytest -m "not slow"`` is the quick subset a developer runs between edits.
- **Binder's memory**: after each notebook, its kernel's peak resident memory (Linux) must be
  under a Binder machine's 2 GiB.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lowmem_course.doctor import MIN_FREE_MEMORY

NOTEBOOK_CPU_CAPABILITY = "default"  # what the notebooks' kernels run on unless ATEN_CPU_CAPABILITY is set


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # a pytest-xdist worker
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def _is_notebook_cell(item: pytest.Item) -> bool:
    return item.nodeid.split("::")[0].endswith(".ipynb")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _is_notebook_cell(item):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    """Start a notebook's kernel (nbval does it in the first cell's set-up) on the portable kernels,
    without progress bars; a variable already set is kept."""
    if not _is_notebook_cell(item):
        return (yield)
    added = {k: v for k, v in {"ATEN_CPU_CAPABILITY": NOTEBOOK_CPU_CAPABILITY, "TQDM_DISABLE": "1"}.items()
             if k not in os.environ}
    os.environ.update(added)  # the kernel process copies the environment
    try:
        return (yield)
    finally:
        for name in added:
            del os.environ[name]


def _kernel_peak_rss(notebook: pytest.Collector) -> int | None:
    """Peak resident memory (bytes) of a running nbval kernel so far, from Linux's ``VmHWM``; None
    where the kernel or ``/proc`` is not there."""
    try:
        pid = notebook.kernel.km.provisioner.process.pid
        status = Path(f"/proc/{pid}/status").read_text()
    except (AttributeError, OSError):
        return None
    kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return None if kib is None else kib * 1024


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    """After a notebook's last cell, before nbval stops its kernel: the kernel must have fitted a
    Binder machine (``doctor.MIN_FREE_MEMORY``, 2 GiB) for the whole run."""
    last_cell = _is_notebook_cell(item) and (nextitem is None or nextitem.parent is not item.parent)
    peak = _kernel_peak_rss(item.parent) if last_cell else None
    result = yield
    if peak is not None and peak >= MIN_FREE_MEMORY:
        raise AssertionError(f"{item.parent.name}: the kernel's peak RSS was {peak / 2**30:.2f} GiB, "
                             f"over a Binder machine's {MIN_FREE_MEMORY / 2**30:.0f} GiB")
    return result
