"""The shipped students and adapter: a manifest of their sha256, which `lowmem doctor` checks."""

import shutil

import pytest

from lowmem_course import doctor, family, integrity


def test_the_manifest_lists_every_shipped_file_with_its_sha256():
    manifest = integrity.read_manifest(family.STUDENTS_DIR / integrity.MANIFEST)
    on_disk = sorted(str(p.relative_to(family.STUDENTS_DIR)) for p in family.STUDENTS_DIR.rglob("*")
                     if p.is_file() and p.name != integrity.MANIFEST)
    assert sorted(manifest) == on_disk
    assert {name: integrity.sha256(family.STUDENTS_DIR / name) for name in manifest} == manifest
    assert {"qwen2/model.safetensors", "deepseek_v3/model.safetensors",
            "adapters/subtraction/adapter_model.safetensors"} <= set(manifest)


def test_doctor_finds_the_shipped_files_intact():
    check = doctor.check_shipped_files()
    assert (check.status, check.detail) == ("ok", "18 files match MANIFEST.sha256")
    assert check in doctor.run_checks()


@pytest.fixture
def shipped_copy(tmp_path, monkeypatch):
    copy = tmp_path / "students"
    shutil.copytree(family.STUDENTS_DIR, copy)
    monkeypatch.setattr(family, "STUDENTS_DIR", copy)
    return copy


def test_doctor_fails_when_a_shipped_file_is_altered(shipped_copy):
    weights = shipped_copy / "qwen2" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(raw))
    (shipped_copy / "adapters" / "subtraction" / "recipe.json").unlink()
    check = doctor.check_shipped_files()
    assert (check.status, check.detail) == (
        "FAIL",
        "2 differ from MANIFEST.sha256 or are missing: adapters/subtraction/recipe.json, qwen2/model.safetensors")
    assert check.fix.startswith("reinstall the course package")
    assert doctor.check_student("qwen2").status == "ok"  # it still loads: only the hash tells
    summary = doctor.summary([doctor.Check("device", "ok", "cpu"), doctor.Check("bf16 autocast", "ok", ""),
                              doctor.Check("free memory", "ok", "20 GiB"), check])
    assert summary.splitlines()[-1].startswith("doctor: shipped files: 2 differ")


def test_doctor_fails_without_a_manifest(shipped_copy):
    (shipped_copy / integrity.MANIFEST).unlink()
    check = doctor.check_shipped_files()
    assert (check.status, check.detail) == ("FAIL", f"no {shipped_copy / integrity.MANIFEST}")


def test_a_malformed_manifest_line_is_named(tmp_path):
    path = tmp_path / integrity.MANIFEST
    path.write_text("0" * 64 + "  a\nnot a hash  b\n")
    with pytest.raises(ValueError, match=r"MANIFEST.sha256:2: expected 'SHA256  PATH'"):
        integrity.read_manifest(path)
