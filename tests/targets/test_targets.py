"""Targets: lookup, precision checks, machine checks (no build here: see tests/runtime)."""

import pytest
import torch
from click.testing import CliRunner

from v4compile.cli import main
from v4compile.errors import TargetError
from v4compile.targets import TARGETS, check_machine, get_target


def test_known_targets_describe_themselves():
    assert set(TARGETS) == {"cpu", "h100", "h200"}
    cpu = get_target("cpu")
    assert (cpu.arch, cpu.kernel_policy, cpu.tested) == ("cpu", "decompose", True)
    for name in ("h100", "h200"):
        t = get_target(name)
        assert (t.arch, t.device, t.kernel_policy, t.tested) == ("sm_90", "cuda", "registry", False)
        assert "v4::sparse_attention" in t.ops


def test_unknown_target_is_a_target_error_with_exit_3():
    with pytest.raises(TargetError, match="unknown target 'tpu'.*cpu, h100, h200"):
        get_target("tpu")
    assert TargetError.exit_code == 3
    res = CliRunner().invoke(main, ["build", "--preset", "tiny", "--target", "tpu", "-o", "x.engine"])
    assert res.exit_code == 3 and "unknown target 'tpu'" in res.output


def test_precision_checks():
    cpu = get_target("cpu")
    assert cpu.act_dtype("fp32") == torch.float32 and cpu.act_dtype("bf16") == torch.bfloat16
    with pytest.raises(TargetError, match="does not build precision 'fp8'"):
        cpu.act_dtype("fp8")
    with pytest.raises(TargetError, match="precision 'int4'"):
        get_target("h200").check_precision("int4")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_gpu_target_on_a_machine_without_gpu():
    check_machine(get_target("cpu"))
    with pytest.raises(TargetError, match="h200 needs a CUDA GPU \\(sm_90\\); this machine has none"):
        check_machine(get_target("h200"))
    res = CliRunner().invoke(main, ["build", "--preset", "tiny", "--target", "h100", "--precision", "bf16",
                                    "-o", "x.engine"])
    assert res.exit_code == 3 and "needs a CUDA GPU" in res.output

