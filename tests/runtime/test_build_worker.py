"""The parallel build (v4compile/build_worker.py): a worker that fails names its entry point and its error, and
stops the others; the parent's weights reach workers that cannot rebuild the model from a name.
The success path is the session engine of tests/runtime/conftest.py (prefill + trace built in parallel)."""

import json
import re
from pathlib import Path

import pytest
import torch

from v4compile import build_worker
from v4compile.build_worker import EntryJob, _run_workers, _source_spec, build_entries_parallel, parallel_wanted
from v4compile.errors import ExportError
from v4compile.model.checkpoint import model_from_state_dict
from v4compile.model.config import ModelConfig
from v4compile.model.reference import ReferenceModel


def test_parallel_only_for_several_programs(monkeypatch):
    monkeypatch.delenv("V4COMPILE_PARALLEL_COMPILE", raising=False)
    assert not parallel_wanted(1) and parallel_wanted(2)
    assert not parallel_wanted(2, build_worker.PARALLEL_MAX_BYTES + 1)  # large weights: one process, shared
    monkeypatch.setenv("V4COMPILE_PARALLEL_COMPILE", "0")
    assert not parallel_wanted(3)


def test_source_spec(tmp_path):
    assert _source_spec("tiny", None, tmp_path) == {"preset": "tiny"}
    assert _source_spec(str(tmp_path), None, tmp_path) == {"checkpoint": str(tmp_path.resolve())}
    model = ReferenceModel(ModelConfig.preset("tiny"), dtype=torch.float32).eval()
    spec = _source_spec(model, model, tmp_path)
    saved = torch.load(spec["state_dict"], weights_only=True)
    back = model_from_state_dict(ModelConfig.from_dict(saved["config"]), saved["state_dict"], dtype=torch.float32)
    sd = back.state_dict()
    assert sd.keys() == model.state_dict().keys()
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    tok = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(back(tok, 0, back.new_cache(1, 8)), model(tok, 0, model.new_cache(1, 8)))


def test_failing_worker_names_entry_and_error(tmp_path):
    model = ReferenceModel(ModelConfig.preset("tiny"), dtype=torch.float32).eval()
    job = EntryJob("cpu", "fp64", max_len=32, max_batch=2, allow_lossy_repack=False)  # no such precision
    with pytest.raises(ExportError, match=r"building the (prefill|trace) entry point failed .*fp64") as err:
        _run_workers(model, model, job, ("prefill", "trace"), tmp_path)
    kept = Path(re.search(r"traceback included: (\S+)\)", str(err.value)).group(1))
    try:  # the worker's whole log outlives the scratch directory: the traceback behind a bare last line
        assert "Traceback" in kept.read_text() and not kept.is_relative_to(tmp_path)
    finally:
        kept.unlink()
    logs = sorted(p.parent.name for p in tmp_path.glob("*/worker.log"))
    assert logs == ["prefill", "trace"]  # both workers started, from the saved weights
    assert (tmp_path / "model.pt").exists()


def test_scratch_is_removed(monkeypatch):
    seen = []
    monkeypatch.setattr(build_worker, "_run_workers", lambda *a: seen.append(a[-1]) or {})
    assert build_entries_parallel("tiny", None, None, ("prefill", "trace")) == {}
    assert seen and not seen[0].exists()


def test_session_engine_holds_only_its_artefacts(engine_dir):
    # the session engine (prefill + trace) was built by two workers: nothing of theirs lands in the engine
    assert sorted(p.name for p in engine_dir.iterdir()) == ["manifest.json", "model.pt2", "weights.safetensors"]
    stages = json.loads((engine_dir / "manifest.json").read_text())["build"]["stage_seconds"]
    assert any("2 programs in parallel" in name for name in stages)
