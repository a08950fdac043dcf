"""The README does what it says: its Python examples run as written on the shipped default model and print
what their comments promise, its quick-start test command is the one CI runs, and its links resolve."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def promised_prints(block: str) -> list[str]:
    """`print(...)  # shown` lines: the comment is what the line prints."""
    return [m.group(1).strip() for m in re.finditer(r"^print\(.*\)\s+#\s*(.+)$", block, flags=re.M)]


@pytest.mark.parametrize("index", range(len(code_blocks(README, "python"))))
def test_readme_python_example_runs(index, tmp_path):
    block = code_blocks(README, "python")[index]
    # A fresh interpreter in an empty folder, as a reader pasting the example would have (files it saves
    # land in tmp_path); the checkout is importable as after `pip install -e .`.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"README example {index} failed:\n{block}\n{done.stderr[-3000:]}"
    printed = [line.strip() for line in done.stdout.splitlines()]
    at = 0
    for shown in promised_prints(block):  # in order, each on a line of its own
        assert shown in printed[at:], f"README example {index} says it prints {shown!r}; it printed {printed}"
        at = printed.index(shown, at) + 1


def test_readme_examples_are_there():
    blocks = code_blocks(README, "python")
    assert blocks and any("text_to_image" in b and "edit(" in b and "answer(" in b for b in blocks)
    assert sum(len(promised_prints(b)) for b in blocks) >= 3


def quick_start() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in code_blocks(section, "bash")]


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
    commands = quick_start()
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    demo, tests = commands
    assert demo.startswith("pip install") and demo.endswith("python app.py")
    assert tests.startswith("pip install") and tests.endswith("python -m pytest -q")
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert tests in ci, ".ci/run must run the README's test command as written"
    assert "ruff check ." in ci


def test_readme_states_the_python_minimum():
    import tomllib
    minimum = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f"Python {minimum.removeprefix('>=')} or newer" in README


DOC_PAGES = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", DOC_PAGES)
def test_local_links_resolve(page):
    path = REPO / page
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)  # links in code are not links
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (path.parent / target.split("#")[0]).exists():
            broken.append(target)
    assert not broken, f"{page} links to missing files: {broken}"
