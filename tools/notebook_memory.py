"""Peak memory of each notebook's kernel, for the README (Binder machines have about 2 GB of RAM).

Each notebook runs top to bottom on a fresh kernel, in its own subprocess, executed with nbclient;
the stored notebook is not modified. The peak is the kernel's peak resident set size as the
operating system counted it (``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of the process that started
and reaped the kernel; Linux). That is the number a memory limit such as Binder's acts on, unlike
the tensor bytes the notebooks measure. A subprocess the kernel starts (``torchrun`` workers) counts
as its own process: the largest one is reported, not their sum.

    python tools/notebook_memory.py               # every notebook, as a markdown table
    python tools/notebook_memory.py 00 03         # the notebooks whose names start with these
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lowmem_course.doctor import MIN_FREE_MEMORY as BINDER_MEMORY  # bytes: what a mybinder.org session gets
from lowmem_course.units import GiB

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

# Runs inside the subprocess: execute the notebook on a fresh "python3" kernel of that interpreter,
# then print the peak RSS of its reaped children (the kernel), which Linux reports in KiB.
RUNNER = """
import resource, sys
from pathlib import Path
import nbformat
from nbclient import NotebookClient
path = Path(sys.argv[1])
notebook = nbformat.read(path, as_version=4)
NotebookClient(notebook, timeout=int(sys.argv[2]), kernel_name="python3",
               resources={"metadata": {"path": str(path.parent)}}).execute()
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


@dataclass(frozen=True)
class NotebookRun:
    """One notebook's run: its kernel's peak RSS in bytes and its wall time in seconds."""

    notebook: Path
    peak_rss_bytes: int
    seconds: float


def run_notebook(notebook: Path, python: str = sys.executable, timeout_s: int = 600) -> NotebookRun:
    """Execute ``notebook`` on a fresh kernel of ``python`` in a subprocess; measure its kernel.

    Raises ``RuntimeError`` with the subprocess's output when the notebook fails.
    """
    if not notebook.is_file():
        raise FileNotFoundError(f"no notebook at {notebook}")
    started = time.perf_counter()
    done = subprocess.run([python, "-c", RUNNER, str(notebook), str(timeout_s)], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{notebook.name} failed in {python}:\n{done.stdout[-4000:]}{done.stderr[-4000:]}")
    return NotebookRun(notebook, int(done.stdout.split()[-1]), seconds)


def markdown_table(runs: list[NotebookRun]) -> str:
    """The README table: notebook, kernel peak RSS (GiB), run time (s), whether it fits Binder's 2 GB."""
    rows = ["| notebook | kernel peak RSS | run time | fits Binder (2 GB) |", "|---|---|---|---|"]
    rows += [f"| {r.notebook.stem} | {r.peak_rss_bytes / GiB:.2f} GiB | {r.seconds:.0f} s | "
             f"{'yes' if r.peak_rss_bytes < BINDER_MEMORY else 'no'} |" for r in runs]
    return "\n".join(rows)


def main(prefixes: list[str]) -> None:
    notebooks = sorted(NOTEBOOKS.glob("*.ipynb"))
    chosen = [n for n in notebooks if not prefixes or any(n.stem.startswith(p) for p in prefixes)]
    if not chosen:
        sys.exit(f"no notebook matches {prefixes} in {NOTEBOOKS}")
    print(markdown_table([run_notebook(n) for n in chosen]))


if __name__ == "__main__":
    main(sys.argv[1:])
