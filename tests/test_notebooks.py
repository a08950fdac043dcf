"""The tutorial notebooks run top to bottom with a real kernel, and are committed executed and small.

Each notebook is executed in memory (the committed file is not touched) with its own folder as the working
directory, as `jupyter lab notebooks/` runs it; any cell error fails, and so does a cell over CELL_TIMEOUT.
To refresh the committed outputs after changing a notebook or the default model:

    python -m tests.test_notebooks            # all notebooks, in place; prints the time of each
    python -m tests.test_notebooks notebooks/03_flow_matching.ipynb
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell; the slowest (a few training steps of every stage) takes under a minute
MAX_TOTAL_BYTES = 2_000_000  # committed outputs stay small so diffs stay readable
MAX_OUTPUT_BYTES = 400_000  # per image or other output


def execute(path: Path) -> tuple[nbformat.NotebookNode, float]:
    """Run every cell of the notebook at `path` in a fresh kernel; raises CellExecutionError on an error."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    return nb, time.perf_counter() - start


def test_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    assert names == ["01_architecture_tour.ipynb", "02_inside_the_refiner.ipynb", "03_flow_matching.ipynb",
                     "04_editing_two_guidances.ipynb", "05_six_training_stages.ipynb",
                     "06_ablations.ipynb"]
    readme = (NOTEBOOK_DIR / "README.md").read_text()
    assert all(name in readme for name in names)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
    nb, _ = execute(path)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors  # nbclient raises on the first error; this guards allow_errors being switched on


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_executed_and_small(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), \
        f"{path.name} is committed unexecuted; run `python -m tests.test_notebooks {path.relative_to(REPO)}`"
    for c in code:
        for o in c.outputs:
            assert o.output_type != "error", f"{path.name} was committed with an error output"
            for mime, data in o.get("data", {}).items():
                size = len(str(data))
                assert size < MAX_OUTPUT_BYTES, f"{path.name}: a {mime} output is {size:,} bytes"
    assert sum(p.stat().st_size for p in NOTEBOOKS) < MAX_TOTAL_BYTES


def main(argv: list[str]) -> int:
    paths = [Path(a).resolve() for a in argv] or NOTEBOOKS
    total = 0.0
    for path in paths:
        nb, seconds = execute(path)
        nbformat.write(nb, path)
        total += seconds
        print(f"{path.name}: {seconds:.0f} s, {path.stat().st_size / 1e3:.0f} kB", flush=True)
    print(f"total: {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
