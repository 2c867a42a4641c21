"""`lowmem doctor`: each check reports what it finds, and the exit code says whether a notebook would fail."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import tomllib
import torch
from packaging.requirements import Requirement

from lowmem_course import doctor, family, student
from lowmem_course.reasoning import make_tokenizer
from lowmem_course.units import GiB

ROOT = Path(__file__).resolve().parents[1]


def test_core_requirements_are_pyprojects_dependencies():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    expected = {(r.name, r.specifier) for r in map(Requirement, pyproject)}
    assert {(r.name, r.specifier) for r in doctor._requirements(None)} == expected


def test_missing_package_fails_with_the_install_fix():
    check = doctor.check_requirement(Requirement("no-such-package-lowmem>=1.2"))
    assert (check.status, check.detail, check.fix) == ("FAIL", "missing (needs >=1.2)", doctor.INSTALL_FIX)
    assert check.line().splitlines()[1] == f"      fix: {doctor.INSTALL_FIX}"


def test_too_old_package_fails_and_names_the_needed_version():
    here = version("torch")
    check = doctor.check_requirement(Requirement("torch>=999"))
    assert (check.status, check.detail, check.fix) == ("FAIL", f"{here}, needs >=999", 'pip install "torch>=999"')


def test_installed_package_is_ok_with_its_version():
    check = doctor.check_requirement(Requirement("torch>=2.6"))
    assert (check.status, check.detail) == ("ok", version("torch"))
    assert check.line() == f"ok    torch                  {version('torch')}"


def test_lab_packages_only_warn():
    check = doctor.check_requirement(Requirement("no-such-package-lowmem"), doctor.WARN)
    assert check.status == "warn" and check.detail == "missing (needs any version)"


def test_memory_below_binder_size_fails_and_above_is_ok():
    low, high = doctor.check_memory(free=GiB), doctor.check_memory(free=3 * GiB)
    assert (low.status, low.detail) == ("FAIL", "1.00 GiB, the notebooks need 2.00 GiB")
    assert (high.status, high.detail) == ("ok", "3.00 GiB")


def test_uninstalled_package_fails_instead_of_checking_its_requirements(monkeypatch):
    monkeypatch.setattr(doctor, "PACKAGE", "no-such-package-lowmem")
    assert doctor.check_installed() == [doctor.Check("no-such-package-lowmem", "FAIL",
                                                     "not installed (imported from a source tree?)",
                                                     doctor.INSTALL_FIX)]


def test_python_here_satisfies_the_package():
    assert doctor.check_python().status == "ok"


def test_bf16_autocast_works_on_this_device():
    device = family.get_device().type
    native = device != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)
    check = doctor.check_bf16()
    assert (check.status, check.detail) == ("ok", f"works on {device}" + ("" if native else " (emulated: slow)"))


def test_bitsandbytes_round_trip_packs_two_weights_per_byte():
    import bitsandbytes

    check = doctor.check_bitsandbytes()
    assert check.status == "ok", check.detail
    backend = bitsandbytes.cextension.BNB_BACKEND  # "CPU" without a GPU, "CUDA" on an NVIDIA GPU
    if not torch.cuda.is_available():
        assert backend == "CPU"
    assert check.detail == f"backend {backend}, 2048 bytes for 4096 NF4 weights"


def test_student_missing_fails_with_the_training_command(tmp_path, monkeypatch):
    monkeypatch.setattr(family, "STUDENTS_DIR", tmp_path)
    check = doctor.check_student("deepseek_v3")
    assert (check.name, check.status, check.detail) == (
        "student deepseek_v3", "FAIL", f"not shipped: no {tmp_path / 'deepseek_v3'}")
    assert check.fix.endswith("python -m lowmem_course.student train --arch deepseek_v3 --out DIR")


def test_student_without_weights_fails_naming_the_missing_file(tmp_path, monkeypatch):
    monkeypatch.setattr(family, "STUDENTS_DIR", tmp_path)
    family.tiny("r1-distill-qwen-1.5b").save_pretrained(tmp_path / "qwen2")  # config.json only
    check = doctor.check_student("qwen2")
    assert check.status == "FAIL"
    assert check.detail.startswith(f"does not load: FileNotFoundError: {tmp_path / 'qwen2'} has no model.safetensors")


def test_shipped_student_loads_and_reports_its_parameter_count(tmp_path, monkeypatch):
    monkeypatch.setattr(family, "STUDENTS_DIR", tmp_path)
    model = family.build(family.tiny("r1-distill-qwen-1.5b"))
    model.save_pretrained(tmp_path / "qwen2")
    make_tokenizer().save_pretrained(tmp_path / "qwen2")
    n = sum(p.numel() for p in model.parameters())
    check = doctor.check_student("qwen2")
    assert (check.status, check.detail) == ("ok", f"Qwen2ForCausalLM, {n:,} parameters")


CHECKS_OK = [doctor.Check("python", "ok", "3.11.7"), doctor.Check("torch", "ok", "2.13.0"),
             doctor.Check("device", "ok", "cpu, 2 cores"), doctor.Check("bf16 autocast", "ok", "works on cpu"),
             doctor.Check("free memory", "ok", "20.00 GiB"), doctor.Check("student qwen2", "ok", "Qwen2ForCausalLM")]


def test_summary_is_a_few_lines_and_names_each_problem():
    assert doctor.summary(CHECKS_OK) == ("python 3.11.7, torch 2.13.0\ncpu; bf16 autocast ok; free memory 20.00 GiB\n"
                                         "students: qwen2 ok\ndoctor: ready")
    broken = CHECKS_OK[:-1] + [doctor.Check("student qwen2", "FAIL", "not shipped")]
    assert doctor.summary(broken).splitlines()[-1] == ("doctor: student qwen2: not shipped  "
                                                       "(run `lowmem doctor` for the fix)")


@pytest.mark.parametrize("failing, code", [(False, 0), (True, 1)])
def test_main_exits_1_exactly_when_a_check_fails(monkeypatch, capsys, failing, code):
    checks = CHECKS_OK + ([doctor.Check("peft", "FAIL", "missing", doctor.INSTALL_FIX)] if failing else [])
    monkeypatch.setattr(doctor, "run_checks", lambda: checks)
    assert doctor.main([]) == code
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == ("1 problem(s): fix them before the workshop" if failing
                                    else "ready: every notebook's requirement is met")
    assert ("fix: " + doctor.INSTALL_FIX in out) == failing


def test_doctor_checks_every_shipped_student_architecture():
    assert doctor.STUDENTS == tuple(student.ARCHS)


def test_module_runs_as_a_script_and_reports_the_students_truthfully():
    done = subprocess.run([sys.executable, "-m", "lowmem_course.doctor"], capture_output=True, text=True)
    statuses = [line.split()[0] for line in done.stdout.splitlines() if line[:1] in "owF"]
    for arch in doctor.STUDENTS:
        line = next(line for line in done.stdout.splitlines() if f" student {arch} " in line)
        assert line.split()[0] == ("ok" if student.student_dir(arch).is_dir() else "FAIL"), done.stdout
    assert done.returncode == (1 if "FAIL" in statuses else 0)
