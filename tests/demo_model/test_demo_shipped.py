"""The shipped demo checkpoint: official format, loads, and still retrieves with the eager reference."""

import json
from pathlib import Path

import torch

import v4compile
from v4compile.demo_model.evaluate import retrieval_accuracy
from v4compile.model.checkpoint import load_checkpoint
from v4compile.model.config import ModelConfig

ASSET = Path(v4compile.__file__).parent / "assets" / "demo_model"


def test_shipped_checkpoint_loads_and_retrieves():
    meta = json.loads((ASSET / "training.json").read_text())
    model = load_checkpoint(ASSET, dtype=torch.bfloat16, check_finite=True).eval()
    cfg = model.cfg
    assert cfg.replace(weight_dtype="fp8", expert_dtype="fp4", torch_dtype="bfloat16") == \
        ModelConfig.preset("demo").replace(weight_dtype="fp8", expert_dtype="fp4", torch_dtype="bfloat16")
    assert cfg.csa_layers and cfg.hca_layers and cfg.index_topk < 8192 // 4
    # 2K eager on 2 busy cores is ~10 s per sequence, so this checks 1K contexts; n and margin are in training.json
    t = meta["ci_check"]
    acc = retrieval_accuracy(model, t["n"], t["context_len"], seed=t["seed"], batch=t["n"])
    assert acc >= t["min_acc"], f"shipped model: {acc:.3f} at {t['context_len']} tokens, expected >= {t['min_acc']}"


def test_demo_engine_cache_key_follows_the_engine_format(monkeypatch):
    """A new engine format gets a new cache directory: a cached engine of the old format is never loaded (it
    would be refused) and the first run takes the fast path (eager answers computed during the build)."""
    from v4compile import demo
    from v4compile.runtime import manifest

    key = demo._engine_key(demo.DEMO_CHECKPOINT, "cpu", "bf16", 8448)
    assert key == demo._engine_key(demo.DEMO_CHECKPOINT, "cpu", "bf16", 8448)
    monkeypatch.setattr(manifest, "FORMAT_VERSION", manifest.FORMAT_VERSION + 1)
    assert demo._engine_key(demo.DEMO_CHECKPOINT, "cpu", "bf16", 8448) != key
