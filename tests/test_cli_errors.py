"""Every CLI command's bad-input paths that need no engine: one `error: ...` line, exit 2 (3 for a target)."""

import pytest
from click.testing import CliRunner

from v4compile.cli import main


def _one_line(r, code, progress_before=False):
    """The error is one line; progress_before: finished-stage lines (build) may precede it."""
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    if progress_before:
        lines = [ln for ln in lines if not ln.startswith("done ")]
    assert r.exit_code == code and len(lines) == 1 and lines[0].startswith("error: "), (r.exit_code, r.output)
    assert "Traceback" not in r.output
    return lines[0]


@pytest.fixture()
def prompts(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("1,2,3\n")
    return p


def test_validate_bad_inputs_exit_2(tmp_path, prompts):
    engine = str(tmp_path / "no.engine")
    bad = tmp_path / "bad.txt"
    bad.write_text("1,2\nthree\n")
    cases = [
        ([engine], "does not exist"),
        ([engine, "--preset", "tiny", "--checkpoint", str(tmp_path)], "at most one of --preset"),
        ([engine, "--preset", "huge"], "huge"),
        ([engine, "--checkpoint", str(tmp_path / "nope")], "not a directory"),
        ([engine, "--steps", "0"], "--steps 0"),
        ([engine, "--steps", "-3"], "--steps -3"),
        ([engine, "--prompts", str(bad)], "line 2"),
        ([engine, "--prompts", str(tmp_path / "missing.txt")], "no such file"),
        ([engine, "--steps", "many"], "many"),  # click's own usage error, also one line
        ([engine, "--nope"], "--nope"),
        ([], "ENGINE"),
    ]
    for args, msg in cases:
        line = _one_line(CliRunner().invoke(main, ["validate", *args]), 2)
        assert msg in line, (args, line)


def test_build_bad_inputs(tmp_path):
    out = str(tmp_path / "e")
    for args, msg in ((["--preset", "tiny", "--checkpoint", str(tmp_path)], "exactly one"), ([], "exactly one"),
                      (["--preset", "huge"], "huge"), (["--checkpoint", str(tmp_path / "none")], "not a directory"),
                      (["--preset", "tiny", "--precision", "fp4"], "fp4"),
                      (["--preset", "tiny", "--max-len", "1"], "max_len 1"),
                      (["--preset", "tiny", "--kv-layout", "packed"], "packed"),
                      (["--preset", "tiny", "--kv-layout", "production"], "precision fp32")):  # fp32 is the default
        line = _one_line(CliRunner().invoke(main, ["build", *args, "-o", out]), 2, progress_before=True)
        assert msg in line, (args, line)
    (tmp_path / "exists").mkdir()
    line = _one_line(CliRunner().invoke(main, ["build", "--preset", "tiny", "-o", str(tmp_path / "exists")]), 2)
    assert "already exists" in line
    line = _one_line(CliRunner().invoke(main, ["build", "--preset", "tiny", "--target", "tpu", "-o", out]), 3)
    assert "unknown target 'tpu'" in line
    line = _one_line(CliRunner().invoke(main, ["build", "--preset", "tiny", "--target", "tensorrt", "--precision",
                                               "bf16", "--kv-layout", "production", "-o", out]), 3)
    assert "target tensorrt builds engines with the reference KV cache layout only" in line
    assert not (tmp_path / "e").exists()


def test_run_and_demo_bad_inputs(tmp_path):
    for args, msg in ((["run", str(tmp_path / "none"), "--prompt-ids", "1"], "does not exist"),
                      (["run", str(tmp_path), "--prompt-ids", ""], "empty"),
                      (["run", str(tmp_path)], "--prompt-ids"),
                      (["run", str(tmp_path), "--prompt-ids", "1", "--max-new-tokens", "x"], "x"),
                      (["run", str(tmp_path), "--prompt-ids", "1"], "no manifest.json"),
                      (["demo", "--contexts", "2k"], "--contexts '2k'"),
                      (["nosuchcommand"], "nosuchcommand")):
        line = _one_line(CliRunner().invoke(main, args), 2)
        assert msg in line, (args, line)


def test_every_command_has_help_with_an_example():
    for cmd in (["build"], ["validate"], ["run"], ["inspect"], ["demo"], ["bench"], ["bench", "kernels"],
                ["bench", "moe"], []):
        r = CliRunner().invoke(main, [*cmd, "--help"])
        assert r.exit_code == 0 and "v4compile " in r.output and "Example" in r.output, cmd
