"""Build the course notebooks from their sources and store them with outputs.

Each notebook is written as a plain Python file in ``notebooks/src/NN_topic.py`` (the "percent"
format that Jupytext, VS Code and Spyder read: ``# %%`` starts a code cell, ``# %% [markdown]`` a
markdown cell whose lines start with ``# ``). This script turns each source into
``notebooks/NN_topic.ipynb``, executes it on a fresh kernel from the notebook's folder, and saves it
with its outputs, so learners can read the results on GitHub before running anything.

    python tools/build_notebooks.py                 # every notebook
    python tools/build_notebooks.py 00 03           # the notebooks whose names start with these
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "notebooks" / "src"
KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}


def parse_cells(text: str) -> list[nbformat.NotebookNode]:
    """Split a percent-format source into notebook cells."""
    cells: list[nbformat.NotebookNode] = []
    kind, lines = None, []

    def flush() -> None:
        body = "\n".join(lines).strip("\n")
        if kind == "markdown":
            body = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(body))
        elif kind == "code" and body:
            cells.append(nbformat.v4.new_code_cell(body))

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    return cells


def build(source: Path, timeout_s: int = 600) -> Path:
    """Execute ``source`` as a notebook and write ``notebooks/<name>.ipynb``; returns its path."""
    target = source.parents[1] / (source.stem + ".ipynb")
    notebook = nbformat.v4.new_notebook(cells=parse_cells(source.read_text()))
    notebook.metadata["kernelspec"] = KERNEL
    notebook.metadata["language_info"] = {"name": "python"}
    started = time.perf_counter()
    NotebookClient(notebook, timeout=timeout_s, kernel_name="python3",
                   resources={"metadata": {"path": str(target.parent)}}).execute()
    for cell in notebook.cells:  # execution metadata holds wall-clock times: keep diffs quiet
        cell.metadata.pop("execution", None)
    nbformat.write(notebook, target)
    print(f"{target.relative_to(ROOT)}: {time.perf_counter() - started:.1f} s")
    return target


def main(prefixes: list[str]) -> None:
    sources = sorted(SOURCES.glob("*.py"))
    chosen = [s for s in sources if not prefixes or any(s.stem.startswith(p) for p in prefixes)]
    if not chosen:
        sys.exit(f"no notebook source matches {prefixes} in {SOURCES}")
    for source in chosen:
        build(source)


if __name__ == "__main__":
    main(sys.argv[1:])
