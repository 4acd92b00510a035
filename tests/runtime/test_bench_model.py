"""`v4compile bench model` on the CPU: the session's tiny cpu engine (fp32, max_batch 4, max_len 64) next to the
eager reference, JSON fields, skipped contexts, and the floor / KV byte counts against hand computations."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from v4compile.bench import model_measure
from v4compile.bench.model import run_model_bench
from v4compile.bench.model_floor import decode_cache_bytes, measured_kv_bytes
from v4compile.cli import main as cli_main
from v4compile.model.cache import Cache
from v4compile.model.config import ModelConfig
from v4compile.model.kv_bytes import kv_bytes
from v4compile.runtime import manifest as mf

CONTEXTS, BATCH, PREFILLS, STEPS = (24, 40, 100), 2, (8, 100), 2  # 100 > the engine's max_len 64
F32 = 4  # the session engine's caches are float32


@pytest.fixture(scope="module")
def bench(engine_dir, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("bench_model") / "model.json"
    returned = run_model_bench(engine=str(engine_dir), contexts=CONTEXTS, batches=(BATCH,), prefills=PREFILLS,
                               steps=STEPS, json_path=str(out), quiet=True)
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(returned, default=str)), "returned payload differs from the JSON file"
    return written


def _numbers(x, path=""):
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return
    if isinstance(x, (int, float)):
        yield path, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")


def test_fields_statuses_and_skips(bench):
    for key in ("time", "torch", "triton", "ceilings", "rows", "device", "config", "engine", "plan", "cache_fill",
                "floor_cache_layout", "floor_definition", "decode", "prefill", "kv_bytes"):
        assert key in bench, key
    assert bench["engine"]["status"] == "on" and bench["engine"]["max_len"] == 64
    assert [(d["batch"], d["context"]) for d in bench["decode"]] == [(BATCH, c) for c in CONTEXTS]
    for d in bench["decode"]:
        assert set(d["floor"]) == {"bytes", "us", "weights", "caches"}
        assert d["eager"]["status"] == "ok", d["eager"]
        assert d["compile"]["status"] == "off" and "CPU" in d["compile"]["reason"]  # off by default on the CPU
        runs = [d["eager"]] + ([d["engine"]] if d["context"] <= 64 else [])
        for r in runs:
            for k in ("step_us", "tokens_per_s", "first_call_s", "timed_positions", "logits_finite", "x_floor"):
                assert k in r, (k, r)
            assert r["logits_finite"] is True
            assert r["timed_positions"] == [d["context"] - STEPS, d["context"] - 1]
        if d["context"] <= 64:
            assert d["engine"]["status"] == "ok" and d["engine"]["decode_mode"].startswith("cpu")
            assert d["eager_over_engine"] > 0
        else:
            assert d["engine"] == {"status": "skipped", "reason": "context 100 > engine max_len 64"}
    pre = {p["tokens"]: p for p in bench["prefill"]}
    assert pre[8]["engine"]["status"] == "ok" and pre[8]["eager"]["status"] == "ok"
    assert pre[100]["engine"] == {"status": "skipped", "reason": "prefill 100 > engine max_len 64"}
    assert pre[100]["eager"]["status"] == "ok"
    kv = bench["kv_bytes"]
    for k in ("engine_measured", "eager_measured", "production_per_token", "v32_per_token",
              "ratio_v32_over_measured", "ratio_measured_over_production"):
        assert kv[k], k
    impls = {(r["bench"], r["impl"]) for r in bench["rows"]}
    assert ("decode_b2_ctx24", "engine") in impls and ("decode_b2_ctx100", "engine") not in impls
    assert ("decode_b2_ctx100", "floor") in impls and ("prefill_100", "eager") in impls


def test_numbers_finite_and_measured_ones_positive(bench):
    nums = list(_numbers(bench))
    assert nums and all(math.isfinite(v) for _, v in nums), [p for p, v in nums if not math.isfinite(v)]
    assert all(v >= 0 for _, v in nums), [p for p, v in nums if v < 0]
    assert bench["ceilings"]["copy_gbps"] > 0
    for d in bench["decode"]:
        assert d["floor"]["bytes"] > 0 and d["floor"]["us"] > 0
        for impl in ("engine", "eager"):
            if d[impl]["status"] == "ok":
                assert min(d[impl][k] for k in ("step_us", "tokens_per_s", "first_call_s", "x_floor")) > 0
    for p in bench["prefill"]:
        for r in (p["engine"], p["eager"]):
            if r["status"] == "ok":
                assert r["seconds"] > 0 and r["tokens_per_s"] > 0


def _hand_floor(cfg: ModelConfig, batch: int, context: int) -> tuple[int, int, int]:
    """(weights, routed expert, cache) bytes of one decode step, written out from V4-SPEC section 12's table."""
    d, D, H, V, q = cfg.dim, cfg.head_dim, cfg.n_heads, cfg.vocab_size, cfg.q_lora_rank
    G, ro, Hi, Di, E, k, I = (cfg.o_groups, cfg.o_lora_rank, cfg.index_n_heads, cfg.index_head_dim,
                              cfg.n_routed_experts, cfg.n_activated_experts, cfg.moe_inter_dim)
    hc, mix = cfg.hc_mult, (2 + cfg.hc_mult) * cfg.hc_mult

    def fp8(o, i):  # e4m3 weight + one UE8M0 byte per 128x128 block
        return o * i + -(-o // 128) * -(-i // 128)

    def fp4(o, i):  # packed e2m1 (2 per byte) + one UE8M0 byte per 32 inputs
        return o * i // 2 + o * (i // 32)

    weights = V * d * 2 + d * 2 + (hc * hc * d + hc + 1) * 4  # bf16 head, final norm, hc_head fn/base/scale
    weights += batch * d * 2  # the looked-up bf16 embedding rows only
    experts, cache = 0, 0
    for i in range(cfg.n_layers):  # the MTP block is not run by decode
        m = cfg.compress_ratios[i]
        w = 2 * d * 2 + q * 2 + D * 2 + H * 4  # attn/ffn norms, q_norm, kv_norm (bf16), sink (f32)
        w += fp8(q, d) + fp8(H * D, q) + fp8(D, d) + fp8(G * ro, H // G * D) + fp8(d, G * ro)
        if m:
            c = 2 if m == 4 else 1
            w += m * c * D * 4 + 2 * c * D * d * 2 + D * 2  # ape f32, wkv + wgate bf16, norm
        if m == 4:
            w += fp8(Hi * Di, q) + Hi * d * 2 + 4 * 2 * Di * 4 + 2 * 2 * Di * d * 2 + Di * 2
        w += E * d * 2 + (batch * k * 8 if i < cfg.n_hash_layers else E * 4)  # gate; tid2eid rows or bias
        w += 2 * fp8(I, d) + fp8(d, I)  # shared expert
        w += 2 * (mix * hc * d + mix + 3) * 4  # hc_attn / hc_ffn fn, base, scale
        weights += w
        experts += min(batch * k, E) * (2 * fp4(I, d) + fp4(d, I))
        cache += min(context, cfg.window_size) * D * F32
        if m == 4:
            cache += (context // 4) * Di * F32 + min(cfg.index_topk, context // 4) * D * F32
        elif m:
            cache += (context // m) * D * F32
    return weights, experts, batch * cache


def test_floor_bytes_match_a_hand_computation(bench):
    cfg = ModelConfig.preset("tiny")
    assert cfg.weight_dtype == "fp8" and cfg.expert_dtype == "fp4"  # what _hand_floor writes out
    for d in bench["decode"]:
        weights, experts, cache = _hand_floor(cfg, d["batch"], d["context"])
        f = d["floor"]
        assert f["weights"]["routed_experts"] == experts
        assert sum(f["caches"].values()) == cache, (d["context"], f["caches"], cache)
        assert f["bytes"] == weights + experts + cache, (d["context"], f, weights + experts + cache)
        assert f["us"] == pytest.approx(f["bytes"] / (bench["ceilings"]["copy_gbps"] * 1e3))


def test_measured_kv_bytes_match_the_allocation(bench):
    cfg, L = ModelConfig.preset("tiny"), 64
    D, Di, W = cfg.head_dim, cfg.index_head_dim, cfg.window_size
    total = growing = 0
    for m in cfg.compress_ratios:  # every block, MTP included: the session allocates them all
        total += W * D * F32
        if m:
            c = 2 if m == 4 else 1
            growing += (L // m + 1) * D * F32
            total += 2 * (c * m) * (c * D) * F32  # kv_state + score_state
        if m == 4:
            growing += (L // 4 + 1) * Di * F32
            total += 2 * 8 * 2 * Di * F32
    got = bench["kv_bytes"]["engine_measured"]
    assert got["growing_per_token"] == pytest.approx(growing / L)
    assert got["per_token"] == pytest.approx((total + growing) / L)
    assert bench["kv_bytes"]["ratio_v32_over_measured"] == pytest.approx(48068 / got["per_token"])
    # the long-context bytes per token of the engine's allocation: fp32 rows, twice the bf16 reference formula
    assert got["layout"] == bench["kv_bytes"]["measured_layout"] == "reference"
    assert got["entries_per_token"] == bench["kv_bytes"]["measured_per_token"]
    assert got["entries_per_token"] == 2 * kv_bytes(cfg, "reference").per_token


def test_production_layout_floor_and_measured_bytes_count_the_scale_tensors():
    """What `bench model` reports for a production-layout engine, from its manifest's cache entries (no build)."""
    cfg, L, B, C = ModelConfig.preset("tiny"), 64, 2, 40
    layout = mf.cache_layout(cfg, L, torch.bfloat16, "production")
    entry = (cfg.head_dim - cfg.rope_head_dim) + 2 * cfg.rope_head_dim + 8  # e4m3 nope, bf16 RoPE, 8 scale bytes
    key = cfg.index_head_dim // 2 + cfg.index_head_dim // 32  # packed e2m1 + UE8M0 per 32
    n_csa = sum(cfg.layer_kind(i) == "csa" for i in range(cfg.n_layers))
    assert decode_cache_bytes(cfg, layout, B, C) == {
        "window": B * cfg.n_layers * min(C, cfg.window_size) * entry,
        "csa_index_keys": B * n_csa * (C // 4) * key, "csa_selected": B * n_csa * min(cfg.index_topk, C // 4) * entry,
        "hca_compressed": B * (C // 16) * entry}
    named = Cache.allocate(cfg, B, L, torch.bfloat16, layout="production").named_tensors()
    m = measured_kv_bytes(named.values(), named.keys(), B, L, cfg.compress_ratios)
    assert m["layout"] == "production" and m["entries_per_token"] == kv_bytes(cfg, "production").per_token
    growing = ("kv", "kv_scale", "idx_kv", "idx_kv_scale")
    assert m["growing_per_token"] == pytest.approx(sum(t.nbytes for n, t in named.items()
                                                       if n.rsplit(".", 1)[1] in growing) / (B * L))


def test_compile_failure_is_recorded_and_later_shapes_skipped(monkeypatch, one_thread):
    def broken(model, mode):
        def step(*args):
            raise RuntimeError("inductor said no\ntraceback lines")
        return step

    monkeypatch.setattr(model_measure, "compile_decode_step", broken)
    out = run_model_bench(preset="tiny", no_engine=True, use_compile=True, contexts=(8, 12), batches=(1,),
                          prefills=(), steps=1, quiet=True)
    first, second = (d["compile"] for d in out["decode"])
    assert first == {"status": "error", "error": "RuntimeError: inductor said no"}
    assert second["status"] == "skipped" and "inductor said no" in second["reason"]
    assert all(d["eager"]["status"] == "ok" and d["engine"]["status"] == "off" for d in out["decode"])


def test_cli_bench_model_writes_json(tmp_path):
    out = tmp_path / "m.json"
    res = CliRunner().invoke(cli_main, ["bench", "model", "--preset", "tiny", "--no-engine", "--no-eager",
                                        "--no-compile", "--contexts", "32", "--batch", "1", "--prefill", "",
                                        "--json", str(out)])
    assert res.exit_code == 0, res.output
    payload = json.loads(out.read_text())
    assert payload["command"].startswith("v4compile bench model --preset tiny")
    (d,) = payload["decode"]
    assert [d[i]["status"] for i in ("engine", "eager", "compile")] == ["off", "off", "off"]
    weights, experts, _ = _hand_floor(ModelConfig.preset("tiny"), 1, 32)  # its caches: fp32; these: bf16 reference
    assert d["floor"]["bytes"] == weights + experts + sum(d["floor"]["caches"].values())


def test_engine_build_failure_is_recorded_and_the_run_goes_on(tmp_path):
    out = run_model_bench(preset="tiny", target="h200", engine_cache=str(tmp_path), contexts=(32,), batches=(1,),
                          prefills=(16,), steps=1, eager=False, use_compile=False, quiet=True)
    assert out["engine"]["status"] == "error" and "h200" in out["engine"]["reason"]  # no GPU here: TargetError
    (d,) = out["decode"]
    assert d["engine"] == {"status": "error", "reason": out["engine"]["reason"]}
    assert out["prefill"][0]["engine"]["reason"] == out["engine"]["reason"] and d["floor"]["bytes"] > 0
    assert not list(tmp_path.iterdir())  # nothing half-built left in the engine cache


def test_cli_bench_model_help_and_bad_input():
    r = CliRunner().invoke(cli_main, ["bench", "model", "--help"])
    assert r.exit_code == 0 and "v4compile bench model" in r.output and "Example" in r.output
    r = CliRunner().invoke(cli_main, ["bench", "model", "--contexts", "2k", "--no-engine"])
    assert r.exit_code == 2 and "'2k'" in r.output, r.output


def test_profile_of_the_engine_decode_step(engine_dir, one_thread, capsys):
    """--profile: the first (batch, context)'s decode step under torch.profiler (CPU operators here), reported in
    payload["engine"]["profile"] and printed; the engine's decode mode is restored afterwards."""
    out = run_model_bench(engine=str(engine_dir), contexts=(24,), batches=(1,), prefills=(), steps=1,
                          eager=False, use_compile=False, profile=True)
    prof = out["engine"]["profile"]
    assert (prof["batch"], prof["context"], prof["what"]) == (1, 24, "CPU operators")
    assert prof["kernels_per_step"] >= 1 and prof["busy_us_per_step"] > 0 and prof["distinct"] >= len(prof["top"]) >= 1
    assert all(r["count_per_step"] > 0 and r["us_per_step"] >= 0 for r in prof["top"])
    assert [r["us_per_step"] for r in prof["top"]] == sorted((r["us_per_step"] for r in prof["top"]), reverse=True)
    assert "us busy per step" in capsys.readouterr().out
