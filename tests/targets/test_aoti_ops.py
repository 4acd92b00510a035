"""`python -m v4compile.bench.aoti_ops`: an op alone, AOTInductor-compiled with dynamic dims from the build's
example shapes, against its eager launch at the parity prompt's shapes. On the CPU it runs the reference ops
(`--namespace v4`): the harness itself, exact; on a GPU the Triton ops (docs/perf/engines.md, session 7)."""

import json

from v4compile.bench import aoti_ops


def test_reference_chain_compiles_exactly(tmp_path):
    """The CSA indexer chain (its compressor mutates state and cache in place, then scores and picks are read)."""
    out = tmp_path / "aoti_ops.json"
    assert aoti_ops.main(["--cases", "chain:0", "--namespace", "v4", "--json", str(out)]) == 0
    (chain,) = json.loads(out.read_text())
    for shape in ("example", "run"):
        assert chain[shape]["out0_rows_equal_as_sets"] in ("74/74", "128/128")
        assert chain[shape]["out1_calc_diff"] == 0.0 and chain[shape]["out1_nonfinite_equal"]
        # mutated inputs (compressor state, cache) are listed only where they differ from the eager launch
        assert not [k for k in chain[shape] if k.startswith("arg")]
    assert chain["run"]["shapes"][-1] == [1, 128] and chain["example"]["shapes"][-1] == [2, 37]
