"""Colab and Binder readiness: what a learner gets from a badge, checked without Colab or Binder.

- Colab: every notebook's first code cell is ``lab.SETUP_CELL``, which installs this repository
  (``lowmem_course.REPO_URL``) and nothing else, so the packages Colab pulls are pyproject's.
- Binder and conda: ``binder/environment.yml`` and ``environment.yml`` name exactly pyproject's
  [project] dependencies plus its "lab" extra, with the same version specifiers.
- Binder, for real: what repo2docker does (the environment's pip section, then ``binder/postBuild``)
  in a fresh venv, then ``lowmem doctor`` runs in it. Every notebook's kernel is held to Binder's
  2 GB by the nbval run itself (conftest.py). ``LOWMEM_SKIP_BINDER=1`` skips the venv test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import nbformat
import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

import lowmem_course
from lowmem_course import lab

ROOT = Path(__file__).resolve().parents[1]

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CPU_INDEX = "--extra-index-url https://download.pytorch.org/whl/cpu"
LOCAL_TORCH = "torch==2.13.0"  # the CPU wheel this machine's pip finds offline, in place of the CPU index


def _specs(requirements: list[str]) -> dict[str, SpecifierSet]:
    """Requirement strings -> {normalised name: specifier set} (order and spelling do not matter)."""
    parsed = [Requirement(r) for r in requirements]
    return {r.name.lower().replace("_", "-"): r.specifier for r in parsed}


def _pyproject_for_learners() -> dict[str, SpecifierSet]:
    """What a learner's environment needs: pyproject's dependencies and its "lab" extra."""
    return _specs(PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["lab"])


def _environment(path: Path) -> tuple[list[str], list[str]]:
    """A conda environment file's conda dependencies and its pip section."""
    deps = yaml.safe_load(path.read_text())["dependencies"]
    conda = [d for d in deps if isinstance(d, str)]
    pip = [line for d in deps if isinstance(d, dict) for line in d["pip"]]
    return conda, pip


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_code_cell_is_the_setup_cell_with_the_repository_url(notebook):
    cells = nbformat.read(notebook, as_version=4).cells
    first_code = next(c for c in cells if c.cell_type == "code")
    assert first_code.source == lab.SETUP_CELL, f"{notebook.name}: the first code cell must be lab.SETUP_CELL"
    assert re.findall(r"git\+(\S+?)\"", first_code.source) == [lowmem_course.REPO_URL]


def test_setup_cell_installs_this_package_alone_so_colab_gets_pyprojects_pins():
    installs = re.findall(r'"install", "-q", "([^"]+)"\]', lab.SETUP_CELL)
    assert len(installs) == 1, "the Colab install names one requirement: this repository"
    requirement = Requirement(installs[0])
    assert requirement.name == PYPROJECT["name"]
    assert requirement.url == f"git+{lowmem_course.REPO_URL}"
    assert not requirement.specifier and not requirement.extras


def test_readme_badges_open_this_repository():
    readme = (ROOT / "README.md").read_text()
    owner_repo = lowmem_course.REPO_URL.removeprefix("https://github.com/")
    colab = re.findall(r"https://colab\.research\.google\.com/github/([^/]+/[^/]+)/blob/[^/]+/(\S+?\.ipynb)", readme)
    binder = re.findall(r"https://mybinder\.org/v2/gh/([^/]+/[^/]+)/", readme)
    assert colab and binder, "README.md has a Colab and a Binder badge"
    assert {repo for repo, _ in colab} == {owner_repo} and set(binder) == {owner_repo}
    assert all((ROOT / path).is_file() for _, path in colab), "a Colab badge opens a notebook that exists"


def test_binder_environment_names_pyprojects_dependencies_with_a_cpu_torch():
    conda, pip = _environment(ROOT / "binder" / "environment.yml")
    assert "python=3.11" in conda and "pip" in conda
    assert [line for line in pip if line.startswith("-")] == [CPU_INDEX]
    assert _specs([line for line in pip if not line.startswith("-")]) == _pyproject_for_learners()


def test_binder_postbuild_installs_the_package_without_touching_the_dependencies():
    post_build = ROOT / "binder" / "postBuild"
    assert os.access(post_build, os.X_OK), "repo2docker runs postBuild as an executable"
    assert "pip install --no-deps -e ." in post_build.read_text()


def test_conda_environment_names_pyprojects_dependencies():
    conda, pip = _environment(ROOT / "environment.yml")
    assert "pip" in conda and any(d.startswith("python=") for d in conda)
    assert [line for line in pip if line.startswith("-")] == ["-e ."]
    assert _specs([line for line in pip if not line.startswith("-")]) == _pyproject_for_learners()


@pytest.mark.binder
@pytest.mark.skipif(os.environ.get("LOWMEM_SKIP_BINDER") == "1", reason="LOWMEM_SKIP_BINDER=1: Binder build skipped")
def test_binder_steps_in_a_fresh_venv_give_a_working_course(tmp_path):
    """repo2docker's steps on a copy of the repository: the pip section, postBuild, then the course runs.

    The fresh venv sees the packages this test run's own environment installed (a ``.pth`` file):
    the pip section names the same requirements (checked above), so installing them a second time
    would only repeat that install. ``--no-index`` proves they satisfy the pip section as they are.
    Every notebook's kernel is checked against Binder's memory by the nbval run (conftest.py).
    """
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "*.egg-info", "__pycache__", "browser_screenshots", ".ipynb_checkpoints"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)  # fresh: no system site-packages; pip comes with the packages below
    python = str(env_dir / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    installed = [p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "torch").is_dir()]
    assert installed, "this test runs in an environment with torch installed"
    (Path(site) / "ci_packages.pth").write_text(f"{installed[0]}\n")
    _, pip = _environment(repo / "binder" / "environment.yml")
    (tmp_path / "requirements.txt").write_text("\n".join(line for line in pip if line != CPU_INDEX) + "\n")
    (tmp_path / "constraints.txt").write_text(LOCAL_TORCH + "\n")
    install = [python, "-m", "pip", "install", "-q", "--no-index", "-r", str(tmp_path / "requirements.txt"),
               "-c", str(tmp_path / "constraints.txt")]
    subprocess.run(install, check=True)
    env = dict(os.environ, PATH=f"{env_dir / 'bin'}{os.pathsep}{os.environ['PATH']}", VIRTUAL_ENV=str(env_dir))
    env.pop("PYTHONPATH", None)
    subprocess.run(["bash", "binder/postBuild"], cwd=repo, env=env, check=True)

    probe = subprocess.run([python, "-c", "import lowmem_course, torch; print(lowmem_course.__file__); "
                            "print(torch.__version__)"], capture_output=True, text=True, check=True, cwd=tmp_path)
    package_file, torch_version = probe.stdout.split()
    assert Path(package_file).is_relative_to(repo / "lowmem_course"), "postBuild installed the package from the repo"
    assert torch_version == LOCAL_TORCH.split("==")[1] + "+cpu"
    doctor = subprocess.run([python, "-m", "lowmem_course.doctor", "--short"], capture_output=True, text=True,
                            cwd=tmp_path, env=env)
    assert doctor.returncode == 0 and doctor.stdout.splitlines()[-1] == "doctor: ready", doctor.stdout + doctor.stderr
