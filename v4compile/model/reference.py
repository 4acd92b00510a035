"""The eager V4 reference model (V4-SPEC sections 2, 7, 9): the semantics every engine is checked against.

One call path serves prefill, chunked continuation and one-token decode: `model(tokens, start_pos, cache)`
continues each sequence b from start_pos[b] and returns the logits of ALL positions. Legend: B batch,
T tokens of the call, d hidden, hc mHC streams, V vocab.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from v4compile.errors import ConfigError, InputError
from v4compile.model.attention import Attention
from v4compile.model.cache import Cache, LayerCache
from v4compile.model.config import ModelConfig
from v4compile.model.init import iter_init, reference_schema
from v4compile.model.layers import Embedding, Linear, OpTable, RMSNorm
from v4compile.model.mhc import declare_hc, hc_head, hc_pre
from v4compile.model.moe import MoE
from v4compile.model.numerics import linear_acc
from v4compile.model.ops import positions_of
from v4compile.model.schema import TensorSpec


class Block(nn.Module):
    """mHC-wrapped attention + MoE (every main layer and the MTP block's core)."""

    def __init__(self, spec: dict[str, TensorSpec], prefix: str, cfg: ModelConfig, layer_id: int, ops: OpTable,
                 device=None) -> None:
        super().__init__()
        self.cfg, self.ops, self.layer_id = cfg, ops, layer_id
        self.attn_norm = RMSNorm(spec, f"{prefix}attn_norm", cfg.norm_eps, ops, device)
        self.ffn_norm = RMSNorm(spec, f"{prefix}ffn_norm", cfg.norm_eps, ops, device)
        self.attn = Attention(spec, f"{prefix}attn", cfg, layer_id, ops, device)
        self.ffn = MoE(spec, f"{prefix}ffn", cfg, layer_id, ops, device)
        declare_hc(self, spec, prefix, "attn", device)
        declare_hc(self, spec, prefix, "ffn", device)

    def forward(self, x: Tensor, tokens: Tensor, positions: Tensor, start_pos: Tensor, lc: LayerCache,
                trace: dict | None = None) -> Tensor:
        """Streams x [B, T, hc, d] act -> [B, T, hc, d] act."""
        cfg, ops, i = self.cfg, self.ops, self.layer_id
        u, post, comb = hc_pre(ops, cfg, x, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base)
        a = self.attn(self.attn_norm(u), positions, start_pos, lc, trace, i)
        x = ops.hc_post(a, x, post, comb)
        u, post, comb = hc_pre(ops, cfg, x, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base)
        f = self.ffn(self.ffn_norm(u), tokens, trace, i)
        return ops.hc_post(f, x, post, comb)


class MTPBlock(Block):
    """Multi-token prediction block (section 9): embeds the next token, mixes it into the main streams."""

    def __init__(self, spec: dict[str, TensorSpec], prefix: str, cfg: ModelConfig, layer_id: int, ops: OpTable,
                 device=None) -> None:
        super().__init__(spec, prefix, cfg, layer_id, ops, device)
        self.e_proj = Linear(spec, f"{prefix}e_proj", ops, device)
        self.h_proj = Linear(spec, f"{prefix}h_proj", ops, device)
        for name in ("enorm", "hnorm", "norm"):
            setattr(self, name, RMSNorm(spec, f"{prefix}{name}", cfg.norm_eps, ops, device))
        declare_hc(self, spec, prefix, "head", device)


class MTPStack(nn.ModuleList):
    """The MTP blocks (state_dict prefix `mtp.{k}.`); calling it runs one: `model.mtp(hidden, next_tokens,
    start_pos, cache, depth=0)` == `model.mtp_forward(...)`."""

    def __init__(self, owner: nn.Module, blocks: list[MTPBlock]) -> None:
        super().__init__(blocks)
        object.__setattr__(self, "_owner", weakref.ref(owner))  # not a submodule: no cycle in the module tree

    def forward(self, hidden: Tensor, next_tokens: Tensor, start_pos: int | Tensor = 0, cache: Cache | None = None,
                depth: int = 0, trace: dict | None = None) -> Tensor:
        return self._owner().mtp_forward(hidden, next_tokens, start_pos, cache, depth, trace)


class ReferenceModel(nn.Module):
    """DeepSeek-V4 reference: `model(tokens [B, T], start_pos=0, cache=None) -> logits f32 [B, T, V]`.

    dtype: activation dtype (default cfg.dtype; float32 for exact tests). quantized=False stores every
    FP8/FP4 weight as float32 (logical shape, no scales): weight dequantisation is skipped, the KV / indexer
    fake-quant stays. Weights come from the seeded init (`model.init.iter_init`) unless device == "meta", drawn
    on the model's device: a function of (cfg, seed, device type), since CPU and CUDA random streams differ (on
    the host a bench-sized model takes ~0.94 s per expert matrix on two CPU cores, ~72 min for its 4 608). An engine
    built from a preset on a GPU is therefore compared with the preset's GPU draw (build, validate and `bench
    model` all make the reference on the engine's device).
    """

    def __init__(self, cfg: ModelConfig, *, dtype: torch.dtype | None = None, device=None, seed: int = 0,
                 quantized: bool = True) -> None:
        super().__init__()
        self.cfg, self.quantized = cfg, quantized
        self.act_dtype = dtype or cfg.dtype
        if self.act_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"activation dtype {self.act_dtype}; expected float32, bfloat16 or float16")
        self.ops = OpTable()
        spec = reference_schema(cfg, quantized)
        self.embed = Embedding(spec, "embed", device)
        self.head = Embedding(spec, "head", device)  # [V, d], used as the fp32 LM head
        self.norm = RMSNorm(spec, "norm", cfg.norm_eps, self.ops, device)
        declare_hc(self, spec, "", "head", device)
        self.layers = nn.ModuleList(Block(spec, f"layers.{i}.", cfg, i, self.ops, device) for i in range(cfg.n_layers))
        self.mtp = MTPStack(self, [MTPBlock(spec, f"mtp.{k}.", cfg, cfg.n_layers + k, self.ops, device)
                                   for k in range(cfg.n_mtp_layers)])
        keys = set(self.state_dict())
        assert keys == set(spec), f"state_dict/schema mismatch: {sorted(keys ^ set(spec))[:8]}"
        if torch.device(device if device is not None else "cpu").type != "meta":
            self._load_init(seed)

    # ------------------------------------------------------------------ public API

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def set_differentiable(self, on: bool = True) -> None:
        """Route op calls to the plain bodies (autograd works) instead of the torch.ops.v4 nodes."""
        self.ops.differentiable = on

    def new_cache(self, batch: int, max_len: int | None = None, layout: str = "reference") -> Cache:
        """Empty cache for `batch` sequences of up to `max_len` positions (default cfg.max_seq_len) in `layout`
        ("reference" act-dtype rows or "production" uint8 encodings, model/cache.py)."""
        return Cache.allocate(self.cfg, batch, self.cfg.max_seq_len if max_len is None else max_len,
                              self.act_dtype, self.device, layout)

    def forward(self, tokens: Tensor, start_pos: int | Tensor = 0, cache: Cache | None = None, *,
                return_hidden: bool = False, trace: dict | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """tokens [B, T] -> logits f32 [B, T, V] (and the final streams [B, T, hc, d] with return_hidden).

        trace: optional dict filled with per-layer 'hidden' streams, CSA 'indexer' picks / 'indexer_scores',
        MoE 'experts' ids / 'router_scores' (keyed by layer id).
        """
        tokens, sp, cache = self._prepare(tokens, start_pos, cache)
        B, T = tokens.shape
        positions = positions_of(sp, T)
        x = self.embed(tokens, self.act_dtype).unsqueeze(2).repeat(1, 1, self.cfg.hc_mult, 1)
        for i, layer in enumerate(self.layers):
            x = layer(x, tokens, positions, sp, cache.layers[i], trace)
            if trace is not None:
                trace.setdefault("hidden", {})[i] = x.clone()
        logits = self._logits(x, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, self.norm)
        return (logits, x) if return_hidden else logits

    @torch.no_grad()
    def teacher_forced(self, tokens: Tensor, hidden: dict[int, Tensor]) -> tuple[dict[int, Tensor], Tensor]:
        """Each layer on another run's streams: layer i gets `hidden[i - 1]` (layer 0 the embedding of `tokens`),
        a prefill from position 0 on a fresh cache -> ({i: layer i's streams [B, T, hc, d]}, logits f32 of the
        head on hidden[last]). Compared with that run's own hidden[i] / logits this is the error each layer adds
        by itself (validate's "local" metrics): unlike the error of the whole stack it does not compound through
        the later layers' discrete choices (top-k picks, routing) and FP8 activation codes."""
        n = len(self.layers)
        missing = [i for i in range(n) if i not in hidden]
        if missing:
            raise InputError(f"teacher_forced: hidden streams of layer(s) {missing} missing")
        tokens, sp, cache = self._prepare(tokens, 0, None)
        B, T = tokens.shape
        positions = positions_of(sp, T)
        out = {}
        for i, layer in enumerate(self.layers):
            x = (self.embed(tokens, self.act_dtype).unsqueeze(2).repeat(1, 1, self.cfg.hc_mult, 1) if i == 0
                 else hidden[i - 1].to(self.device, self.act_dtype))
            if x.shape != (B, T, self.cfg.hc_mult, self.cfg.dim):
                raise InputError(f"teacher_forced: layer {i - 1} streams {list(x.shape)}; expected "
                                 f"{[B, T, self.cfg.hc_mult, self.cfg.dim]}")
            out[i] = layer(x, tokens, positions, sp, cache.layers[i], None)
        last = hidden[n - 1].to(self.device, self.act_dtype)
        return out, self._logits(last, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, self.norm)

    def forward_hidden(self, tokens: Tensor, start_pos: int | Tensor = 0, cache: Cache | None = None,
                       trace: dict | None = None) -> tuple[Tensor, Tensor]:
        """(logits [B, T, V], final mHC streams [B, T, hc, d]) - the streams feed `mtp`."""
        return self.forward(tokens, start_pos, cache, return_hidden=True, trace=trace)

    def mtp_forward(self, hidden: Tensor, next_tokens: Tensor, start_pos: int | Tensor = 0,
                    cache: Cache | None = None, depth: int = 0, trace: dict | None = None) -> Tensor:
        """MTP block `depth` (section 9): main streams at positions p [B, T, hc, d] + tokens p+1 [B, T] ->
        logits f32 [B, T, V] for tokens p+2. Uses its own window cache entry (block n_layers + depth)."""
        if not 0 <= depth < self.cfg.n_mtp_layers:
            raise InputError(f"MTP depth {depth}; this model has {self.cfg.n_mtp_layers} MTP block(s)")
        next_tokens, sp, cache = self._prepare(next_tokens, start_pos, cache)
        B, T = next_tokens.shape
        if hidden.shape != (B, T, self.cfg.hc_mult, self.cfg.dim):
            raise InputError(f"MTP hidden streams {list(hidden.shape)}; expected {[B, T, self.cfg.hc_mult, self.cfg.dim]}")
        blk = self.mtp[depth]
        e = blk.enorm(self.embed(next_tokens, self.act_dtype))
        x = blk.e_proj(e).unsqueeze(2) + blk.h_proj(blk.hnorm(hidden.to(self.act_dtype)))  # [B, T, hc, d]
        positions = positions_of(sp, T)
        x = blk(x, next_tokens, positions, sp, cache.layers[self.cfg.n_layers + depth], trace)
        return self._logits(x, blk.hc_head_fn, blk.hc_head_scale, blk.hc_head_base, blk.norm)

    # ------------------------------------------------------------------ internals

    @torch.no_grad()
    def _load_init(self, seed: int) -> None:
        """Copy the seeded init, drawn on this model's device, into the declared tensors one at a time."""
        slots = self.state_dict(keep_vars=True)
        seen = set()
        for key, e, value in iter_init(self.cfg, seed, self.quantized, self.device):
            (slots[key] if e is None else slots[key][e]).copy_(value)
            seen.add(key)
        assert seen == set(slots), f"init left {sorted(set(slots) - seen)[:5]} unset"

    def _logits(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, norm: RMSNorm) -> Tensor:
        y = norm(hc_head(self.ops, self.cfg, x, fn, scale, base))
        return linear_acc(y, self.head.weight, y.dtype)  # fp32 LM head

    def _prepare(self, tokens: Tensor, start_pos: int | Tensor, cache: Cache | None) -> tuple[Tensor, Tensor, Cache]:
        """Validate inputs (typed errors) and return (tokens, start_pos [B] int64, cache)."""
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            what = f"{tokens.dtype} {list(tokens.shape)}" if isinstance(tokens, Tensor) else type(tokens).__name__
            raise InputError(f"tokens: expected an int64/int32 tensor [B, T], got {what}")
        B, T = tokens.shape
        if B == 0 or T == 0:
            raise InputError(f"tokens: empty batch or sequence, shape {list(tokens.shape)}")
        tokens = tokens.to(device=self.device, dtype=torch.int64)
        if isinstance(start_pos, Tensor):
            if start_pos.dim() != 1 or start_pos.shape[0] != B or start_pos.dtype.is_floating_point:
                raise InputError(f"start_pos: expected an int tensor [{B}], got {start_pos.dtype} {list(start_pos.shape)}")
            sp = start_pos.to(device=self.device, dtype=torch.int64)
        elif isinstance(start_pos, int) and not isinstance(start_pos, bool):
            sp = torch.full((B,), start_pos, dtype=torch.int64, device=self.device)
        else:
            raise InputError(f"start_pos: expected an int or an int tensor [B], got {type(start_pos).__name__}")
        if cache is None:
            if not torch.compiler.is_compiling() and int(sp.abs().max()) != 0:
                raise InputError(f"start_pos {sp.tolist()} without a cache: a call without cache is a fresh "
                                 "prefill from position 0")
            cache = self.new_cache(B, T)
        elif cache.batch != B or cache.dtype != self.act_dtype:
            raise InputError(f"cache holds {cache.batch} sequences of {cache.dtype}; "
                             f"call has {B} sequences of {self.act_dtype}")
        if not torch.compiler.is_compiling():
            self._check_values(tokens, sp, cache, T)
        return tokens, sp, cache

    def _check_values(self, tokens: Tensor, sp: Tensor, cache: Cache, T: int) -> None:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} outside [0, {self.cfg.vocab_size})")
        if int(sp.min()) < 0:
            raise InputError(f"start_pos {sp.tolist()} must be >= 0")
        end = int(sp.max()) + T
        if end > cache.max_len:
            raise InputError(f"start_pos + T = {end} exceeds the cache capacity {cache.max_len} "
                             f"(start_pos {sp.tolist()}, T {T})")
