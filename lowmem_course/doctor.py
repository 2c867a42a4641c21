"""``lowmem doctor``: what an instructor checks before a workshop, on the machine the course will run on.

It reports Python and library versions (against what the installed package requires), the device
and whether bf16 autocast works on it, the bitsandbytes backend (and a real 4-bit round trip), free
memory and disk, whether the shipped students and adapters are the files the package shipped (their
sha256 against ``students/MANIFEST.sha256``) and whether the students load. Every line comes from trying the
thing, not from reading a flag. It exits 1, printing the fix, when something a notebook needs is
missing::

    python -m lowmem_course.doctor          # or: lowmem doctor

``summary()`` is the short form (a few lines) that a notebook's setup can print.
"""

from __future__ import annotations

import io
import os
import platform
import shutil
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, metadata, requires, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from lowmem_course import family
from lowmem_course.cmdline import Parser
from lowmem_course.units import GiB, format_bytes

PACKAGE = "lowmem-course"
STUDENTS = tuple(family.STUDENT_ARCHS)  # the shipped students' architectures
MIN_FREE_MEMORY = 2 * GiB  # bytes: a Binder machine's size; tools/notebook_memory.py measures each kernel against it
MIN_FREE_DISK = 1 * GiB  # bytes: room for the notebooks' temporary checkpoints and caches
INSTALL_FIX = 'pip install -e ".[lab]"   (from the course repository; on Colab the first cell does it)'

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, its status (ok / warn / FAIL), what was found, the fix."""

    name: str
    status: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        """The report line, with the fix on its own indented line when there is one."""
        text = f"{self.status:<5} {self.name:<22} {self.detail}"
        return text + (f"\n      fix: {self.fix}" if self.fix and self.status != OK else "")


def _requirements(extra: str | None) -> list[Requirement]:
    """The installed package's requirements: the core ones (``extra=None``) or one extra's."""
    found = []
    for text in requires(PACKAGE) or []:
        req = Requirement(text)
        wanted = req.marker is None if extra is None else (
            req.marker is not None and req.marker.evaluate({"extra": extra}))
        if wanted:
            found.append(req)
    return found


def check_python() -> Check:
    """Python against the package's ``Requires-Python``."""
    needed = SpecifierSet(metadata(PACKAGE)["Requires-Python"] or "")
    here = platform.python_version()
    if here in needed:
        return Check("python", OK, f"{here} ({sys.executable})")
    return Check("python", FAIL, f"{here}, the course needs {needed}", f"use a Python {needed}")


def check_requirement(req: Requirement, severity: str = FAIL, fix: str = INSTALL_FIX) -> Check:
    """One requirement: installed, and at a version its specifier allows (``severity`` when not)."""
    try:
        here = version(req.name)
    except PackageNotFoundError:
        return Check(req.name, severity, f"missing (needs {req.specifier or 'any version'})", fix)
    if req.specifier and not req.specifier.contains(here, prereleases=True):
        return Check(req.name, severity, f"{here}, needs {req.specifier}", f'pip install "{req}"')
    return Check(req.name, OK, here)


def check_device() -> Check:
    """The device the notebooks will use, with its memory on CUDA."""
    import torch

    device = family.get_device()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return Check("device", OK, f"cuda: {props.name}, {format_bytes(props.total_memory)}")
    cores = os.cpu_count()
    note = "the notebooks run their tiny twins on the CPU" if device.type == "cpu" else ""
    return Check("device", OK, f"{device.type}, {cores} cores, torch CPU capability "
                 f"{torch.backends.cpu.get_cpu_capability()}" + (f" ({note})" if note else ""))


def check_bf16() -> Check:
    """Whether a bf16 autocast matmul on the device really computes in bf16."""
    import torch

    device = family.get_device()
    try:
        x = torch.ones(16, 16, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = x @ x
    except RuntimeError as error:
        return Check("bf16 autocast", WARN, f"fails on {device.type}: {str(error).splitlines()[0]}",
                     "the mixed-precision notebook falls back to fp32 numbers only")
    if out.dtype != torch.bfloat16 or out[0, 0].item() != 16:
        return Check("bf16 autocast", WARN, f"autocast on {device.type} gave {out.dtype}",
                     "the mixed-precision notebook will not show bf16 savings here")
    native = device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)
    return Check("bf16 autocast", OK, f"works on {device.type}" + ("" if native else " (emulated: slow)"))


def check_bitsandbytes() -> Check:
    """The bitsandbytes backend, and a real 4-bit NF4 quantize/dequantize round trip on the device."""
    noise = io.StringIO()
    try:
        with redirect_stderr(noise), redirect_stdout(noise):  # its import logs optional-kernel notes
            import bitsandbytes as bnb
            import bitsandbytes.functional as F
            import torch

            backend = getattr(bnb.cextension, "BNB_BACKEND", "unknown")
            weight = torch.linspace(-1, 1, 4096, device=family.get_device()).reshape(64, 64)
            packed, state = F.quantize_4bit(weight, quant_type="nf4")
            error = (F.dequantize_4bit(packed, state) - weight).abs().max().item()
    except Exception as failure:
        return Check("bnb 4-bit", FAIL, f"4-bit round trip failed: {type(failure).__name__}: {failure}",
                     "pip install -U bitsandbytes (0.45+ has CPU support)")
    if error > 0.2:
        return Check("bnb 4-bit", FAIL, f"backend {backend}: NF4 round trip error {error:.3f} (> 0.2)",
                     "pip install -U bitsandbytes")
    return Check("bnb 4-bit", OK, f"backend {backend}, "
                 f"{packed.numel() * packed.element_size()} bytes for 4096 NF4 weights")


def available_memory() -> int:
    """Memory a new process can use now, in bytes (MemAvailable on Linux, via psutil where installed)."""
    try:
        import psutil
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return psutil.virtual_memory().available


def check_memory(free: int | None = None) -> Check:
    """Free memory (bytes) against ``MIN_FREE_MEMORY``."""
    free = available_memory() if free is None else free
    if free < MIN_FREE_MEMORY:
        return Check("free memory", FAIL, f"{format_bytes(free)}, the notebooks need {format_bytes(MIN_FREE_MEMORY)}",
                     "close other programs or use a machine with more memory")
    return Check("free memory", OK, format_bytes(free))


def check_disk(path: Path | None = None) -> Check:
    """Free disk (bytes) where the notebooks write, against ``MIN_FREE_DISK``."""
    path = path or Path.cwd()
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_DISK:
        return Check("free disk", WARN, f"{format_bytes(free)} at {path}",
                     f"free at least {format_bytes(MIN_FREE_DISK)}")
    return Check("free disk", OK, f"{format_bytes(free)} at {path}")


def check_student(arch: str) -> Check:
    """Whether the shipped student of ``arch`` and its tokenizer load offline, as ``student.load_student`` does."""
    from lowmem_course.student import student_dir

    name, path = f"student {arch}", student_dir(arch)
    fix = (f"reinstall the course package from the repository (the students ship in "
           f"lowmem_course/students/), or train one: python -m lowmem_course.student train --arch {arch} --out DIR")
    if not path.is_dir():
        return Check(name, FAIL, f"not shipped: no {path}", fix)
    try:
        with redirect_stderr(io.StringIO()):
            model = family.load(path)
            family.load_tokenizer(path)
    except Exception as failure:
        return Check(name, FAIL, f"does not load: {type(failure).__name__}: {failure}", fix)
    n = sum(p.numel() for p in model.parameters())
    return Check(name, OK, f"{type(model).__name__}, {n:,} parameters")


def check_shipped_files() -> Check:
    """The shipped students and adapters against the sha256 of ``students/MANIFEST.sha256``."""
    from lowmem_course import integrity

    fix = "reinstall the course package (git checkout lowmem_course/students, then pip install -e .)"
    try:
        changed = integrity.shipped_changes()
    except (OSError, ValueError) as failure:
        return Check("shipped files", FAIL, str(failure), fix)
    if changed:
        return Check("shipped files", FAIL, f"{len(changed)} differ from {integrity.MANIFEST} or are missing: "
                     + ", ".join(changed), fix)
    count = len(integrity.read_manifest(family.STUDENTS_DIR / integrity.MANIFEST))
    return Check("shipped files", OK, f"{count} files match {integrity.MANIFEST}")


def check_installed() -> list[Check]:
    """Python and every requirement against the installed package's metadata (FAIL when it is not installed)."""
    try:
        version(PACKAGE)
    except PackageNotFoundError:
        return [Check(PACKAGE, FAIL, "not installed (imported from a source tree?)", INSTALL_FIX)]
    lab = [check_requirement(r, WARN, INSTALL_FIX + "  (needed to open the notebooks locally)")
           for r in _requirements("lab")]
    return [check_python(), *[check_requirement(r) for r in _requirements(None)], *lab]


def run_checks() -> list[Check]:
    """Every check, in report order."""
    checks = [*check_installed(), check_device(), check_bf16(), check_bitsandbytes(), check_memory(), check_disk()]
    return checks + [check_shipped_files()] + [check_student(arch) for arch in STUDENTS]


def report(checks: list[Check]) -> str:
    """The full report: one line per check, then the verdict."""
    failed = [c for c in checks if c.status == FAIL]
    verdict = (f"{len(failed)} problem(s): fix them before the workshop" if failed
               else "ready: every notebook's requirement is met")
    return "\n".join([*(c.line() for c in checks), verdict])


def summary(checks: list[Check] | None = None) -> str:
    """A few lines for a notebook's setup: versions, device and bf16, memory, students, verdict."""
    checks = checks if checks is not None else run_checks()
    by_name = {c.name: c for c in checks}
    versions = ", ".join(f"{n} {by_name[n].detail}" for n in ("python", "torch", "transformers", "bitsandbytes")
                         if n in by_name)
    problems = [f"{c.name}: {c.detail}" for c in checks if c.status == FAIL]
    lines = [
        versions.replace(f" ({sys.executable})", ""),
        f"{by_name['device'].detail.split(',')[0]}; bf16 autocast {by_name['bf16 autocast'].status}; "
        f"free memory {by_name['free memory'].detail}",
        "students: " + ", ".join(f"{a} {by_name[f'student {a}'].status}"
                                 for a in STUDENTS if f"student {a}" in by_name),
        ("doctor: ready" if not problems else "doctor: " + "; ".join(problems) + "  (run `lowmem doctor` for the fix)"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``lowmem doctor [--short]``: print the report; return 1 when a notebook requirement fails."""
    parser = Parser(prog="lowmem doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="print the few-line summary only")
    args = parser.parse_args(argv)
    checks = run_checks()
    print(summary(checks) if args.short else report(checks))
    return 1 if any(c.status == FAIL for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
