"""CLI: help, inspect (text and JSON), one-line errors with exit code 2."""

import json

import pytest
import torch

from click.testing import CliRunner

from v4compile.cli import main


def test_help_lists_commands():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for cmd in ("inspect", "demo"):
        assert cmd in r.output


def test_inspect_flash_prints_spec_kv_bytes():
    r = CliRunner().invoke(main, ["inspect", "--preset", "flash"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "3,514" in r.output and "48,068" in r.output and "13.68x" in r.output
    r = CliRunner().invoke(main, ["inspect", "--preset", "pro"], terminal_width=200)
    assert "5,031" in r.output


def test_inspect_json():
    r = CliRunner().invoke(main, ["inspect", "--preset", "tiny", "--json"])
    assert r.exit_code == 0
    s = json.loads(r.output)
    assert s["layers"]["csa"] == 2 and s["layers"]["hca"] == 1 and s["config"]["dim"] == 256


def test_bad_input_is_one_line_exit_2(tmp_path):
    for args in (["inspect", "--preset", "huge"], ["inspect"], ["inspect", "--checkpoint", str(tmp_path)],
                 ["inspect", "--preset", "tiny", "--checkpoint", str(tmp_path)]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2, (args, r.output)
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), r.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU contract; on a GPU the bench runs instead")
def test_bench_without_gpu_is_exit_3():
    r = CliRunner().invoke(main, ["bench", "kernels", "attention"])
    assert r.exit_code == 3 and "CUDA" in r.output
    r = CliRunner().invoke(main, ["bench", "kernels", "--list"])
    assert r.exit_code == 0 and "csa" in r.output.lower()
