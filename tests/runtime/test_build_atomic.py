"""An interrupted or failing build leaves no engine directory and no temporary directory (no AOTI compile here)."""

import pytest

import v4compile.graph.capture as capture_mod
from v4compile.api import build
from v4compile.errors import InputError


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch, exc):
    def boom(model, entry, **kwargs):
        assert len(list(tmp_path.glob(".tiny.engine.tmp-*"))) == 1  # the temp dir exists while building
        raise exc("stopped mid-way")

    monkeypatch.setattr(capture_mod, "capture", boom)
    out = tmp_path / "tiny.engine"
    with pytest.raises(exc, match="stopped mid-way"):
        build("tiny", "cpu", "fp32", out, max_len=32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused(tmp_path):
    out = tmp_path / "tiny.engine"
    out.mkdir()
    with pytest.raises(InputError, match="already exists"):
        build("tiny", "cpu", "fp32", out, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.engine"]
