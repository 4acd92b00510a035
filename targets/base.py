"""What a compilation target is: a small frozen description (DESIGN.md section 2, STYLE.md item 6).

A target names the machine it runs on (`arch`), the precisions it builds, how it picks an implementation
for each v4 op (`kernel_policy`: "decompose" lowers every op to aten, "registry" asks plugins/registry for
a kernel and falls back to the op's reference body), and its limits. The emit step (lowering + AOTInductor)
lives in targets/lower.py and targets/aoti.py; the modules cpu.py / h100.py / h200.py only describe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from v4compile.errors import ConfigError, InputError, TargetError
from v4compile.model.kv_bytes import LAYOUTS as KV_LAYOUTS
from v4compile.runtime.manifest import machine_arch

PRECISIONS = ("fp32", "bf16", "fp8")


@dataclass(frozen=True)
class Target:
    """One compilation target (immutable; module-level constants in targets/<name>.py)."""

    name: str  # "cpu" | "h100" | "h200"
    arch: str  # "cpu" | "sm_90": what load_engine compares with the machine
    device: str  # torch device type the engine runs on
    precisions: tuple[str, ...]  # precisions `build` accepts for this target
    kernel_policy: str  # "decompose" | "registry"
    tested: bool  # True: CI builds and runs its engines; False: only GPU runs outside CI do (notes says which)
    separate_decode: bool  # False: "decode" is the prefill program (dynamic T) packaged under both names
    max_batch: int = 256  # limits a build may ask for
    max_len: int = 1 << 20
    notes: str = ""
    ops: tuple[str, ...] = field(default=())  # ops the kernel registry is asked about (registry policy)
    kv_layouts: tuple[str, ...] = ("reference",)  # cache layouts its engines can use (model/cache.py)
    default_kv_layout: str = "reference"  # what bf16 / fp8 builds get without --kv-layout (fp32: reference)

    def check_precision(self, precision: str) -> None:
        if precision not in PRECISIONS:
            raise TargetError(f"precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
        if precision not in self.precisions:
            raise TargetError(f"target {self.name} does not build precision {precision!r}; "
                              f"it builds {', '.join(self.precisions)}")

    def engine_limits(self, cfg, max_batch: int | None, max_len: int | None) -> tuple[int, int]:
        """(max_batch, max_len) of an engine of `cfg` (defaults: the config's max_batch_size / max_seq_len);
        InputError when outside what this target and the config allow."""
        max_batch = cfg.max_batch_size if max_batch is None else max_batch
        max_len = cfg.max_seq_len if max_len is None else max_len
        longest = min(self.max_len, cfg.max_position_embeddings)
        if not 1 <= max_batch <= self.max_batch or not 2 <= max_len <= longest:
            raise InputError(f"max_batch {max_batch} / max_len {max_len}: target {self.name} allows batch "
                             f"1..{self.max_batch} and length 2..{longest}")
        return max_batch, max_len

    def kv_layout(self, precision: str, requested: str | None = None) -> str:
        """The cache layout of an engine at `precision`: `requested`, else the target's default_kv_layout where the
        activations are bf16 (the production layout, V4-SPEC 6.2, stores the RoPE dims as bf16), else "reference".
        A production request that cannot be honoured is a TargetError (target) or ConfigError (precision)."""
        bf16 = self.act_dtype(precision) == torch.bfloat16
        if requested is None:
            return self.default_kv_layout if bf16 else "reference"
        elif requested not in KV_LAYOUTS:
            raise InputError(f"KV cache layout {requested!r}; expected one of {', '.join(KV_LAYOUTS)}")
        elif requested not in self.kv_layouts:
            raise TargetError(f"target {self.name} builds engines with the {' / '.join(self.kv_layouts)} KV cache "
                              f"layout only, not {requested!r}")
        elif requested == "production" and not bf16:
            raise ConfigError(f"KV layout production with precision {precision}: the layout stores the RoPE dims "
                              "as bf16, exact only for bf16 activations (precision bf16 or fp8); use the reference "
                              "layout")
        return requested

    def act_dtype(self, precision: str) -> torch.dtype:
        """Activation dtype of a precision (fp8 = FP8 weights and experts, bf16 activations)."""
        self.check_precision(precision)
        if precision == "fp32":
            return torch.float32
        elif precision in ("bf16", "fp8"):
            return torch.bfloat16
        else:
            raise TargetError(f"precision {precision!r} has no activation dtype")


def check_machine(target: Target) -> None:
    """Raise TargetError naming both when this machine cannot run `target`'s engines."""
    have = machine_arch()
    if target.arch == "cpu":
        return  # a cpu engine runs anywhere torch runs
    elif have == "cpu":
        raise TargetError(f"target {target.name} needs a CUDA GPU ({target.arch}); this machine has none")
    elif have != target.arch:
        raise TargetError(f"target {target.name} needs a GPU of arch {target.arch}; this machine's GPU is {have} "
                          f"({torch.cuda.get_device_name(0)})")
