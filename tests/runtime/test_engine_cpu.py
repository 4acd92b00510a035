"""The cpu engine end to end (the session's ONE build comes from conftest.py): parity with eager, the CLI,
batching, slot reuse, and every load / input error."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from v4compile.api import eager_generate, load_engine
from v4compile.errors import EngineError, InputError
from v4compile.validate import calc_diff

MAX_LEN, MAX_BATCH = 64, 4  # as built by conftest.engine_dir


def _prompt(n, seed):
    return torch.randint(0, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_manifest_follows_the_contract(engine_dir, eager):
    m = json.loads((engine_dir / "manifest.json").read_text())
    assert m["format_version"] == 2 and (m["target"], m["arch"], m["precision"]) == ("cpu", "cpu", "fp32")
    assert m["config"] == eager.cfg.to_dict()
    assert set(m["files"]) == {"model.pt2", "weights.safetensors"} and all(len(h) == 64 for h in m["files"].values())
    assert m["build"]["weights"] == "external" and m["weights"]["file"] == "weights.safetensors"
    assert m["cache"]["max_batch"] == MAX_BATCH and m["cache"]["max_len"] == MAX_LEN
    names = [t["name"] for t in m["cache"]["tensors"]]
    assert names == list(eager.new_cache(1, MAX_LEN).named_tensors())
    for t in m["cache"]["tensors"]:
        assert t["shape"][0] == -1 and t["init"] == ("neg_inf" if t["name"].endswith("score_state") else "zeros")
    assert m["parity"]["ok"] and m["parity"]["logits_calc_diff"] < 1e-5
    assert all(v.startswith("reference") for v in m["kernels"].values()) and "v4::csa_attention" in m["kernels"]
    assert m["kernels"]["v4::fp8_linear"] == "reference (weights dequantised at build)"
    assert not list(engine_dir.parent.glob(".tiny.engine.tmp-*"))


@pytest.mark.parametrize("lens", [(1,), (9,), (40, 3)])
def test_prefill_and_decode_logits_match_eager(engine, eager, lens):
    """Prefill a batch at per-sequence offsets (after a first chunk), then one decode step."""
    B = len(lens)
    s = engine.new_session(B)
    ref_cache = eager.new_cache(B, MAX_LEN)
    first = torch.tensor([_prompt(3, 7 + b) for b in range(B)])
    for fn in (lambda: engine.prefill(first, 0, s), lambda: eager(first, 0, ref_cache)):
        fn()
    T = max(lens)
    tok = torch.tensor([_prompt(T, b) for b in range(B)])
    start = torch.full((B,), 3)
    got, ref = engine.prefill(tok, start, s), eager(tok, start, ref_cache)
    assert got.shape == (B, T, 1024) and calc_diff(got, ref) < 1e-5, calc_diff(got, ref)
    nxt = ref[:, -1].argmax(-1, keepdim=True)
    got, ref = engine.decode(nxt, start + T, s), eager(nxt, start + T, ref_cache)
    assert got.shape == (B, 1, 1024) and calc_diff(got, ref) < 1e-5, calc_diff(got, ref)
    for name, a, b in zip(ref_cache.named_tensors(), s.caches, ref_cache.named_tensors().values()):
        assert torch.equal(torch.isinf(a), torch.isinf(b)), name
        fin = torch.isfinite(b)
        assert torch.allclose(a[fin], b[fin], atol=1e-4, rtol=1e-4), name


def test_cli_run_prints_the_eager_greedy_tokens(engine_dir, eager):
    prompt = _prompt(11, 3)
    want = eager_generate(eager, prompt, 6)
    res = subprocess.run([sys.executable, "-m", "v4compile", "run", str(engine_dir), "--prompt-ids",
                          ",".join(map(str, prompt)), "--max-new-tokens", "6", "--no-stop", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["new_token_ids"] == want


def test_batch_of_three_prompts_of_different_lengths(engine, eager):
    prompts = [_prompt(n, 20 + n) for n in (13, 2, 30)]
    batched = engine.generate(prompts, 5, stop_tokens=())
    for p, got in zip(prompts, batched):
        assert got == engine.generate([p], 5, stop_tokens=())[0] == eager_generate(eager, p, 5)


def test_reused_slot_starts_fresh(engine):
    s = engine.new_session(2)
    tok = torch.tensor([_prompt(17, 1), _prompt(17, 2)])
    fresh = engine.prefill(tok, 0, s).clone()
    engine.prefill(tok[:, :5], 17, s)  # dirty both slots further
    s.reset([0])
    again = engine.prefill(tok[:1], 0, s, slots=[0])
    assert torch.equal(again[0], fresh[0])
    assert s.positions == [17, 22]


def test_bad_input(engine):
    s = engine.new_session(1)
    with pytest.raises(InputError, match="token id 1024 outside \\[0, 1024\\)"):
        engine.prefill(torch.tensor([[1, 1024]]), 0, s)
    with pytest.raises(InputError, match="token id -1"):
        engine.generate([[3, -1]], 2)
    with pytest.raises(InputError, match=f"65 tokens \\+ 0 new exceeds this engine's max_len {MAX_LEN}"):
        engine.generate([[1] * (MAX_LEN + 1)], 0)
    with pytest.raises(InputError, match=f"exceeds this engine's max_len {MAX_LEN}"):
        engine.prefill(torch.ones(1, 5, dtype=torch.int64), MAX_LEN - 2, s)
    with pytest.raises(InputError, match="session batch 5"):
        engine.new_session(MAX_BATCH + 1)


@pytest.fixture()
def engine_copy(engine_dir, tmp_path):
    dst = tmp_path / "copy.engine"
    shutil.copytree(engine_dir, dst)
    return dst


def _edit_manifest(root, **changes):
    m = json.loads((root / "manifest.json").read_text())
    m.update(changes)
    (root / "manifest.json").write_text(json.dumps(m))


def test_changed_byte_in_package_is_a_checksum_error(engine_copy):
    p = engine_copy / "model.pt2"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(EngineError, match="model.pt2: sha256 .* differs from the manifest"):
        load_engine(engine_copy)


@pytest.mark.parametrize("version", [1, 3])  # 1: constants inside each model's .so; 3: a future format
def test_other_format_versions_are_refused(engine_copy, version):
    _edit_manifest(engine_copy, format_version=version)
    with pytest.raises(EngineError, match=f"format version {version}, this v4compile reads 2"):
        load_engine(engine_copy)


def test_changed_byte_in_weights_is_a_checksum_error(engine_copy):
    p = engine_copy / "weights.safetensors"
    data = bytearray(p.read_bytes())
    data[-5] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(EngineError, match="weights.safetensors: sha256 .* differs from the manifest"):
        load_engine(engine_copy)


def test_weights_the_models_need_must_be_listed(engine_copy):
    """A weights section missing one constant of a model: refused by name before anything runs (running a model
    with an unbound constant would crash the process)."""
    m = json.loads((engine_copy / "manifest.json").read_text())
    fqn = sorted(m["weights"]["models"]["prefill"])[0]
    del m["weights"]["models"]["prefill"][fqn]
    (engine_copy / "manifest.json").write_text(json.dumps(m))
    needs = f"model 'prefill' needs 1 constants the weights file lacks: {re.escape(fqn)}"
    with pytest.raises(EngineError, match=needs):
        load_engine(engine_copy)


def test_prefill_and_trace_share_stored_weights(engine_dir):
    """The session engine's prefill and trace programs: every constant they share by name is stored once."""
    m = json.loads((engine_dir / "manifest.json").read_text())["weights"]["models"]
    shared = set(m["prefill"]) & set(m["trace"])
    assert len(shared) > 20 and all(m["prefill"][k][0] == m["trace"][k][0] for k in shared)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks loading a GPU engine on a machine without one")
def test_sm90_engine_on_cpu_is_refused(engine_copy):
    _edit_manifest(engine_copy, arch="sm_90", target="h200")
    with pytest.raises(EngineError, match="built for arch sm_90 \\(target h200\\), loaded on a machine without a CUDA GPU"):
        load_engine(engine_copy)


def test_other_torch_minor_is_refused(engine_copy):
    _edit_manifest(engine_copy, torch="1.0.0")
    with pytest.raises(EngineError, match=re.escape(f"built with torch 1.0.0, this process runs torch {torch.__version__}")):
        load_engine(engine_copy)


def test_missing_engine_dir(tmp_path):
    with pytest.raises(EngineError, match="does not exist"):
        load_engine(tmp_path / "nope")


def test_manifest_without_weights_section_is_refused(engine_copy):
    m = json.loads((engine_copy / "manifest.json").read_text())
    del m["weights"]
    (engine_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="no 'weights' section"):
        load_engine(engine_copy)
