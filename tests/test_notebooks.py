"""The stored notebooks are the executed form of their sources in notebooks/src/."""

import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from build_notebooks import parse_cells  # noqa: E402

SOURCES = sorted((ROOT / "notebooks" / "src").glob("*.py"))


def test_every_source_has_a_stored_notebook_and_back():
    stored = {p.stem for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert stored == {s.stem for s in SOURCES}


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_stored_notebook_matches_its_source_and_has_outputs(source):
    notebook = nbformat.read(source.parents[1] / f"{source.stem}.ipynb", as_version=4)
    expected = [(c.cell_type, c.source) for c in parse_cells(source.read_text())]
    assert [(c.cell_type, c.source) for c in notebook.cells] == expected, \
        f"rebuild it: python tools/build_notebooks.py {source.stem[:2]}"
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "every code cell is stored executed"


def test_markdown_parsing_keeps_blank_lines_and_strips_the_comment_marks():
    cells = parse_cells("# %% [markdown]\n# # Title\n#\n# text\n# %%\nx = 1\n")
    assert [(c.cell_type, c.source) for c in cells] == [("markdown", "# Title\n\ntext"), ("code", "x = 1")]
