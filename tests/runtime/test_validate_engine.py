"""`v4compile validate` on the session's tiny fp32 cpu engine (built with its trace program): passes against
the model it was built from, fails naming metric and layer against a perturbed checkpoint, and the trace
program's per-layer data equals the eager model's."""

import json

import pytest
import torch
from click.testing import CliRunner

from v4compile.api import load_engine
from v4compile.cli import main
from v4compile.errors import InputError
from v4compile.model.checkpoint import save_checkpoint
from v4compile.model.config import ModelConfig
from v4compile.model.reference import ReferenceModel
from v4compile.validate import calc_diff, validate

PERTURBED_LAYER = 2


@pytest.fixture(scope="module")
def perturbed_dir(tmp_path_factory):
    """The engine's model with layer 2's attention norm weight scaled by 1.5, saved as an official checkpoint.
    Validating the correct engine against it is the same mismatch as validating an engine built from this
    checkpoint against the correct model, without a second multi-minute engine build."""
    model = ReferenceModel(ModelConfig.preset("tiny"), dtype=torch.float32)
    with torch.no_grad():
        model.layers[PERTURBED_LAYER].attn_norm.weight.mul_(1.5)
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "perturbed")


def test_trace_program_matches_eager_per_layer(engine, eager):
    tok = torch.randint(0, eager.cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(3))
    ref_trace = {}
    ref = eager(tok, 0, eager.new_cache(2, engine.max_len), trace=ref_trace)
    got = engine.trace(tok)
    assert calc_diff(got["logits"], ref) < 1e-10
    assert sorted(got["hidden"]) == list(range(eager.cfg.n_layers))
    assert sorted(got["experts"]) == sorted(ref_trace["experts"])
    assert sorted(got["indexer"]) == [i for i in range(eager.cfg.n_layers) if eager.cfg.layer_kind(i) == "csa"]
    for i, h in ref_trace["hidden"].items():
        assert got["hidden"][i].shape == h.shape and calc_diff(got["hidden"][i], h) < 1e-10, i
    for kind in ("indexer", "experts"):
        for i, r in ref_trace[kind].items():
            assert torch.equal(got[kind][i].to(r.dtype), r), (kind, i)


def test_validate_passes_on_the_correct_engine(engine_dir, tmp_path):
    png, prompts = tmp_path / "layers.png", tmp_path / "p.json"
    # 41 tokens: 10 complete CSA blocks > index_topk 4, so the indexer really chooses; eager decode costs ~1 s a
    # step on 2 cores, hence 2 prompts x 3 steps (the default prompts are checked in tests/test_validate.py)
    prompts.write_text(json.dumps([torch.randint(0, 1024, (41,), generator=torch.Generator().manual_seed(5)).tolist(),
                                   [3]]))
    r = CliRunner().invoke(main, ["validate", str(engine_dir), "--preset", "tiny", "--prompts", str(prompts),
                                  "--steps", "3", "--json", "--plot", str(png)])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["ok"] and d["failures"] == [] and d["prompts"] == [41, 1] and d["notes"] == []
    assert [e["layer"] for e in d["per_layer"]] == [0, 1, 2, 3]
    for e in d["per_layer"]:
        assert e["hidden_calc_diff"] < 1e-10 and e["expert_agreement"] == 1.0
        assert e["hidden_local_calc_diff"] < 1e-10  # each layer on the engine's own streams
        assert ("indexer_overlap" in e) == (e["kind"] == "csa")
        assert e.get("indexer_overlap", 1.0) == 1.0
    local = {m["layer"]: m for m in d["metrics"] if m["name"] == "hidden.local_calc_diff"}
    assert sorted(local) == [0, 1, 2, 3] and all(m["ok"] for m in local.values())
    assert [m["value"] < 1e-10 for m in d["metrics"] if m["name"] == "head.local_calc_diff"] == [True]
    names = {m["name"] for m in d["metrics"]}
    assert {"logits.calc_diff", "logits.max_rel_err", "logits.kl_mean", "logits.kl_max", "logits.top1_agreement",
            "greedy.top5_violations", "decode.logits_calc_diff", "hidden.calc_diff", "indexer.overlap",
            "experts.agreement"} <= names
    assert all(g["agreed"] == 3 for g in d["greedy"])
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"


def test_validate_fails_naming_metric_and_layer_on_a_perturbed_checkpoint(engine_dir, perturbed_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("5,9,200,31,7,7,1000,3,3,3,12,13,14,15,16,17,18,19,20,21\n")
    r = CliRunner().invoke(main, ["validate", str(engine_dir), "--checkpoint", str(perturbed_dir), "--prompts",
                                  str(prompts), "--steps", "2"])
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert f"hidden.calc_diff layer {PERTURBED_LAYER}" in lines[0]
    report = validate(engine_dir, perturbed_dir, [[5, 9, 200, 31, 7, 7, 1000, 3]], steps=1)
    assert not report.ok
    for i in range(PERTURBED_LAYER):  # layers before the perturbed one still match exactly
        assert report.metric("hidden.calc_diff", i).ok
    assert not report.metric("hidden.calc_diff", PERTURBED_LAYER).ok and not report.metric("logits.calc_diff").ok


def test_validate_and_run_input_errors_on_a_real_engine(engine_dir, tmp_path):
    p = tmp_path / "p.json"
    tiny = ["--preset", "tiny"]
    cases = [("[[1, 2, 1024]]", tiny, "token id 1024 outside [0, 1024)"),
             (json.dumps([list(range(60))]), tiny, "60 tokens + 8 greedy steps exceeds the engine's max_len 64"),
             ("[[1, 2]]", [*tiny, "--steps", "63"], "exceeds the engine's max_len 64"),
             ("[[1, 2]]", ["--preset", "tiny-128"], "config differs from the engine's")]
    for text, extra, msg in cases:
        p.write_text(text)
        r = CliRunner().invoke(main, ["validate", str(engine_dir), "--prompts", str(p), *extra])
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and msg in lines[0], (extra, r.output)
    eng = load_engine(engine_dir)
    eng.manifest["build"]["source"] = None  # what an engine built from a Python model records
    with pytest.raises(InputError, match="does not record what it was built from"):
        validate(eng, None, [[1, 2]], steps=1)
    r = CliRunner().invoke(main, ["run", str(engine_dir), "--prompt-ids", "1,5000"])
    assert r.exit_code == 2 and "token id 5000" in r.output and len(r.output.strip().splitlines()) == 1
