"""A cpu engine with the production KV layout (bf16, uint8 caches: tests/runtime/conftest.py): manifest, allocation
and bytes per token, logits against the eager reference within the bf16 bounds (DESIGN.md section 8) across slots
at different positions and a reused slot, and `v4compile run` against eager greedy tokens."""

import json
import subprocess
import sys

import pytest
import torch

from v4compile.api import eager_generate
from v4compile.model.cache import Cache
from v4compile.model.kv_bytes import kv_bytes, measured_per_token
from v4compile.model.packed_ops import decode_kv
from v4compile.parity import in_top_k
from v4compile.quant.kv_layout import unpack_index_rows
from v4compile.validate import TOLERANCES, calc_diff

BOUND = TOLERANCES["model_logits"]["bf16"]
MAX_LEN = 32  # conftest.PRODUCTION_MAX_LEN


def test_manifest_records_the_production_layout(production_engine_dir, eager_bf16):
    m = json.loads((production_engine_dir / "manifest.json").read_text())
    assert m["precision"] == "bf16" and m["cache"]["kv_layout"] == "production" and m["parity"]["ok"]
    tensors = {t["name"]: t for t in m["cache"]["tensors"]}
    want = Cache.allocate(eager_bf16.cfg, 1, MAX_LEN, torch.bfloat16, "meta", "production").named_tensors()
    assert list(tensors) == list(want)
    for name, t in want.items():
        assert tensors[name]["dtype"] == str(t.dtype).removeprefix("torch.")
        assert tensors[name]["shape"] == [-1, *t.shape[1:]]
    assert tensors["blocks.1.kv"]["dtype"] == tensors["blocks.1.idx_kv_scale"]["dtype"] == "uint8"
    assert {"v4::csa_attention_fp8", "v4::hca_attention_fp8", "v4::sparse_attention_fp8"} <= set(m["kernels"])


def test_session_caches_are_production_bytes_per_token(production_engine):
    eng = production_engine
    assert eng.kv_layout == "production"
    s = eng.new_session(2)
    names = [e["name"] for e in eng.layout]
    assert all(t.dtype == torch.uint8 for n, t in zip(names, s.caches) if n.split(".")[-1] in ("ring", "kv", "idx_kv"))
    got = measured_per_token(zip(names, s.caches), eng.cfg.compress_ratios)
    assert got == kv_bytes(eng.cfg, "production").per_token < kv_bytes(eng.cfg, "reference").per_token


@torch.no_grad()
def test_logits_match_eager_across_slots_positions_and_a_reused_slot(production_engine, eager_bf16):
    """calc_diff over every call's logits within the bf16 bound (one decode step of two tokens alone is too
    noisy to gate: seeded tiny bf16 sits ~1e-2 from its own float32 twin at single positions, measured)."""
    eng, model = production_engine, eager_bf16
    g = torch.Generator().manual_seed(3)
    s, cache = eng.new_session(2), model.new_cache(2, MAX_LEN, "production")
    got, want = [], []

    def both(tok, sp):
        got.append(eng.prefill(tok, sp, s).flatten())
        want.append(model(tok, sp, cache).flatten())
        assert torch.isfinite(got[-1]).all(), sp

    both(torch.randint(0, 1024, (2, 11), generator=g), torch.tensor([0, 0]))
    s.reset([1])
    cache.reset([1])
    both(torch.randint(0, 1024, (2, 6), generator=g), torch.tensor([11, 0]))
    for i in range(14):  # slot 0: positions 17..30 (CSA blocks and the HCA block 16..31 end); slot 1: 6..19
        both(torch.randint(0, 1024, (2, 1), generator=g), torch.tensor([17 + i, 6 + i]))
    d = calc_diff(torch.cat(got), torch.cat(want))
    assert 0 < d < BOUND, d  # 3.0e-3 measured; > 0: a compiled program, not the eager one
    engine_cache = dict(zip(cache.named_tensors(), s.caches))
    for name, want_t in cache.named_tensors().items():  # the engine's bytes decode to the eager cache's values
        kind = name.rsplit(".", 1)[1]
        if kind in ("ring", "kv"):
            D = model.cfg.head_dim
            a = decode_kv(engine_cache[name], engine_cache[f"{name}_scale"], D, torch.float32)
            b = decode_kv(want_t, cache.named_tensors()[f"{name}_scale"], D, torch.float32)
        elif kind == "idx_kv":
            a = unpack_index_rows(engine_cache[name], engine_cache[f"{name}_scale"], torch.float32)
            b = unpack_index_rows(want_t, cache.named_tensors()[f"{name}_scale"], torch.float32)
        else:
            continue
        assert calc_diff(a, b) < BOUND, (name, calc_diff(a, b))


@torch.no_grad()
def test_slot_views_reach_the_model_aligned_and_their_writes_land(production_engine, monkeypatch):
    """A CUDA AOTInductor model clones an input that does not start at 16 bytes and loses its in-place writes (H100,
    session 8: "Input 17 was compiled as 16-bytes aligned ... Copying"; generate prefills each prompt in its own
    slot). Production caches pad their rows so that every slot view starts aligned (model/cache.py
    SLOT_ALIGN_ROWS): the model receives the session's own views, and a prompt prefilled and decoded in slot 1
    gives the bit-identical logits of the same prompt in a one-slot session."""
    from v4compile.runtime.engine import INPUT_ALIGN

    eng = production_engine
    s = eng.new_session(2)
    for slot in range(2):
        assert not any(v.data_ptr() % INPUT_ALIGN for v in s.rows([slot])), f"slot {slot} starts off alignment"
    real = dict(eng.models)

    def checked(name):
        def call(*args):
            off = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.data_ptr() % INPUT_ALIGN]
            assert off == [], f"{name}: inputs {off} start off {INPUT_ALIGN}-byte alignment"
            return real[name](*args)
        return call

    monkeypatch.setattr(eng, "models", {k: checked(k) for k in real})
    prompt = torch.randint(0, 1024, (1, 9), generator=torch.Generator().manual_seed(11))
    alone = eng.new_session(1)
    want = [eng.prefill(prompt, 0, alone), eng.decode(torch.tensor([7]), torch.tensor([9]), alone),
            eng.decode(torch.tensor([70]), torch.tensor([10]), alone)]
    got = [eng.prefill(prompt, 0, s, slots=[1]), eng.decode(torch.tensor([7]), torch.tensor([9]), s, slots=[1]),
           eng.decode(torch.tensor([70]), torch.tensor([10]), s, slots=[1])]
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    for t, u in zip(s.rows([1]), alone.caches):  # the writes landed in the session's own slot
        assert torch.equal(t, u)


def test_staged_copies_a_misaligned_view_and_writes_it_back():
    """Engines whose cache rows leave a slot off 16 bytes (built before the padding, or another layout) still get
    aligned inputs: _staged hands the model an aligned copy and copies its writes back into the view."""
    from v4compile.runtime.engine import INPUT_ALIGN, _staged

    base = torch.zeros(3, 9, 8, dtype=torch.uint8)  # 72 B per slot: slot 1 starts 8 bytes off
    aligned, view = base[0:1], base[1:2]
    assert view.data_ptr() % INPUT_ALIGN and not aligned.data_ptr() % INPUT_ALIGN
    with _staged([aligned, view]) as got:
        assert got[0] is aligned and got[1] is not view and not got[1].data_ptr() % INPUT_ALIGN
        got[1].fill_(5)
        got[0].fill_(1)
    assert (base[1] == 5).all() and (base[0] == 1).all() and (base[2] == 0).all()
    with _staged([aligned]) as same:
        assert same[0] is aligned


def test_cli_run_gives_the_eager_greedy_tokens(production_engine_dir, production_engine, eager_bf16):
    """Greedy tokens equal, or where they first part, each side's token is in the other's top-5 (DESIGN.md 8)."""
    prompt, n = [5, 17, 300], 6
    res = subprocess.run([sys.executable, "-m", "v4compile", "run", str(production_engine_dir), "--prompt-ids",
                          ",".join(map(str, prompt)), "--max-new-tokens", str(n), "--no-stop", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)["new_token_ids"]
    assert got == production_engine.generate([prompt], n, stop_tokens=())[0]
    with torch.no_grad():
        want = eager_generate(eager_bf16, prompt, n)
    if got != want:
        d = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        seq = torch.tensor([prompt + want[:d]])
        with torch.no_grad():
            ref = eager_bf16(seq)[0, -1]
        eng = production_engine.prefill(seq, 0, production_engine.new_session(1))[0, -1]
        assert in_top_k(ref, got[d]) and in_top_k(eng, want[d]), (got, want)


def test_explicit_reference_and_refused_production_requests():
    from v4compile.errors import ConfigError, TargetError
    from v4compile.targets import get_target
    from v4compile.targets.tensorrt import TENSORRT

    cpu = get_target("cpu")
    assert cpu.kv_layout("bf16") == "production" and cpu.kv_layout("fp32") == "reference"
    for gpu in ("h100", "h200"):  # production by default since session 8 (targets/h200.py), reference on request
        assert get_target(gpu).kv_layout("fp8") == get_target(gpu).kv_layout("bf16") == "production"
        assert get_target(gpu).kv_layout("fp8", "reference") == "reference"
    assert cpu.kv_layout("bf16", "reference") == "reference"
    assert TENSORRT.kv_layout("bf16") == "reference"
    with pytest.raises(ConfigError, match="precision fp32.*bf16"):
        cpu.kv_layout("fp32", "production")
    with pytest.raises(TargetError, match="target tensorrt .* reference KV cache layout only"):
        TENSORRT.kv_layout("bf16", "production")


def test_engines_without_kv_layout_are_reference_and_unknown_layouts_are_refused(engine_dir, tmp_path):
    import shutil

    from v4compile.api import load_engine
    from v4compile.errors import EngineError

    old = tmp_path / "old.engine"
    shutil.copytree(engine_dir, old)
    man = json.loads((old / "manifest.json").read_text())
    assert man["cache"].pop("kv_layout") == "reference"  # what the fp32 session engine records
    (old / "manifest.json").write_text(json.dumps(man))  # the manifest itself is not in its checksums
    assert load_engine(old).kv_layout == "reference"
    man["cache"]["kv_layout"] = "fp4"
    (old / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(EngineError, match="kv_layout 'fp4'"):
        load_engine(old)


def test_lowered_check_refuses_an_engine_of_another_build(production_engine_dir):
    """bench.lowered_check --engine compares an engine with the lowered program of the same preset / target /
    precision / KV layout only, and says so before the (slow) lowering."""
    from v4compile.bench.lowered_check import main

    with pytest.raises(SystemExit, match=r"built for .*'precision': 'bf16'.* this check runs .*'precision': 'fp32'"):
        main(["--preset", "tiny", "--target", "cpu", "--precision", "fp32", "--engine", str(production_engine_dir)])
