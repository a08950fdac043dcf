"""What installing the project promises: a wheel that declares only run-time dependencies, a Python minimum
that the pinned releases really support, and a Space whose requirements pip can install beside its Gradio.

The last two ask the package registry (PyPI, or the index named by PIP_INDEX_URL); where it cannot be
reached they skip and say so, since nothing on this machine can answer for it.
"""

from __future__ import annotations

import email.parser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import parse_wheel_filename

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DEV_TOOLS = {"pytest", "ruff", "jupyterlab", "playwright", "nbclient", "nbformat", "ipykernel", "ipywidgets"}
# The Linux x86_64 platforms pip would accept on a glibc 2.28 machine (a Space). pip does not widen an
# explicit --platform to the older manylinux tags by itself, and most wheels carry only those.
LINUX_PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def _name(req: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(req).name).lower()


def runtime_pins() -> list[str]:
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    return [line for line in lines if line]


def extra_pins() -> dict[str, list[str]]:
    return PYPROJECT["project"]["optional-dependencies"]


def minimum_python() -> tuple[int, int]:
    spec = PYPROJECT["project"]["requires-python"]
    found = re.fullmatch(r">=\s*3\.(\d+)", spec)
    assert found, f"requires-python should be a plain minimum such as '>=3.11', got {spec!r}"
    return 3, int(found.group(1))


# ----------------------------------------------------------------------------------------- offline

def test_runtime_and_extras_are_separate_and_consistent():
    runtime = {_name(r) for r in runtime_pins()}
    assert not runtime & DEV_TOOLS, f"development tools among the run-time dependencies: {runtime & DEV_TOOLS}"
    assert {"torch", "gradio"} <= runtime  # the package and the demo
    extras = extra_pins()
    assert set(extras) >= {"test", "notebooks"}
    pins: dict[str, str] = {}
    for req in [*runtime_pins(), *(r for group in extras.values() for r in group)]:
        parsed = Requirement(req)
        if parsed.name == "setuptools":  # the build backend, a range like build-system's
            continue
        assert len(parsed.specifier) == 1 and next(iter(parsed.specifier)).operator == "==", f"not pinned: {req}"
        assert pins.setdefault(_name(req), str(parsed.specifier)) == str(parsed.specifier), f"two pins: {req}"
    assert {"pytest", "ruff", "nbclient", "ipykernel", "playwright"} <= {_name(r) for r in extras["test"]}
    assert {"jupyterlab", "ipykernel"} <= {_name(r) for r in extras["notebooks"]}


def test_ruff_targets_the_minimum_python():
    major, minor = minimum_python()
    assert PYPROJECT["tool"]["ruff"]["target-version"] == f"py{major}{minor}"


def test_built_wheel_declares_only_runtime_dependencies(tmp_path):
    pytest.importorskip("setuptools", minversion="77", reason="the metadata build needs setuptools>=77 "
                        "(pip install -e '.[test]' installs it)")
    # Metadata depends only on these files; a copy keeps the build's egg-info out of the checkout.
    for name in ("pyproject.toml", "requirements.txt", "README.md", "LICENSE"):
        shutil.copy(REPO / name, tmp_path / name)
    for package in ("ovis_u1", "train"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "meta").mkdir()
    build = ("from setuptools import build_meta; "
             "print(build_meta.prepare_metadata_for_build_wheel('meta'))")
    done = subprocess.run([sys.executable, "-c", build], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    dist_info = tmp_path / "meta" / done.stdout.strip().splitlines()[-1]
    meta = email.parser.Parser().parsestr((dist_info / "METADATA").read_text())
    requires = meta.get_all("Requires-Dist") or []
    unconditional = sorted(r for r in requires if "extra ==" not in r)
    assert sorted(Requirement(r).name.lower() for r in unconditional) == sorted(
        Requirement(r).name.lower() for r in runtime_pins())
    for extra in ("test", "notebooks"):
        assert extra in (meta.get_all("Provides-Extra") or [])
        assert {Requirement(r).name.lower() for r in requires if f'extra == "{extra}"' in r} == {
            Requirement(r).name.lower() for r in extra_pins()[extra]}
    assert meta["Requires-Python"] == PYPROJECT["project"]["requires-python"]
    assert meta["License-Expression"] == "Apache-2.0"
    assert "LICENSE" in (meta.get_all("License-File") or [])
    assert "Apache License" in (REPO / "LICENSE").read_text()[:200]


# ------------------------------------------------------------------------------- the registry

def index_url() -> str:
    return os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


def registry_or_skip() -> str:
    url = index_url()
    try:
        urllib.request.urlopen(f"{url}/pip/", timeout=20).close()
    except (urllib.error.URLError, OSError) as err:
        pytest.skip(f"the package registry {url} is unreachable ({err}); this check needs it")
    return url


def _release_files(index: str, pin: str) -> list[dict]:
    """The files of a pinned release, from the index's JSON API (PEP 691)."""
    req = Requirement(pin)
    version = next(iter(req.specifier)).version
    ask = urllib.request.Request(f"{index}/{_name(pin)}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(ask, timeout=60) as reply:
        if "json" not in reply.headers.get("Content-Type", ""):
            pytest.skip(f"{index} does not serve the JSON simple API (PEP 691) this check reads")
        files = json.load(reply)["files"]
    wheels = []
    for f in files:
        if not f["filename"].endswith(".whl") or f.get("yanked"):
            continue
        _, v, _, tags = parse_wheel_filename(f["filename"])
        if str(v) == version:
            wheels.append({"tags": tags, "requires_python": f.get("requires-python")})
    return wheels


def _installable(wheels: list[dict], minor: int) -> bool:
    """Whether CPython 3.minor on Linux x86_64 could install one of these wheels."""
    python = f"3.{minor}.0"
    for wheel in wheels:
        if wheel["requires_python"] and python not in SpecifierSet(wheel["requires_python"]):
            continue
        for tag in wheel["tags"]:
            platform_ok = tag.platform == "any" or (tag.platform.startswith("manylinux")
                                                    and tag.platform.endswith("x86_64"))
            interp = tag.interpreter
            if not platform_ok:
                continue
            if interp in ("py3", f"py3{minor}") or interp == f"cp3{minor}":
                return True
            if tag.abi == "abi3" and interp.startswith("cp3") and int(interp[3:]) <= minor:
                return True
    return False


def test_requires_python_is_the_real_minimum():
    """Every pin (run time and extras) has a wheel for the stated minimum; one below it, some pin has none."""
    index = registry_or_skip()
    pins = [*runtime_pins(), *(r for group in extra_pins().values() for r in group if "==" in r)]
    with ThreadPoolExecutor(8) as pool:
        files = dict(zip(pins, pool.map(lambda pin: _release_files(index, pin), pins)))
    _, minor = minimum_python()
    missing = [pin for pin, wheels in files.items() if not _installable(wheels, minor)]
    assert not missing, f"no wheel for Python 3.{minor} on Linux x86_64: {missing}"
    below = [pin for pin, wheels in files.items() if not _installable(wheels, minor - 1)]
    assert below, f"every pin installs on Python 3.{minor - 1}: requires-python could be lower"


def test_space_requirements_resolve_with_its_gradio(request, tmp_path):
    """pip's resolver, in dry-run mode for the Space's platform and Python, installs spaces/requirements.txt
    together with the Gradio that the Space's sdk_version installs (pillow 13 once made that impossible)."""
    front = yaml.safe_load((REPO / "spaces" / "README.md").read_text().split("---\n")[1])
    requirements = REPO / "spaces" / "requirements.txt"
    gradio = f"gradio=={front['sdk_version']}"
    python = str(front["python_version"])
    # A resolution takes 40-100 s of network round trips; it is a function of these inputs (and the
    # registry), so a passing one is remembered in pytest's cache and redone when they change (a fresh
    # clone, as on CI, always resolves; `pytest --cache-clear` forces it).
    key = hashlib.sha256(f"{requirements.read_text()}|{gradio}|{python}|{index_url()}".encode()).hexdigest()
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    if cache is not None and cache.get("ovis_u1/space_resolution", None) == key:
        return
    index = registry_or_skip()
    help_text = subprocess.run([sys.executable, "-m", "pip", "install", "--help"], capture_output=True,
                               text=True).stdout
    # Range requests read each wheel's metadata without downloading it (torch's CUDA stack is ~3 GB);
    # a pip without the feature falls back to PEP 658 metadata or whole downloads.
    fast = ["--use-feature=fast-deps"] if "fast-deps" in help_text else []
    cmd = [sys.executable, "-m", "pip", "install", "--isolated", "--disable-pip-version-check", *fast,
           "--dry-run", "--ignore-installed", "--quiet", "--index-url", index,
           "--python-version", python, "--only-binary=:all:",
           *(arg for p in LINUX_PLATFORMS for arg in ("--platform", p)),
           "--target", str(tmp_path / "target"), "--report", str(tmp_path / "report.json"),
           "-r", str(requirements), gradio]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"the Space's requirements do not install with {gradio}:\n{done.stderr[-4000:]}"
    report = json.loads((tmp_path / "report.json").read_text())
    chosen = {_name(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]}
    assert chosen["gradio"] == str(front["sdk_version"])
    for line in requirements.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            req = Requirement(line)
            assert chosen[_name(line)] in req.specifier, (line, chosen[_name(line)])
    if cache is not None:
        cache.set("ovis_u1/space_resolution", key)
