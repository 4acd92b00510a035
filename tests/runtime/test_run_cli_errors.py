"""`v4compile run` input errors: one line, exit 2, before any engine is loaded."""

from click.testing import CliRunner

from v4compile.cli import main


def test_run_command_errors_are_one_line_with_exit_2(tmp_path):
    res = CliRunner().invoke(main, ["run", str(tmp_path / "none.engine"), "--prompt-ids", "1,2"])
    assert res.exit_code == 2 and "does not exist" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["run", str(tmp_path), "--prompt-ids", "1,x"])
    assert res.exit_code == 2 and "expected comma-separated integers" in res.output
