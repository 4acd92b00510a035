"""Entry kernels of the AOT plugins: the plugins/triton kernels behind TensorRT's argument order.

TensorRT launches an AOT plugin's kernel with (input pointers..., int32 extra args..., output pointers...) and
pads Triton's two hidden scratch pointers with null. Our kernels interleave pointers, sizes and strides, so each
plugin gets a thin `@triton.jit` entry here whose runtime parameters are exactly specs.KERNEL_SPECS[name].arg_names
(tested); it derives the strides of the dense TensorRT tensors (in int64) and calls the plugins/triton kernel by
keyword, which Triton inlines. Integer arguments are widened with tl.cast, not `.to`: Triton's JIT passes an
integer argument equal to 1 as a constexpr (a Python int, which has no `.to`), e.g. T at decode. Attributes
arrive as constexprs (baked into the PTX). An aliased output (in-place update) is the same buffer as its input:
the entry reads and writes through the output pointer.

Legend as in the kernels' modules: B batch, T tokens of the call, CW compressor projection width, N cache rows.
"""

from __future__ import annotations

import triton
import triton.language as tl

from v4compile.plugins.triton.compressor import _pool_kernel, _state_kernel
from v4compile.plugins.triton.indexer_topk import _scores_kernel
from v4compile.plugins.triton.moe_gemm import (_combine_kernel, _count_kernel, _gemm1_kernel, _gemm2_kernel,
                                               _quant_act_kernel, _scatter_kernel)
from v4compile.plugins.triton.moe_route import _router_kernel
from v4compile.plugins.triton.radix_topk import _compact_kernel, _finish_kernel, _hist_kernel
from v4compile.plugins.triton.sparse_attention import _sparse_attn_kernel


@triton.jit
def v4trt_compress_pool(kv_proj, gate_proj, ape, norm_weight, inv_freq, start_pos, kv_state, score_state, cache,
                        T, N1, cache_out,
                        M: tl.constexpr, C: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, R: tl.constexpr,
                        SB: tl.constexpr, ROTATE: tl.constexpr, EPS: tl.constexpr, HD_SCALE: tl.constexpr):
    CW: tl.constexpr = C * D
    t = tl.cast(T, tl.int64)
    _pool_kernel(kvp_ptr=kv_proj, gp_ptr=gate_proj, ape_ptr=ape, nw_ptr=norm_weight, invf_ptr=inv_freq,
                 start_ptr=start_pos, kvs_ptr=kv_state, scs_ptr=score_state, cache_ptr=cache_out,
                 T=T, n_blocks=N1 - 1, eps=EPS, hd_scale=HD_SCALE, sk_b=t * CW, sk_t=CW, sg_b=t * CW, sg_t=CW,
                 ss_b=C * M * CW, sc_b=tl.cast(N1, tl.int64) * D, sc_n=D, M=M, C=C, D=D, DP=DP, R=R, SB=SB,
                 ROTATE=ROTATE)


@triton.jit
def v4trt_compress_state(kv_proj, gate_proj, ape, start_pos, kv_state, score_state, after, T,
                         kv_state_out, score_state_out,
                         M: tl.constexpr, C: tl.constexpr, CW: tl.constexpr, SP: tl.constexpr, CB: tl.constexpr):
    t = tl.cast(T, tl.int64)
    _state_kernel(kvp_ptr=kv_proj, gp_ptr=gate_proj, ape_ptr=ape, start_ptr=start_pos, kvs_ptr=kv_state_out,
                  scs_ptr=score_state_out, T=T, sk_b=t * CW, sk_t=CW, sg_b=t * CW, sg_t=CW, ss_b=C * M * CW,
                  M=M, C=C, CW=CW, SP=SP, CB=CB)


@triton.jit
def v4trt_indexer_scores(q, weights, k_cache, positions, T, N, tiles, scores, ws,
                         RATIO: tl.constexpr, HI: tl.constexpr, DI: tl.constexpr, BT: tl.constexpr,
                         BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, NUM_STAGES: tl.constexpr):
    t = tl.cast(T, tl.int64)
    n = tl.cast(N, tl.int64)
    _scores_kernel(q_ptr=q, w_ptr=weights, k_ptr=k_cache, pos_ptr=positions, s_ptr=scores, ws_ptr=ws,
                   T=T, N=N, ratio=RATIO, tiles=tiles, sq_b=t * HI * DI, sq_t=HI * DI, sq_h=DI, sw_b=t * HI, sw_t=HI,
                   sk_b=(n + 1) * DI, sk_n=DI, sp_b=t, sp_t=1, ss_r=n, HI=HI, DI=DI, BT=BT, BLOCK_N=BLOCK_N,
                   HIST=False, WRITE_MASKED=False, ZERO_WS=True, DOT_PREC=DOT_PREC, NUM_STAGES=NUM_STAGES)


@triton.jit
def v4trt_topk_hist(scores, positions, ws, T, N, chunk, ws_out,
                    LEVEL: tl.constexpr, K: tl.constexpr, RATIO: tl.constexpr, BLOCK: tl.constexpr,
                    CAP: tl.constexpr):
    _hist_kernel(s_ptr=scores, pos_ptr=positions, ws_ptr=ws_out, k=K, T=T, N=N, ratio=RATIO, chunk=chunk,
                 sp_b=T, sp_t=1, ss_r=N, LEVEL=LEVEL, HAS_POS=True, BLOCK=BLOCK, CAP=CAP)


@triton.jit
def v4trt_topk_compact(scores, positions, ws, T, N, chunk, n_chunks, runs, cand, ws_out,
                       K: tl.constexpr, RATIO: tl.constexpr, BLOCK: tl.constexpr, CAP: tl.constexpr,
                       HIST3: tl.constexpr):
    _compact_kernel(s_ptr=scores, pos_ptr=positions, ws_ptr=ws_out, run_ptr=runs, cand_ptr=cand, out_ptr=runs,
                    k=K, T=T, N=N, ratio=RATIO, chunk=chunk, n_chunks=n_chunks, sp_b=T, sp_t=1, ss_r=N,
                    HAS_POS=True, BLOCK=BLOCK, CAP=CAP, FUSE_FINISH=False, HIST3=HIST3,
                    REVERSE=False)  # radix_topk.REVERSE_CHUNKS: a test-only chunk order


@triton.jit
def v4trt_topk_finish(scores, positions, ws, runs, cand, T, N, chunk, n_chunks, idx, runs_out, cand_out,
                      K: tl.constexpr, RATIO: tl.constexpr, CAP: tl.constexpr, HIST3: tl.constexpr):
    _finish_kernel(s_ptr=scores, pos_ptr=positions, ws_ptr=ws, run_ptr=runs_out, cand_ptr=cand_out, out_ptr=idx,
                   k=K, T=T, N=N, ratio=RATIO, chunk=chunk, n_chunks=n_chunks, sp_b=T, sp_t=1, ss_r=N,
                   HAS_POS=True, CAP=CAP, HIST3=HIST3)


@triton.jit
def v4trt_sparse_attention(q, kv, idx, kv2, idx2, sink, T, H, D, N, N2, K, K2, out,
                           QK_SCALE: tl.constexpr, SINK_SCALE: tl.constexpr, BLOCK_H: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    t = tl.cast(T, tl.int64)
    hd = tl.cast(H, tl.int64) * D
    n_blocks = tl.cdiv(K, BLOCK_N) + tl.cdiv(K2, BLOCK_N)  # one split: it walks every block
    _sparse_attn_kernel(q_ptr=q, kv_ptr=kv, sc_ptr=kv, idx_ptr=idx, kv2_ptr=kv2, sc2_ptr=kv2, idx2_ptr=idx2,
                        sink_ptr=sink, o_ptr=out, part_acc_ptr=out, part_ml_ptr=out,
                        T=T, H=H, D=D, N=N, N2=N2, K=K, K2=K2, blocks_per_split=n_blocks, qk_scale=QK_SCALE,
                        sink_scale=SINK_SCALE, s_qb=t * hd, s_qt=hd, s_qh=D, s_kvb=tl.cast(N, tl.int64) * D, s_kvn=D,
                        s_scb=tl.cast(N, tl.int64) * D, s_scn=D, s_ib=t * K, s_it=K, s_kv2b=tl.cast(N2, tl.int64) * D,
                        s_kv2n=D, s_sc2b=tl.cast(N2, tl.int64) * D, s_sc2n=D, s_i2b=t * K2, s_i2t=K2, s_ob=t * hd,
                        s_ot=hd, s_oh=D, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, SPLIT=False,
                        DOT_PREC=DOT_PREC, FP8=False, NOPE=0)


@triton.jit
def v4trt_moe_route(x, gate_w, bias, tid2eid, token_ids, N, E, D, weights, ids,
                    ROUTE_SCALE: tl.constexpr, TOPK: tl.constexpr, HASH: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BM: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr,
                    FP32_DOT: tl.constexpr):
    _router_kernel(x_ptr=x, g_ptr=gate_w, bias_ptr=bias, tid_ptr=tid2eid, tok_ptr=token_ids, part_ptr=weights,
                   w_ptr=weights, id_ptr=ids, N=N, E=E, D=D, k_per_split=tl.cdiv(D, BK) * BK,
                   route_scale=ROUTE_SCALE, stride_xn=D, stride_ge=D, stride_tid=TOPK, BM=BM, BE=BE, BK=BK,
                   TOPK=TOPK, KP=KP, SPLIT=1, HASH=HASH, HAS_BIAS=HAS_BIAS, FP32_DOT=FP32_DOT)


# FP8 MoE experts (moe_gemm's grouped path, the one its launcher takes under torch.export): routes r = n * K + j,
# no shared experts in the stack (v4::moe_experts), f32 block scales [E, O / SCALE_BN, K / SK].


@triton.jit
def v4trt_moe_quant_act(x, N, xq, xs, counts, D: tl.constexpr, BR: tl.constexpr, E: tl.constexpr,
                        EP: tl.constexpr):
    _quant_act_kernel(x_ptr=x, q_ptr=xq, s_ptr=xs, N=N, stride_xn=D, stride_qn=D, stride_sn=D // 128, BR=BR)
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):  # the launcher's torch.zeros of the route counts
        ar = tl.arange(0, EP)
        tl.store(counts + ar, tl.zeros([EP], dtype=tl.int32), mask=ar < E)


@triton.jit
def v4trt_moe_count(ids, counts, R, rank, counts_out, K: tl.constexpr, E: tl.constexpr, BLOCK: tl.constexpr):
    _count_kernel(ids_ptr=ids, counts_ptr=counts_out, rank_ptr=rank, R=R, K_ROUTED=K, K_TOTAL=K, E_ROUTED=E,
                  E_TOTAL=E, BLOCK=BLOCK)


@triton.jit
def v4trt_moe_scatter(ids, counts, rank, R, sroute, K: tl.constexpr, E: tl.constexpr, BM: tl.constexpr,
                      EP: tl.constexpr, BLOCK: tl.constexpr):
    _scatter_kernel(ids_ptr=ids, counts_ptr=counts, rank_ptr=rank, sroute_ptr=sroute, R=R, K_ROUTED=K, K_TOTAL=K,
                    E_ROUTED=E, E_TOTAL=E, BM=BM, EP=EP, BLOCK=BLOCK)


@triton.jit
def v4trt_moe_gemm1(x, xq, xs, w1, w3, s1, s3, weights, ids, counts, sroute, I, D, h, hs,
                    LIMIT: tl.constexpr, K: tl.constexpr, E: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, EP: tl.constexpr, SCALE_BN: tl.constexpr, SK: tl.constexpr,
                    ROUND: tl.constexpr):
    _gemm1_kernel(a_ptr=xq, as_ptr=xs, wg_ptr=w1, wu_ptr=w3, sg_ptr=s1, su_ptr=s3, rw_ptr=weights, ids_ptr=ids,
                  counts_ptr=counts, sroute_ptr=sroute, h_ptr=h, hs_ptr=hs, limit=LIMIT, I=I, D=D, K_ROUTED=K,
                  K_TOTAL=K, E_ROUTED=E, E_TOTAL=E, stride_an=D, stride_asn=D // 128, stride_we=I * D, stride_wn=D,
                  stride_se=(I // SCALE_BN) * (D // SK), stride_sn=D // SK, stride_hp=I, stride_hsp=I // 128,
                  BM=BM, BN=BN, EP=EP, SCALE_BN=SCALE_BN, SK=SK, ROUTE_TILES=False, H_FP8=True, E8M0=False,
                  ROUND=ROUND)


@triton.jit
def v4trt_moe_gemm2(x, h, hs, w2, s2, ids, counts, sroute, D, I, o,
                    K: tl.constexpr, E: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, EP: tl.constexpr, SCALE_BN: tl.constexpr, SK: tl.constexpr):
    _gemm2_kernel(a_ptr=h, as_ptr=hs, w_ptr=w2, s_ptr=s2, ids_ptr=ids, counts_ptr=counts, sroute_ptr=sroute,
                  o_ptr=o, D=D, I=I, K_ROUTED=K, K_TOTAL=K, E_ROUTED=E, E_TOTAL=E, stride_ap=I,
                  stride_asp=I // 128, stride_we=D * I, stride_wn=I, stride_se=(D // SCALE_BN) * (I // SK),
                  stride_sn=I // SK, stride_op=D, BM=BM, BN=BN, EP=EP, SCALE_BN=SCALE_BN, SK=SK, ROUTE_TILES=False,
                  E8M0=False)


@triton.jit
def v4trt_moe_combine(o, ids, y, D: tl.constexpr, K: tl.constexpr, E: tl.constexpr, BD: tl.constexpr):
    _combine_kernel(o_ptr=o, ids_ptr=ids, y_ptr=y, D=D, K_ROUTED=K, K_TOTAL=K, E_ROUTED=E, E_TOTAL=E,
                    stride_op=D, stride_yn=D, BD=BD)


ENTRIES = {
    "compress_pool": v4trt_compress_pool, "compress_state": v4trt_compress_state,
    "indexer_scores": v4trt_indexer_scores, "topk_hist": v4trt_topk_hist, "topk_compact": v4trt_topk_compact,
    "topk_finish": v4trt_topk_finish, "sparse_attention": v4trt_sparse_attention, "moe_route": v4trt_moe_route,
    "moe_quant_act": v4trt_moe_quant_act, "moe_count": v4trt_moe_count, "moe_scatter": v4trt_moe_scatter,
    "moe_gemm1": v4trt_moe_gemm1, "moe_gemm2": v4trt_moe_gemm2, "moe_combine": v4trt_moe_combine,
}
"""Kernel plugin name -> its entry kernel."""
