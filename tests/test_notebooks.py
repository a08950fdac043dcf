"""The tutorial notebooks run top to bottom with a real kernel (each once per session, however many tests read
its outputs, two at a time); notebook 06 shows the committed ablation results; the committed copies carry
no outputs.

Each notebook is executed in memory (the file is never written) with its own folder as the working
directory, as `jupyter lab notebooks/` runs it; any cell error fails, and so does a cell that runs past
CELL_TIMEOUT (a hang, not a slow machine: the limit is many times the slowest cell).

Notebooks are committed stripped (no outputs, no execution counts), so running them in JupyterLab,
which writes outputs into the file as it autosaves, cannot break a test: the check of committed copies
reads git's index (what `git commit` would record), not the working file. Commands:

    python -m tests.test_notebooks                 # run them all, print the time of each and its slowest cells
    python -m tests.test_notebooks --figures DIR   # ... and save its figures and printed text in DIR
    python -m tests.test_notebooks --strip         # strip outputs in place (before committing a notebook)
    git config filter.notebook-outputs.clean "python -m tests.test_notebooks --clean"   # once per clone: git
                                                   # then reads notebooks stripped (`git diff` empty after a run)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# Seconds per cell. Only a hang should reach it: the slowest cell (05's training) took 52-57 s on a 2-core
# machine at a load of 8-9, and its earlier, twice as long version once took 432 s on a loaded machine.
CELL_TIMEOUT = 1200
# What a stripped notebook keeps: the kernel to start. Not widget state, nor language_info, whose Python version
# would differ between machines and show the file as changed after every run.
NOTEBOOK_METADATA = ("kernelspec",)
# Kernels running at once under pytest, each on one thread; the test process only waits meanwhile. On a
# 2-core machine busy with two training jobs, all six took 0.75x the time of one after another (142 -> 107 s,
# 164 -> 122 s); on CI's quiet two cores the second kernel has a core to itself. More would share the cores.
PARALLEL = 2
ABLATIONS = NOTEBOOK_DIR / "06_ablations.ipynb"


def execute(path: Path) -> tuple[nbformat.NotebookNode, float]:
    """Run every cell of the notebook at `path` in a fresh kernel; raises CellExecutionError on an error."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3", record_timing=True,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    return nb, time.perf_counter() - start


def execute_all(paths: list[Path], parallel: int = PARALLEL) -> dict[Path, nbformat.NotebookNode | Exception]:
    """Run the notebooks, `parallel` kernels at a time, each on one thread; a failed run maps to its error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    async def run(path: Path, gate: asyncio.Semaphore) -> nbformat.NotebookNode:
        async with gate:
            nb = nbformat.read(path, as_version=4)
            client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                    resources={"metadata": {"path": str(path.parent)}})
            await client.async_execute(env=env)
            return nb

    async def run_all() -> list:
        gate = asyncio.Semaphore(parallel)
        return await asyncio.gather(*(run(p, gate) for p in paths), return_exceptions=True)

    return dict(zip(paths, asyncio.run(run_all())))


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The notebook without anything a run adds: outputs, execution counts, cell timing, widget state."""
    for cell in nb.cells:
        cell.metadata = {}
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nb.metadata = {k: v for k, v in nb.metadata.items() if k in NOTEBOOK_METADATA}
    return nb


def committed_text(path: Path) -> str:
    """The notebook as git's index holds it (what a commit records); the file itself outside a checkout."""
    try:
        shown = subprocess.run(["git", "show", f":{path.relative_to(REPO).as_posix()}"], cwd=REPO,
                               capture_output=True, text=True, check=False)
    except OSError:  # no git
        return path.read_text()
    return shown.stdout if shown.returncode == 0 else path.read_text()


def test_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    assert names == ["01_architecture_tour.ipynb", "02_inside_the_refiner.ipynb", "03_flow_matching.ipynb",
                     "04_editing_two_guidances.ipynb", "05_six_training_stages.ipynb",
                     "06_ablations.ipynb"]
    readme = (NOTEBOOK_DIR / "README.md").read_text()
    assert all(name in readme for name in names)


@pytest.fixture(scope="session")
def runs(request) -> dict[Path, nbformat.NotebookNode | Exception]:
    """Every notebook that a selected test reads, each run once for the session."""
    wanted = set()
    for item in request.session.items:
        if item.module.__name__ != __name__:
            continue
        if item.originalname == "test_notebook_runs":
            wanted.add(item.callspec.params["path"])
        elif item.originalname == "test_notebook_06_shows_the_committed_study_results":
            wanted.add(ABLATIONS)
    return execute_all(sorted(wanted))


def executed(runs: dict, path: Path) -> nbformat.NotebookNode:
    result = runs[path]
    if isinstance(result, Exception):
        raise result
    return result


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, runs):
    nb = executed(runs, path)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors  # nbclient raises on the first error; this guards allow_errors being switched on
    assert all(c.execution_count is not None for c in nb.cells if c.cell_type == "code")


def test_notebook_06_shows_the_committed_study_results(runs):
    results = REPO / "docs" / "ablations"
    assert any(results.glob("*/*_seed*.json")), "no committed ablation results"
    nb = executed(runs, ABLATIONS)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    for study in ("refiner", "unified"):
        if any((results / study).glob("*_seed*.json")):
            assert study in text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_stripped(path):
    text = committed_text(path)
    nb = nbformat.reads(text, as_version=4)
    nbformat.validate(nb)
    assert [c for c in nb.cells if c.cell_type == "code"], f"{path.name} has no code"
    assert text == nbformat.writes(strip(nbformat.reads(text, as_version=4))) + "\n", (
        f"{path.name} is committed with outputs or run metadata; run `python -m tests.test_notebooks --strip` "
        "and stage it again (or set up the git filter in tests/test_notebooks.py)")


def test_strip_keeps_the_source_and_is_idempotent():
    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    code[0].outputs = [nbformat.v4.new_output("stream", text="hello\n")]
    code[0].execution_count = 3
    code[0].metadata = {"execution": {"iopub.execute_input": "2026-01-01"}}
    nb.metadata["widgets"] = {"state": {}}
    sources = [c.source for c in nb.cells]
    once = nbformat.writes(strip(nb))
    assert [c.source for c in nbformat.reads(once, as_version=4).cells] == sources
    assert "hello" not in once and "widgets" not in once and "iopub" not in once
    assert nbformat.writes(strip(nbformat.reads(once, as_version=4))) == once


def _save_outputs(nb: nbformat.NotebookNode, stem: str, folder: Path) -> int:
    """Every PNG as <stem>_<cell>_<k>.png and all printed text in <stem>.txt, for review; returns #figures."""
    count, text = 0, []
    for i, cell in enumerate(nb.cells):
        for k, output in enumerate(cell.get("outputs", [])):
            data = output.get("data", {})
            if "image/png" in data:
                (folder / f"{stem}_{i:02d}_{k}.png").write_bytes(base64.b64decode(data["image/png"]))
                count += 1
            elif output.get("text") or "text/plain" in data:
                text.append(f"--- cell {i}\n{output.get('text') or data['text/plain']}")
    (folder / f"{stem}.txt").write_text("\n".join(text))
    return count


def _cell_seconds(cell) -> float:
    timing = cell.metadata.get("execution", {})
    start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    if not (start and end):
        return 0.0
    return (datetime.fromisoformat(end.replace("Z", "+00:00"))
            - datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.test_notebooks", description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: all of notebooks/")
    parser.add_argument("--figures", type=Path, help="save every figure (PNG) and the printed text in this folder")
    parser.add_argument("--strip", action="store_true", help="strip the notebooks in place instead of running them")
    parser.add_argument("--clean", action="store_true", help="git clean filter: stripped notebook stdin -> stdout")
    args = parser.parse_args(argv)
    if args.clean:
        sys.stdout.write(nbformat.writes(strip(nbformat.reads(sys.stdin.read(), as_version=4))) + "\n")
        return 0
    paths = [p.resolve() for p in args.notebooks] or NOTEBOOKS
    if args.strip:
        for path in paths:
            path.write_text(nbformat.writes(strip(nbformat.read(path, as_version=4))) + "\n")
            print(f"stripped {path.name}")
        return 0
    if args.figures:
        args.figures.mkdir(parents=True, exist_ok=True)
    total = 0.0
    for path in paths:
        nb, seconds = execute(path)
        total += seconds
        slowest = sorted(((_cell_seconds(c), i) for i, c in enumerate(nb.cells) if c.cell_type == "code"),
                         reverse=True)[:3]
        saved = _save_outputs(nb, path.stem, args.figures) if args.figures else 0
        print(f"{path.name}: {seconds:.0f} s; slowest cells " + ", ".join(f"[{i}] {s:.0f} s" for s, i in slowest)
              + (f"; {saved} figures saved" if args.figures else ""), flush=True)
    print(f"total: {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
