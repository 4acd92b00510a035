"""The measurements of `bench model`: decode steps and prefills of an engine, of the eager reference and of
torch.compile of the reference, each guarded (an OOM or a failure is recorded, the run goes on).

Decode at context C: every row of the batch decodes at the same positions; `warmup` untimed steps, then `steps`
timed steps at positions C - steps .. C - 1, so the last timed query sees C positions (C = 2^20 fits a cache of
max_position_embeddings = 2^20 positions). The caches hold no real prompt: they are filled once with seeded
random values of their dtype (model_floor.fill_random_). A time is the median wall clock of a synchronised step
(what a serving loop sees). The engine and eager caches are allocated per measurement and freed after it.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from v4compile.bench.model_floor import fill_random_, measured_kv_bytes
from v4compile.errors import V4Error
from v4compile.runtime import manifest as mf
from v4compile.validate import calc_diff

CACHE_FILL = ("caches filled once with seeded random values of their dtype (float: N(0, 1); integer codes: "
              "0..126), not a real prompt; finite everywhere, so no NaN / empty path is timed")


@dataclass
class Plan:
    """What one run measures."""

    contexts: tuple[int, ...]
    batches: tuple[int, ...]
    prefills: tuple[int, ...]
    steps: int
    warmup: int
    device: torch.device
    seed: int = 0
    prefill_chunk: int = 0  # 0: each prefill in one call; N: in calls of N tokens (continuation)
    compile_mode: str = "default"


# ------------------------------------------------------------------------------------------------ timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mem_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _mem_peak(device: torch.device) -> dict[str, int]:
    """Peak of torch's allocator since the last reset, and the device's used memory now (AOTI constants too)."""
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(device), "device_used_bytes": total - free}


def first_line(e: BaseException) -> str:
    """'ErrorType: first line of the message' (C++ traces are long)."""
    s = str(e).strip()
    return f"{type(e).__name__}: {(s.splitlines()[0] if s else '')[:300]}"


def _guarded(fn: Callable[[], dict[str, Any]], device: torch.device, broad: bool = False) -> dict[str, Any]:
    """One measurement; an OOM or a failure becomes its status (broad: any Exception, for torch.compile)."""
    catch = Exception if broad else (RuntimeError, MemoryError, V4Error)
    try:
        return fn()
    except catch as e:
        msg = first_line(e)
        oom = (isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in msg.lower()
               or "can't allocate memory" in msg)
        return {"status": "oom" if oom else "error", "error": msg}
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _timed_steps(step: Callable[[int], torch.Tensor], plan: Plan, device: torch.device) -> tuple[list[float], Any]:
    times, out = [], None
    for i in range(plan.warmup + plan.steps):
        _sync(device)
        t0 = time.perf_counter()
        out = step(i)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times, out


def _decode_inputs(vocab: int, batch: int, context: int, plan: Plan, device: torch.device | None = None
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Seeded tokens [n, batch, 1] and per-step start positions (all rows at C - n + i) for n = warmup + steps."""
    n = plan.warmup + plan.steps
    g = torch.Generator().manual_seed(plan.seed + batch * 7919 + context)
    tokens = torch.randint(0, vocab, (n, batch, 1), generator=g).to(device or "cpu")
    pos = [torch.full((batch,), context - n + i, dtype=torch.int64, device=device or "cpu") for i in range(n)]
    return tokens, pos


def _decode_result(times: list[float], out: torch.Tensor, batch: int, context: int, plan: Plan) -> dict[str, Any]:
    step = statistics.median(times[plan.warmup:])
    n = plan.warmup + plan.steps
    return {"status": "ok", "step_us": step * 1e6, "tokens_per_s": batch / step, "first_call_s": times[0],
            "timed_positions": [context - plan.steps, context - 1], "first_position": context - n,
            "logits_finite": bool(torch.isfinite(out).all())}


def _skip_reason(batch: int, context: int, plan: Plan, max_batch: int | None, max_len: int, what: str) -> str | None:
    if max_batch is not None and batch > max_batch:
        return f"batch {batch} > {what} max_batch {max_batch}"
    if context > max_len:
        return f"context {context} > {what} max_len {max_len}"
    if context < plan.warmup + plan.steps:
        return f"context {context} < warmup + steps = {plan.warmup + plan.steps} positions"
    return None


# ------------------------------------------------------------------------------------------------ engine


def engine_decode(engine: Any, batch: int, context: int, plan: Plan, kv: dict[str, Any]) -> dict[str, Any]:
    """Median decode step of `engine` at (batch, context); kv["engine"] gets the first session's cache bytes."""
    why = _skip_reason(batch, context, plan, engine.max_batch, engine.max_len, "engine")
    if why:
        return {"status": "skipped", "reason": why}
    dev = engine.device

    def run() -> dict[str, Any]:
        _mem_reset(dev)
        session = engine.new_session(batch)
        fill_random_(session.caches, plan.seed)
        kv.setdefault("engine", measured_kv_bytes(session.caches, [e["name"] for e in engine.layout], batch,
                                                  engine.max_len, engine.cfg.compress_ratios))
        tokens, pos = _decode_inputs(engine.vocab_size, batch, context, plan)
        times, out = _timed_steps(lambda i: engine.decode(tokens[i], pos[i], session), plan, dev)
        mode = engine.decode_mode if dev.type == "cuda" else "cpu (no CUDA graphs)"
        return {**_decode_result(times, out, batch, context, plan), "decode_mode": mode, **_mem_peak(dev)}

    return _guarded(run, dev)


def _chunked(call: Callable[[torch.Tensor, int], Any], tokens: torch.Tensor, chunk: int) -> None:
    T = tokens.shape[1]
    step = T if chunk <= 0 else chunk
    for lo in range(0, T, step):
        call(tokens[:, lo:lo + step], lo)


def _prefill_tokens(vocab: int, length: int, plan: Plan) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(plan.seed + length))


def engine_prefill(engine: Any, length: int, plan: Plan) -> dict[str, Any]:
    """Seconds and tokens/s of one sequence's prefill of `length` random tokens (after a 16-token warm-up)."""
    if length > engine.max_len:
        return {"status": "skipped", "reason": f"prefill {length} > engine max_len {engine.max_len}"}
    dev = engine.device

    def run() -> dict[str, Any]:
        _mem_reset(dev)
        session = engine.new_session(1)
        engine.prefill(_prefill_tokens(engine.vocab_size, min(16, length), plan), 0, session)  # warm-up
        session.reset()
        tokens = _prefill_tokens(engine.vocab_size, length, plan)
        _sync(dev)
        t0 = time.perf_counter()
        _chunked(lambda t, sp: engine.prefill(t, sp, session), tokens, plan.prefill_chunk)
        _sync(dev)
        s = time.perf_counter() - t0
        return {"status": "ok", "seconds": s, "tokens_per_s": length / s, **_mem_peak(dev)}

    return _guarded(run, dev)


def engine_phase(engine: Any, plan: Plan, kv: dict[str, Any], log: Callable[[str], None]
                 ) -> tuple[dict[tuple[int, int], dict], dict[int, dict]]:
    """Every decode (batch, context) and prefill length of the engine."""
    decode, prefill = {}, {}
    graphs = engine.decode_mode == "cuda-graph"
    for b in plan.batches:
        for c in plan.contexts:
            decode[b, c] = r = engine_decode(engine, b, c, plan, kv)
            engine.use_cuda_graphs(graphs)  # drop the captured graph: it pins the session's (max_len) caches
            log(f"engine decode b{b} ctx{c}: {_brief(r, 'step_us')}")
    for n in plan.prefills:
        prefill[n] = r = engine_prefill(engine, n, plan)
        log(f"engine prefill {n}: {_brief(r, 'tokens_per_s')}")
    if "engine" not in kv:  # no decode row ran: measure a batch-1 session anyway
        s = engine.new_session(1)
        kv["engine"] = measured_kv_bytes(s.caches, [e["name"] for e in engine.layout], 1, engine.max_len,
                                         engine.cfg.compress_ratios)
        del s
    return decode, prefill


def _brief(r: dict[str, Any], key: str) -> str:
    if r["status"] == "ok":
        return f"{r[key]:.1f} {key}"
    return f"{r['status']} ({r.get('reason') or r.get('error')})"


# ------------------------------------------------------------------------------------------------ eager / compile


def eager_decode(model: Any, batch: int, context: int, plan: Plan, kv: dict[str, Any] | None = None,
                 compiled: Callable[..., torch.Tensor] | None = None,
                 last: dict[tuple[int, int], torch.Tensor] | None = None) -> dict[str, Any]:
    """Median decode step of the reference at (batch, context) on a cache of exactly `context` positions, or of
    `compiled` (torch.compile of its EntryPoint; "compile_s": its first call, compile included). `last` keeps
    the eager run's final logits; the compiled run (same seeded caches and tokens) reports its calc_diff to them."""
    cfg, dev = model.cfg, plan.device
    why = _skip_reason(batch, context, plan, None, cfg.max_position_embeddings, "model (max_position_embeddings)")
    if why:
        return {"status": "skipped", "reason": why}

    def run() -> dict[str, Any]:
        _mem_reset(dev)
        cache = model.new_cache(batch, context)
        named = cache.named_tensors()
        fill_random_(named.values(), plan.seed)
        seen = kv.get("eager") if kv is not None else None
        if kv is not None and (seen is None or batch * context > seen["batch"] * seen["max_len"]):  # largest cache
            kv["eager"] = measured_kv_bytes(named.values(), named.keys(), batch, context, cfg.compress_ratios)
        tokens, pos = _decode_inputs(cfg.vocab_size, batch, context, plan, dev)
        flat = list(named.values())
        step = ((lambda i: model(tokens[i], pos[i], cache)) if compiled is None
                else (lambda i: compiled(tokens[i], pos[i], *flat)))
        with torch.no_grad():
            times, out = _timed_steps(step, plan, dev)
        r = {**_decode_result(times, out, batch, context, plan), **_mem_peak(dev)}
        if compiled is not None:
            r["compile_s"] = times[0]
            if last is not None and (batch, context) in last:
                r["calc_diff_vs_eager"] = calc_diff(out.float().cpu(), last[batch, context])
        elif last is not None:
            last[batch, context] = out.float().cpu()
        return r

    return _guarded(run, dev, broad=compiled is not None)


def eager_prefill(model: Any, length: int, plan: Plan) -> dict[str, Any]:
    """Seconds and tokens/s of the reference's prefill of `length` random tokens (after a 16-token warm-up)."""
    cfg, dev = model.cfg, plan.device
    if length > cfg.max_position_embeddings:
        why = f"prefill {length} > max_position_embeddings {cfg.max_position_embeddings}"
        return {"status": "skipped", "reason": why}

    def run() -> dict[str, Any]:
        _mem_reset(dev)
        with torch.no_grad():
            warm = min(16, length)
            model(_prefill_tokens(cfg.vocab_size, warm, plan).to(dev), 0, model.new_cache(1, warm))
            cache = model.new_cache(1, length)
            tokens = _prefill_tokens(cfg.vocab_size, length, plan).to(dev)
            _sync(dev)
            t0 = time.perf_counter()
            _chunked(lambda t, sp: model(t, sp, cache), tokens, plan.prefill_chunk)
            _sync(dev)
            s = time.perf_counter() - t0
        return {"status": "ok", "seconds": s, "tokens_per_s": length / s, **_mem_peak(dev)}

    return _guarded(run, dev)


@torch.no_grad()
def widen_e8m0_(model: Any) -> int:
    """UE8M0 weight-scale buffers -> float32 in place (exact: powers of two; the ops take either). Inductor has no
    float8_e8m0fnu codegen (KeyError, measured with torch 2.13 on the CPU); lower.widen_e8m0_constants does the
    same for engines. Returns how many buffers changed."""
    from v4compile.quant.formats import e8m0_to_float

    n = 0
    for module in model.modules():
        for name, t in list(module._buffers.items()):
            if t is not None and t.dtype == torch.float8_e8m0fnu:
                module._buffers[name] = e8m0_to_float(t)
                n += 1
    return n


def compile_decode_step(model: Any, mode: str) -> Callable[..., torch.Tensor]:
    """torch.compile of the reference's decode call with flat cache tensors (graph.capture.EntryPoint)."""
    from v4compile.graph.capture import EntryPoint

    cfg = model.cfg
    names = [e["name"] for e in mf.cache_layout(cfg, cfg.max_seq_len, model.act_dtype)]
    return torch.compile(EntryPoint(model, names, cfg.max_position_embeddings), mode=mode)


def eager_phase(model: Any, plan: Plan, kv: dict[str, Any], log: Callable[[str], None], eager: bool,
                compile_why_off: str | None) -> tuple[dict[tuple[int, int], dict], dict[int, dict]]:
    """Every decode (batch, context) of the reference and its prefills, then (unless `compile_why_off` says why
    not) every decode of torch.compile of it, its e8m0 scales widened first; after a compile error the later
    shapes are skipped with that error."""
    decode: dict[tuple[int, int], dict] = {(b, c): {} for b in plan.batches for c in plan.contexts}
    last: dict[tuple[int, int], torch.Tensor] = {}
    for (b, c), row in decode.items():
        row["eager"] = (eager_decode(model, b, c, plan, kv, last=last) if eager
                        else {"status": "off", "reason": "--no-eager"})
        log(f"eager decode b{b} ctx{c}: {_brief(row['eager'], 'step_us')}")
    prefill = {}
    for n in plan.prefills:
        prefill[n] = r = eager_prefill(model, n, plan) if eager else {"status": "off", "reason": "--no-eager"}
        log(f"eager prefill {n}: {_brief(r, 'tokens_per_s')}")
    failed = None
    if not compile_why_off:
        widen_e8m0_(model)
        compiled = compile_decode_step(model, plan.compile_mode)
    for (b, c), row in decode.items():
        if compile_why_off:
            row["compile"] = {"status": "off", "reason": compile_why_off}
        elif failed:
            row["compile"] = {"status": "skipped", "reason": f"torch.compile failed earlier ({failed})"}
        else:
            row["compile"] = eager_decode(model, b, c, plan, None, compiled, last)
            if row["compile"]["status"] == "error":
                failed = f"b{b} ctx{c}: {row['compile']['error']}"
            log(f"compile decode b{b} ctx{c}: {_brief(row['compile'], 'step_us')}")
    return decode, prefill
