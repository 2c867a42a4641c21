"""Run the stored notebooks under several CPU kernel sets and thread counts; list the cells that differ.

nbval compares each cell's output with the stored one. This runs that comparison under PyTorch's
portable scalar kernels (``ATEN_CPU_CAPABILITY=default``) and AVX2 kernels, each with 1 and 2
threads, and with this machine's native kernels: one pytest process per setting, without
pytest-xdist's workers (they compute on one thread); each setting takes minutes. An output that
differs anywhere must be printed behind ``≈`` or excluded, and its claim asserted with a tolerance
(CONTRIBUTING.md).

    python tools/check_kernels.py                  # every notebook and solution
    python tools/check_kernels.py 03 solutions/03  # notebooks whose paths under notebooks/ start with these
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [("default", 1), ("default", 2), ("avx2", 1), ("avx2", 2), ("native", 2)]
FAILED = re.compile(r"^FAILED (.+?)(?: - .*)?$", re.MULTILINE)


def notebooks(prefixes: list[str]) -> list[str]:
    """Paths (relative to the repository) of the stored notebooks whose names start with ``prefixes``."""
    stored = sorted(p.relative_to(ROOT / "notebooks").as_posix() for p in (ROOT / "notebooks").rglob("*.ipynb")
                    if ".ipynb_checkpoints" not in p.parts)
    chosen = [p for p in stored if not prefixes or any(p.startswith(x) for x in prefixes)]
    if not chosen:
        sys.exit(f"no stored notebook matches {prefixes}")
    return [f"notebooks/{p}" for p in chosen]


def failed_cells(paths: list[str], capability: str, threads: int, log: Path) -> list[str]:
    """The nbval items that fail under one kernel set and thread count ("native": this CPU's own);
    the whole pytest output goes to ``log``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability != "native":
        env["ATEN_CPU_CAPABILITY"] = capability
    else:  # conftest.py would pick the portable kernels when the variable is unset
        env["ATEN_CPU_CAPABILITY"] = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability().lower())"],
            capture_output=True, text=True, check=True).stdout.strip()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", *paths], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    log.write_text(done.stdout + done.stderr)
    return FAILED.findall(done.stdout)


def main(prefixes: list[str]) -> int:
    paths = notebooks(prefixes)
    logs = Path(tempfile.mkdtemp(prefix="check-kernels-"))
    differing = 0
    for capability, threads in SETTINGS:
        log = logs / f"{capability}-{threads}.log"
        failed = failed_cells(paths, capability, threads, log)
        differing += len(failed)
        print(f"{capability:<8} {threads} thread(s): " + (", ".join(failed) if failed else "every cell matches")
              + f"  ({log})", flush=True)
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
