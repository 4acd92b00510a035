"""The session's tiny cpu engine builds, shared by the Python runtime tests and the C++ runtime tests.

engine_dir: fp32 activations: engine and eager then differ only in summation order, so logits are compared with
the kernel tolerance and greedy tokens must agree exactly (bf16 noise can flip an argmax between near-ties).
production_engine_dir: bf16 with the production KV layout (uint8 caches, model/cache.py), which fp32 cannot
use; the smallest build that still crosses an HCA block (max_len 32, no trace program). It is built in a
background process started right after collection when a selected test needs it: most tests run on one thread,
so on the 2-core CI machine its ~3 min compile overlaps them instead of adding to the suite's time.
"""

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
def engine_dir(tmp_path_factory, eager):
    """tiny, cpu target, fp32, max_batch 4, max_len 64, build-time parity check on, with the trace program that
    `validate` reads per-layer data from (a few minutes on 2 cores; the trace program is one more compile)."""
    out = tmp_path_factory.mktemp("engines") / "tiny.engine"
    return build(eager, "cpu", "fp32", out, max_batch=MAX_BATCH, max_len=MAX_LEN, progress=False, trace=True)


@pytest.fixture(scope="session")
def engine(engine_dir):
    return load_engine(engine_dir)


@pytest.fixture(scope="session")
def eager_bf16():
    """The seeded tiny reference model at bf16 (what build("tiny", ..., "bf16") compiles)."""
    return ReferenceModel(ModelConfig.preset("tiny"), dtype=torch.bfloat16).eval()


_PRODUCTION_BUILD = (
    "import sys\n"
    "from v4compile.api import build\n"
    f"build('tiny', 'cpu', 'bf16', sys.argv[1], max_batch={PRODUCTION_MAX_BATCH}, max_len={PRODUCTION_MAX_LEN}, "
    "progress=False)\n")
_background: dict = {}  # "proc", "dir", "log": the production engine build started by pytest_collection_finish


def pytest_collection_finish(session):
    """Start the production engine build in the background when a selected test uses it."""
    if any("production_engine_dir" in getattr(item, "fixturenames", ()) for item in session.items):
        root = Path(tempfile.mkdtemp(prefix="v4compile-test-engine-"))
        log = open(root / "build.log", "w")
        proc = subprocess.Popen([sys.executable, "-c", _PRODUCTION_BUILD, str(root / "tiny-bf16.engine")],
                                stdout=log, stderr=subprocess.STDOUT)
        _background.update(proc=proc, dir=root, log=log)


def pytest_sessionfinish(session, exitstatus):
    proc = _background.get("proc")
    if proc is not None:
        if proc.poll() is None:  # the session ended first (e.g. -x): no build outlives it
            proc.kill()
            proc.wait()
        _background["log"].close()
        shutil.rmtree(_background["dir"], ignore_errors=True)


@pytest.fixture(scope="session")
def production_engine_dir(tmp_path_factory):
    """tiny, cpu target, bf16, default KV layout (production), max_batch 2, max_len 32, parity check on: the
    background build's result (built here when none was started)."""
    if "proc" not in _background:
        out = tmp_path_factory.mktemp("engines") / "tiny-bf16.engine"
        return build("tiny", "cpu", "bf16", out, max_batch=PRODUCTION_MAX_BATCH, max_len=PRODUCTION_MAX_LEN,
                     progress=False)
    rc = _background["proc"].wait()
    _background["log"].flush()
    if rc != 0:
        tail = (_background["dir"] / "build.log").read_text(errors="replace").strip().splitlines()[-15:]
        pytest.fail(f"the background production-layout engine build failed (exit {rc}):\n" + "\n".join(tail))
    return _background["dir"] / "tiny-bf16.engine"


@pytest.fixture(scope="session")
def production_engine(production_engine_dir):
    return load_engine(production_engine_dir)
