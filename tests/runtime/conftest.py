"""The session's tiny cpu engine builds, shared by the Python runtime tests and the C++ runtime tests.

engine_dir: fp32 activations: engine and eager then differ only in summation order, so logits are compared with
the kernel tolerance and greedy tokens must agree exactly (bf16 noise can flip an argmax between near-ties).
production_engine_dir: bf16 with the production KV layout (uint8 caches, model/cache.py), which fp32 cannot
use; the smallest build that still crosses an HCA block (max_len 32, no trace program). Both are built in
background processes started right after collection when a selected test needs them: most tests run on one
thread, so on the 2-core CI machine their compiles (~4 and ~3 min) overlap the tests that need no engine instead of
adding to the suite's time.
"""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from v4compile.api import build, load_engine
from v4compile.model.config import ModelConfig
from v4compile.model.reference import ReferenceModel

MAX_LEN, MAX_BATCH = 64, 4
PRODUCTION_MAX_LEN, PRODUCTION_MAX_BATCH = 32, 2


@pytest.fixture(scope="session")
def eager():
    """The seeded tiny reference model (fp32) the engine is built from."""
    return ReferenceModel(ModelConfig.preset("tiny"), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory):
    """tiny (the `eager` fixture's seeded weights), cpu target, fp32, max_batch 4, max_len 64, build-time parity
    check on, with the trace program that `validate` reads per-layer data from: the background build's result
    (built here when none was started)."""
    return _engine("engine_dir", tmp_path_factory)


@pytest.fixture(scope="session")
def engine(engine_dir):
    return load_engine(engine_dir)


@pytest.fixture(scope="session")
def eager_bf16():
    """The seeded tiny reference model at bf16 (what build("tiny", ..., "bf16") compiles)."""
    return ReferenceModel(ModelConfig.preset("tiny"), dtype=torch.bfloat16).eval()


_BUILDS = {  # fixture -> (engine directory name, build() keyword arguments)
    "engine_dir": ("tiny.engine", dict(precision="fp32", max_batch=MAX_BATCH, max_len=MAX_LEN, trace=True)),
    "production_engine_dir": ("tiny-bf16.engine", dict(precision="bf16", max_batch=PRODUCTION_MAX_BATCH,
                                                       max_len=PRODUCTION_MAX_LEN)),
}
_BUILD_SCRIPT = ("import json, sys\nfrom v4compile.api import build\n"
                 "build('tiny', 'cpu', out_dir=sys.argv[1], progress=False, **json.loads(sys.argv[2]))\n")
_background: dict[str, dict] = {}  # fixture -> {"proc", "dir", "log"}: builds started by pytest_collection_finish


def pytest_collection_finish(session):
    """Start a background build for each engine fixture a selected test uses."""
    for fixture, (name, kwargs) in _BUILDS.items():
        if any(fixture in getattr(item, "fixturenames", ()) for item in session.items):
            root = Path(tempfile.mkdtemp(prefix="v4compile-test-engine-"))
            log = open(root / "build.log", "w")
            proc = subprocess.Popen([sys.executable, "-c", _BUILD_SCRIPT, str(root / name), json.dumps(kwargs)],
                                    stdout=log, stderr=subprocess.STDOUT)
            _background[fixture] = dict(proc=proc, dir=root, log=log)


def pytest_sessionfinish(session, exitstatus):
    for bg in _background.values():
        if bg["proc"].poll() is None:  # the session ended first (e.g. -x): no build outlives it
            bg["proc"].kill()
            bg["proc"].wait()
        bg["log"].close()
        shutil.rmtree(bg["dir"], ignore_errors=True)


def _engine(fixture: str, tmp_path_factory) -> Path:
    name, kwargs = _BUILDS[fixture]
    bg = _background.get(fixture)
    if bg is None:
        return build("tiny", "cpu", out_dir=tmp_path_factory.mktemp("engines") / name, progress=False, **kwargs)
    rc = bg["proc"].wait()
    bg["log"].flush()
    if rc != 0:
        tail = (bg["dir"] / "build.log").read_text(errors="replace").strip().splitlines()[-15:]
        pytest.fail(f"the background {fixture} engine build failed (exit {rc}):\n" + "\n".join(tail))
    return bg["dir"] / name


@pytest.fixture(scope="session")
def production_engine_dir(tmp_path_factory):
    """tiny, cpu target, bf16, default KV layout (production), max_batch 2, max_len 32, parity check on: the
    background build's result (built here when none was started)."""
    return _engine("production_engine_dir", tmp_path_factory)


@pytest.fixture(scope="session")
def production_engine(production_engine_dir):
    return load_engine(production_engine_dir)
