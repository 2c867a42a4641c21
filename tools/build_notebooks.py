"""Build the course notebooks from their sources and store them with outputs.

Each notebook is written as a plain Python file in ``notebooks/src/NN_topic.py`` (the "percent"
format that Jupytext, VS Code and Spyder read, parsed here by jupytext: ``# %%`` starts a code cell,
``# %% [markdown]`` a markdown cell whose lines start with ``# ``). This script turns each source into
``notebooks/NN_topic.ipynb``, executes it on a fresh kernel from the notebook's folder, and saves it
with its outputs, so learners can read the results on GitHub before running anything.

    python tools/build_notebooks.py                 # every notebook
    python tools/build_notebooks.py 00 03           # the notebooks whose names start with these

The exercises' worked solutions live in ``notebooks/src/solutions/NN_topic.py`` (same format, same
file name as the course notebook's source) and build into ``notebooks/solutions/NN_topic.ipynb``,
executed from ``notebooks/solutions``. Name them with a ``solutions/`` prefix:

    python tools/build_notebooks.py solutions/00    # the solutions of notebook 00
    python tools/build_notebooks.py solutions/      # every solution notebook

A bare prefix (``00``) picks course notebooks only, as before.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "notebooks" / "src"
SOLUTION_SOURCES = SOURCES / "solutions"
SOLUTIONS_PREFIX = "solutions/"
KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}
NO_BARS = {"TQDM_DISABLE": "1"}  # kernels built here show no progress bar: a stored bar stays at "0%" (lab.progress)


def parse_cells(text: str) -> list[nbformat.NotebookNode]:
    """Split a percent-format source into notebook cells (read by jupytext; empty code cells dropped)."""
    cells = []
    for cell in jupytext.reads(text, fmt="py:percent").cells:
        body = cell.source.strip("\n")
        if cell.cell_type == "markdown":
            cells.append(nbformat.v4.new_markdown_cell(body))
        elif cell.cell_type == "code" and body:
            cells.append(nbformat.v4.new_code_cell(body))
    return cells


def target_of(source: Path) -> Path:
    """Where ``source`` is stored as a notebook: ``notebooks/src/X.py`` -> ``notebooks/X.ipynb``,
    ``notebooks/src/solutions/X.py`` -> ``notebooks/solutions/X.ipynb``."""
    relative = source.resolve().relative_to(SOURCES)
    return ROOT / "notebooks" / relative.with_suffix(".ipynb")


def build(source: Path, timeout_s: int = 600) -> Path:
    """Execute ``source`` as a notebook and write it where ``target_of`` says; returns its path.

    The kernel runs in the stored notebook's folder, so relative paths in a notebook resolve the
    same when nbval runs it.
    """
    target = target_of(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    notebook = nbformat.v4.new_notebook(cells=parse_cells(source.read_text()))
    notebook.metadata["kernelspec"] = KERNEL
    notebook.metadata["language_info"] = {"name": "python"}
    started = time.perf_counter()
    os.environ.update(NO_BARS)  # the kernel copies this process's environment
    NotebookClient(notebook, timeout=timeout_s, kernel_name="python3",
                   resources={"metadata": {"path": str(target.parent)}}).execute()
    for cell in notebook.cells:  # execution metadata holds wall-clock times: keep diffs quiet
        cell.metadata.pop("execution", None)
    nbformat.write(notebook, target)
    print(f"{target.relative_to(ROOT)}: {time.perf_counter() - started:.1f} s")
    return target


def main(prefixes: list[str]) -> None:
    course = [p for p in prefixes if not p.startswith(SOLUTIONS_PREFIX)]
    answers = [p.removeprefix(SOLUTIONS_PREFIX) for p in prefixes if p.startswith(SOLUTIONS_PREFIX)]
    chosen = []
    if course or not prefixes:
        chosen += [s for s in sorted(SOURCES.glob("*.py")) if not course or any(s.stem.startswith(p) for p in course)]
    if answers:
        chosen += [s for s in sorted(SOLUTION_SOURCES.glob("*.py")) if any(s.stem.startswith(p) for p in answers)]
    if not chosen:
        sys.exit(f"no notebook source matches {prefixes} in {SOURCES} (solutions: {SOLUTION_SOURCES})")
    for source in chosen:
        build(source)


if __name__ == "__main__":
    main(sys.argv[1:])
