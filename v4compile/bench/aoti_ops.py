"""One op (or the CSA indexer chain) AOTInductor-compiled alone vs its eager launch, on the tiny model's own
arguments: the check that separates "a kernel is wrong" from "AOTInductor runs a kernel wrongly".

    python -m v4compile.bench.aoti_ops [--cases chain:0,indexer_scores:0,topk_select:0,compress:1] \
        [--namespace v4triton] [--kv-layout reference|production] [--json OUT]

Each case records the arguments of the op's `index`-th call in two eager runs of the seeded tiny model (bf16,
on the GPU when there is one): batch 2 x 37 tokens (what the build traces with) and batch 1 x 128 tokens (the
parity prompt). It exports `torch.ops.<namespace>.<op>` alone with every tensor dim Dim.AUTO from the first,
AOTInductor-compiles it, runs it on both and compares outputs and mutated inputs with the eager launch (float
calc_diff, index sets row by row). Case `chain:i` is CSA layer i's indexer path as the fused csa_attention body
runs it: compress(indexer keys) -> indexer_scores(cache[:, :-1]) -> topk_select. With `--kv-layout production`
the model runs on production-layout caches, whose ops (indexer_scores_fp4:0, compress_packed:1, ...) can be
cases. Each case runs in its own process (AOTInductor compiles in parallel); `--namespace v4` checks the harness
itself on the reference ops.

Session 7, H100, before the fix of plugins/triton/launch.py: chain:0 scores calc_diff 1.0 and the -inf pattern
different at both shapes (the score kernel got `scores` again as its unused workspace pointer).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

CHAIN_COMPRESS = (1, 4)  # compress calls of the tiny model: L1 main, L1 indexer, L2 HCA, L3 main, L3 indexer


def _clone(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def record_calls(ops: tuple[str, ...], device: str, layout: str = "reference") -> dict[tuple[str, str], list[tuple]]:
    """{("ex" | "run", op): [args of each call]} from the two eager runs (module doc)."""
    from v4compile.model import ops as v4ops
    from v4compile.model.config import ModelConfig
    from v4compile.model.reference import ReferenceModel

    m = ReferenceModel(ModelConfig.preset("tiny"), dtype=torch.bfloat16, device=device).eval()
    m.ops.differentiable = True  # the model calls ops.BODIES, which are wrapped here
    calls: dict[tuple[str, str], list[tuple]] = {}
    tag = ["ex"]
    saved = {o: v4ops.BODIES[o] for o in ops}

    def recorder(o):
        def rec(*a):
            calls.setdefault((tag[0], o), []).append(_clone(a))
            return saved[o](*a)
        return rec

    v4ops.BODIES.update({o: recorder(o) for o in ops})
    try:
        g = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            m(torch.randint(0, m.cfg.vocab_size, (2, 37), generator=g).to(device), 0, m.new_cache(2, 256, layout))
            tag[0] = "run"
            m(torch.randint(0, m.cfg.vocab_size, (1, 128), generator=g).to(device), 0, m.new_cache(1, 256, layout))
    finally:
        v4ops.BODIES.update(saved)
    return calls


def _case(op: str, index: int, namespace: str, device: str, layout: str) -> tuple:
    """(fn, example args, run args) of one case."""
    ns = getattr(torch.ops, namespace)
    if op != "chain":
        calls = record_calls((op,), device, layout)
        return getattr(ns, op), calls[("ex", op)][index], calls[("run", op)][index]
    if layout != "reference":
        raise SystemExit("case chain: reference KV layout only (compress -> indexer_scores -> topk_select)")
    calls = record_calls(("compress", "indexer_scores", "topk_select"), device)

    def pack(tag: str) -> tuple:
        c = calls[(tag, "compress")][CHAIN_COMPRESS[index]]
        s = calls[(tag, "indexer_scores")][index]
        t = calls[(tag, "topk_select")][index]
        return c + (s[0], s[1], s[3], s[4], t[1])

    def chain(*a):
        c, (q, w, pos, ratio, k) = a[:12], a[12:]
        ns.compress(*c)
        cache = c[8]
        scores = ns.indexer_scores(q, w, cache[:, :cache.shape[1] - 1], pos, ratio)
        return ns.topk_select(scores, k), scores

    return chain, pack("ex"), pack("run")


def _compare(got, want, a_got: tuple, a_want: tuple, tensor_pos: list[int]) -> dict:
    from v4compile.validate import calc_diff

    out: dict = {}
    got = got if isinstance(got, (list, tuple)) else (got,)
    want = want if isinstance(want, tuple) else ((want,) if want is not None else ())
    for j, (g, w) in enumerate(zip(got, want)):
        g = g.to(w.device)
        if w.dtype in (torch.int32, torch.int64):
            rows_g, rows_w = g.reshape(-1, g.shape[-1]).tolist(), w.reshape(-1, w.shape[-1]).tolist()
            out[f"out{j}_rows_equal_as_sets"] = f"{sum(set(x) == set(y) for x, y in zip(rows_g, rows_w))}/{len(rows_w)}"
        else:
            out[f"out{j}_calc_diff"] = calc_diff(g.float(), w.float())
            out[f"out{j}_nonfinite_equal"] = bool(torch.equal(torch.isfinite(g), torch.isfinite(w)))
    for i in tensor_pos:
        if not torch.equal(a_got[i], a_want[i]):
            out[f"arg{i}_calc_diff"] = calc_diff(a_got[i].float(), a_want[i].float())
    return out


def run_case(spec: str, namespace: str, layout: str = "reference") -> dict:
    from torch.export import Dim

    from v4compile.runtime.engine import _share_libstdcxx

    import v4compile.plugins.triton  # noqa: F401  (registers the v4triton ops)
    from v4compile.targets.aoti import INDUCTOR_OPTIONS

    op, index = spec.split(":")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fn, ex, run = _case(op, int(index), namespace, device, layout)
    pos = [i for i, x in enumerate(ex) if isinstance(x, torch.Tensor)]

    class One(torch.nn.Module):
        def forward(self, *ts):
            a = list(ex)
            for i, t in zip(pos, ts):
                a[i] = t
            out = fn(*a)
            return () if out is None else out

    t0 = time.perf_counter()
    ep = torch.export.export(One(), _clone(tuple(ex[i] for i in pos)),
                             dynamic_shapes=(tuple({d: Dim.AUTO for d in range(ex[i].dim())} for i in pos),))
    package = torch._inductor.aoti_compile_and_package(ep, inductor_configs=dict(INDUCTOR_OPTIONS))
    _share_libstdcxx()
    runner = torch._inductor.aoti_load_package(package)
    res = {"case": spec, "namespace": namespace, "kv_layout": layout,
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "compile_seconds": round(time.perf_counter() - t0, 1)}
    for name, args in (("example", ex), ("run", run)):
        a_want, a_got = _clone(args), _clone(args)
        with torch.no_grad():
            want = fn(*a_want)
            got = runner(*tuple(a_got[i] for i in pos))
        res[name] = {"shapes": [list(args[i].shape) for i in pos], **_compare(got, want, a_got, a_want, pos)}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="chain:0,chain:1,indexer_scores:0,topk_select:0,compress:0,compress:1,"
                                       "sparse_attention:1,moe_route:0,moe_route:2")
    ap.add_argument("--namespace", default="v4triton")
    ap.add_argument("--kv-layout", default="reference", choices=("reference", "production"))
    ap.add_argument("--json")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a worker: run this case, print its JSON
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(run_case(a.one, a.namespace, a.kv_layout)))
        return 0
    procs = [(c, subprocess.Popen([sys.executable, "-m", "v4compile.bench.aoti_ops", "--one", c, "--namespace",
                                   a.namespace, "--kv-layout", a.kv_layout], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}))
             for c in a.cases.split(",")]
    results, ok = [], True
    for case, p in procs:
        out, err = p.communicate()
        if p.returncode:
            ok = False
            results.append({"case": case, "error": (err.strip().splitlines() or ["?"])[-1]})
        else:
            results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        print(json.dumps(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
