"""The stored notebooks are the executed form of their sources in notebooks/src/.

Their stored outputs are what a learner reads on GitHub or in JupyterLab before running anything: no
stderr box (a library warning, a progress bar), no progress widget (stored, it shows a bar frozen
at "0%"), no text bar stuck at 0%.

The same holds for the exercises' worked solutions: ``notebooks/src/solutions/NN_topic.py`` is
stored executed as ``notebooks/solutions/NN_topic.ipynb``, and every course notebook with an
"## Exercises" section has one, solving as many exercises as the section asks.
"""

import re
import sys
from pathlib import Path

import nbformat
import pytest

from lowmem_course import lab

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from build_notebooks import parse_cells, target_of  # noqa: E402

SOURCES = sorted((ROOT / "notebooks" / "src").glob("*.py"))
SOLUTION_SOURCES = sorted((ROOT / "notebooks" / "src" / "solutions").glob("*.py"))
FROZEN_BAR = re.compile(r"(?<![0-9])0%\|")  # tqdm's "  0%|          | 0/15", not "100%|"
WIDGET = "application/vnd.jupyter.widget-view+json"
EXERCISE = re.compile(r"^\d+\. ", re.MULTILINE)  # "1. *(easy)* ..." in an Exercises section
SOLVED = re.compile(r"^## Exercise (\d+)\b", re.MULTILINE)  # one heading per solved exercise
# JupyterLab soft-wraps a long output line: prose wraps at a space harmlessly, but a table's row
# wraps mid-column and its columns collide. A line that aligns columns (two or more spaces between
# words) stays this narrow; prose may run longer.
ALIGNED = re.compile(r"\S {2,}\S")
ALIGNED_WIDTH = 100


def _rebuild_hint(source: Path) -> str:
    prefix = "solutions/" if source.parent.name == "solutions" else ""
    return f"rebuild it: python tools/build_notebooks.py {prefix}{source.stem[:2]}"


def _exercises(source: Path) -> int | None:
    """How many exercises the course notebook's "## Exercises" section lists (None without one)."""
    for cell in parse_cells(source.read_text()):
        if cell.cell_type == "markdown" and "## Exercises" in cell.source:
            section = cell.source.split("## Exercises", 1)[1]
            section = re.split(r"^## ", section, maxsplit=1, flags=re.MULTILINE)[0]
            return len(EXERCISE.findall(section))
    return None


def test_every_source_has_a_stored_notebook_and_back():
    stored = {p.stem for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert stored == {s.stem for s in SOURCES}


def test_every_solution_source_has_a_stored_notebook_and_back():
    stored = {p.stem for p in (ROOT / "notebooks" / "solutions").glob("*.ipynb")}
    assert stored == {s.stem for s in SOLUTION_SOURCES}


@pytest.mark.parametrize("source", SOURCES + SOLUTION_SOURCES,
                         ids=lambda p: f"{p.parent.name}/{p.stem}" if p.parent.name == "solutions" else p.stem)
def test_stored_notebook_matches_its_source_and_has_outputs(source):
    notebook = nbformat.read(target_of(source), as_version=4)
    expected = [(c.cell_type, c.source) for c in parse_cells(source.read_text())]
    assert [(c.cell_type, c.source) for c in notebook.cells] == expected, _rebuild_hint(source)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "every code cell is stored executed"


@pytest.mark.parametrize("source", [s for s in SOURCES if _exercises(s)], ids=lambda p: p.stem)
def test_every_notebook_with_exercises_has_a_solution_per_exercise(source):
    solution = ROOT / "notebooks" / "src" / "solutions" / source.name
    assert solution.exists(), f"write its solutions in {solution.relative_to(ROOT)}"
    cells = parse_cells(solution.read_text())
    solved = [int(n) for c in cells if c.cell_type == "markdown" for n in SOLVED.findall(c.source)]
    assert solved == list(range(1, _exercises(source) + 1)), \
        f"{solution.name} solves exercises {solved}; {source.name} asks {_exercises(source)}"
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith(f"# {source.stem[:2]} · ")
    assert cells[0].source.splitlines()[0].endswith(" — solutions")
    first_code = next(c for c in cells if c.cell_type == "code")
    assert first_code.source == lab.SETUP_CELL, "the first code cell must be lab.SETUP_CELL"


def stored_noise(notebook: nbformat.NotebookNode) -> list[str]:
    """What a learner should not read in a notebook's stored outputs: "cell N: why", one per output."""
    found = []
    for n, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            text = output.get("text", "") + output.get("data", {}).get("text/plain", "")
            if output.output_type == "stream" and output.name == "stderr":
                found.append(f"cell {n}: stderr {text[:80]!r}")
            elif WIDGET in output.get("data", {}):
                found.append(f"cell {n}: a widget, stored as {text[:60]!r}")
            elif FROZEN_BAR.search(text):
                found.append(f"cell {n}: a bar frozen at 0%: {text[:60]!r}")
            else:
                found += [f"cell {n}: an aligned line of {len(line)} > {ALIGNED_WIDTH} characters: {line[:60]!r}"
                          for line in text.splitlines() if len(line) > ALIGNED_WIDTH and ALIGNED.search(line)]
    return found


@pytest.mark.parametrize("source", SOURCES + SOLUTION_SOURCES,
                         ids=lambda p: f"{p.parent.name}/{p.stem}" if p.parent.name == "solutions" else p.stem)
def test_stored_outputs_hold_no_stderr_widget_or_frozen_bar(source):
    found = stored_noise(nbformat.read(target_of(source), as_version=4))
    assert not found, "\n".join(found) + ("\n(progress bars: lab.progress; warnings: lab.quiet_libraries; "
                                         f"tables: at most {ALIGNED_WIDTH} characters a line)")


def test_stored_noise_is_found():
    bad = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x")])
    bad.cells[0].outputs = [nbformat.v4.new_output("stream", name="stderr", text="pip install kernels"),
                            nbformat.v4.new_output("display_data", data={WIDGET: {}, "text/plain": "a:   0%|   | 0/2"}),
                            nbformat.v4.new_output("stream", name="stdout", text="b:   0%|          | 0/3"),
                            nbformat.v4.new_output("stream", name="stdout", text="done: 100%|####| 3/3")]
    reasons = [f.split(": ", 1)[1] for f in stored_noise(bad)]  # the finished bar is fine
    assert [r.split(" ", 2)[:2] for r in reasons] == [["stderr", "'pip"], ["a", "widget,"], ["a", "bar"]]


def test_stored_table_lines_wider_than_the_limit_are_found():
    row = "model" + " " * (ALIGNED_WIDTH - 10) + "12.34"  # a table row as wide as allowed
    prose = " ".join(["a prose line wraps at its spaces"] * 5)
    assert len(row) == ALIGNED_WIDTH and len(prose) > ALIGNED_WIDTH
    table = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x")])
    table.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"{row}\n{prose}\n"),
                              nbformat.v4.new_output("execute_result", data={"text/plain": row + "6"}),
                              nbformat.v4.new_output("stream", name="stdout", text=f"{row}7\n")]
    assert [f.split(": ")[1] for f in stored_noise(table)] == ["an aligned line of 101 > 100 characters"] * 2


def test_markdown_parsing_keeps_blank_lines_and_strips_the_comment_marks():
    cells = parse_cells("# %% [markdown]\n# # Title\n#\n# text\n# %%\nx = 1\n")
    assert [(c.cell_type, c.source) for c in cells] == [("markdown", "# Title\n\ntext"), ("code", "x = 1")]


def test_solution_sources_build_into_the_solutions_folder():
    source = ROOT / "notebooks" / "src" / "solutions" / "00_where_the_memory_goes.py"
    assert target_of(source) == ROOT / "notebooks" / "solutions" / "00_where_the_memory_goes.ipynb"
    assert target_of(SOURCES[0]) == ROOT / "notebooks" / f"{SOURCES[0].stem}.ipynb"
