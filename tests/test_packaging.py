"""Package layout (DESIGN.md section 3): one `v4compile.*` namespace, editable and wheel installs."""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = {"graph": "v4compile.graph", "plugins": "v4compile.plugins", "quant": "v4compile.quant",
       "targets": "v4compile.targets"}


def _declared_packages() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def _package_dirs() -> set[str]:
    found = set()
    for init in ROOT.glob("**/__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts[0] in ("tests", ".venv", "build") or any(p.startswith(".") for p in rel.parts):
            continue
        head = rel.parts[0]
        dotted = TOP.get(head, head) + "".join("." + p for p in rel.parts[1:])
        found.add(dotted)
    return found


def test_every_package_directory_is_listed():
    assert _package_dirs() == set(_declared_packages())


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                          env={**os.environ, **env})


def test_editable_install_namespace():
    ok = _run("import v4compile.graph, v4compile.quant, v4compile.plugins, v4compile.targets; print('ok')")
    assert ok.returncode == 0, ok.stderr
    for top in TOP:
        bad = _run(f"import {top}")
        assert bad.returncode != 0 and "ModuleNotFoundError" in bad.stderr, f"`import {top}` must fail"


@pytest.mark.slow
def test_wheel_install_namespace(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheel_dir), str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = wheel_dir.glob("v4compile-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for dotted in _declared_packages():
        assert dotted.replace(".", "/") + "/__init__.py" in names, dotted
    assert not any(re.match(r"^(graph|plugins|quant|targets)/", n) for n in names)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import v4compile, v4compile.graph, v4compile.quant; "
            f"assert v4compile.__file__.startswith({str(target)!r}), v4compile.__file__; print('ok')")
    r = _run(code, PYTHONPATH=str(target))
    assert r.returncode == 0, r.stderr
    r = _run("import graph", PYTHONPATH=str(target))
    assert r.returncode != 0


def test_ci_runs_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    first_block = readme[readme.index("```bash") + 1: readme.index("```bash") + 3]
    assert first_block[0].endswith("v4compile demo")
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith(("#", "set ", "cd "))]
    assert ci == [first_block[1]]
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
