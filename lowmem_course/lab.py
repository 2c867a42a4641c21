"""What every notebook's setup cell calls: versions, device, and the course model.

``LOWMEM_MODEL`` chooses the model a notebook runs on: unset (the default) gives the tiny offline
twin of the notebook's family member, or the shipped student it trains; a Hub id such as
``deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B`` (or a local ``save_pretrained`` directory) loads real
weights, for a learner with a GPU and a network. The same cells run in both cases.
"""

from __future__ import annotations

import logging
import os
import platform
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import TypeVar

import torch
from transformers import PretrainedConfig

from lowmem_course import REPO_URL, family
from lowmem_course.family import get_device

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "safetensors", "matplotlib", "lowmem-course")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries the course uses ("missing" when not installed)."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "missing"
    return versions


@dataclass(frozen=True)
class CourseModel:
    """The model a notebook works on: its config, where its weights come from, and whether it is tiny."""

    name: str  # family short name, shipped student, Hub id or directory
    config: PretrainedConfig
    is_twin: bool  # True for the default: a tiny twin or shipped student, offline
    source: str | None = None  # what family.load (and load_tokenizer) reads; None: a twin, built from config


def course_model(default: str = "r1-distill-qwen-1.5b") -> CourseModel:
    """The notebook's model: ``LOWMEM_MODEL`` when set, else ``default``.

    ``default`` is a family member (its tiny twin, built from the config, no weights) or a shipped
    student such as "student-qwen2" (trained weights, loaded with ``family.load(course.source)``).
    """
    from transformers import AutoConfig

    chosen = os.environ.get("LOWMEM_MODEL", "").strip()
    if not chosen and family.student_path(default) is None:
        return CourseModel(name=f"tiny twin of {default}", config=family.tiny(default), is_twin=True)
    source = chosen or default
    config = AutoConfig.from_pretrained(family.student_path(source) or source, trust_remote_code=False)
    return CourseModel(name=source, config=config, is_twin=not chosen, source=source)


T = TypeVar("T")


def progress(items: Iterable[T], desc: str) -> Iterator[T]:
    """``items`` behind a ``tqdm.auto`` progress bar for a learner running the notebook, and behind
    none when ``TQDM_DISABLE`` is set (tqdm's own switch, which its notebook widget ignores):
    ``tools/build_notebooks.py`` and the nbval run set it, so no bar frozen at "0%" is stored."""
    from tqdm.auto import tqdm

    return iter(tqdm(items, desc=desc, disable=bool(os.environ.get("TQDM_DISABLE"))))


LIBRARY_MODULES = r"(torch|transformers|peft|bitsandbytes|accelerate|huggingface_hub)(\.|$)"


def quiet_libraries() -> None:
    """Keep the libraries' chatter out of the notebooks' outputs, which are stored and compared.

    bitsandbytes' notices about optional kernels (which depend on the CPU), transformers' info lines
    and "Loading weights" bars, and the libraries' deprecation and user warnings. A lesson that is
    *about* a warning catches it on purpose with ``warnings.catch_warnings(record=True)``.
    """
    from transformers.utils import logging as hf_logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", module=LIBRARY_MODULES)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")  # raised from the caller's frame


def start(seed: int = 0) -> torch.device:
    """Set up a notebook: quiet the libraries, seed everything, print library versions and the
    device; return it."""
    quiet_libraries()
    from transformers import set_seed  # imports bitsandbytes, whose CPU backend logs at import: after quieting

    set_seed(seed)  # Python's, NumPy's and PyTorch's generators: the same numbers every run
    versions = library_versions()
    device = get_device()
    print(" | ".join(f"{name} {v}" for name, v in versions.items()))
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    return device


SETUP_CELL = f'''# NBVAL_IGNORE_OUTPUT
# Setup: on Colab this installs the course package; locally and on Binder it is already installed.
import importlib.util, subprocess, sys
if "google.colab" in sys.modules and importlib.util.find_spec("lowmem_course") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "lowmem-course @ git+{REPO_URL}"], check=True)
from lowmem_course import lab
device = lab.start()'''
"""The first code cell of every notebook, word for word (a test checks it)."""
