"""The build-time parity check's verdicts, against a stand-in engine that runs the eager model (no build)."""

import pytest
import torch

from v4compile.api import check_parity, eager_generate
from v4compile.errors import ParityError


class EagerEngine:
    """Engine interface over the eager model, optionally adding noise to the prefill logits."""

    max_len, max_batch = 16, 2
    manifest = {"entry_points": {"prefill": {}, "decode": {}}}

    def __init__(self, model, noise: float) -> None:
        self.model, self.noise = model, noise

    def new_session(self, batch):  # one batch-1 eager cache per slot
        return [self.model.new_cache(1, self.max_len) for _ in range(batch)]

    def prefill(self, tokens, start_pos, session, slots=None):
        logits = self.model(tokens, start_pos, session[(slots or [0])[0]])
        return logits + self.noise * torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))

    def decode(self, tokens, start_pos, session, slots=None):
        return self.model(tokens.view(-1, 1), int(start_pos[0]), session[(slots or [0])[0]])

    def generate(self, prompts, n, stop_tokens=()):
        return [eager_generate(self.model, p, n) for p in prompts]


def test_parity_summary_and_failure(eager):
    ok = check_parity(eager, EagerEngine(eager, 0.0), "fp32")
    assert ok["ok"] and ok["logits_calc_diff"] == 0 and ok["greedy_token_agreement"] == "8/8"
    assert ok["prompts"] == [8, 7, 1]
    with pytest.raises(ParityError, match="calc_diff .* \\(bound 1e-05\\)"):
        check_parity(eager, EagerEngine(eager, 1.0), "fp32")


class SlotLossyEngine(EagerEngine):
    """Drops the cache writes of a prefill into slot >= 1 (what a CUDA AOTInductor model does to an input it
    clones for alignment, runtime/engine.py INPUT_ALIGN)."""

    def prefill(self, tokens, start_pos, session, slots=None):
        if slots and slots[0] >= 1:
            return self.model(tokens, start_pos, self.model.new_cache(1, self.max_len))
        return super().prefill(tokens, start_pos, session, slots)


def test_engine_disagreeing_with_itself_across_slots_is_refused(eager):
    """The slot rule: slot 1 of a 2-slot session vs a 1-slot session, prefill + greedy decode; noise-free, so a lost
    slot write is caught even where the logits bound could not see it (prefill logits alone stay exact here)."""
    ok = check_parity(eager, EagerEngine(eager, 0.0), "fp32")
    assert ok["slot_consistency_calc_diff"] == 0.0
    with pytest.raises(ParityError, match="disagrees with itself: .* slot 1 of a 2-slot session .* calc_diff"):
        check_parity(eager, SlotLossyEngine(eager, 0.0), "fp32")
    single = EagerEngine(eager, 0.0)
    single.max_batch = 1
    assert check_parity(eager, single, "fp32")["slot_consistency_calc_diff"] is None


class TwinEngine(EagerEngine):
    """An engine that computes the bf16 model's math in float32 (the best a bf16 engine could do), plus noise."""

    max_len = 64

    def __init__(self, model, twin, noise: float) -> None:
        super().__init__(model, 0.0)
        self.twin, self.noise = twin, noise

    def prefill(self, tokens, start_pos, cache, slots=None):
        logits = self.twin(tokens, start_pos, self.twin.new_cache(tokens.shape[0], self.max_len))
        noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
        return logits + self.noise * logits.std() * noise


def test_bf16_model_noisier_than_the_bound_is_judged_by_its_precision_floor():
    """Seeded tiny in bf16 moves more than the 1e-2 bound under bf16 rounding alone: an engine as exact as its
    float32 twin passes by the precision floor; one about 4.5 floors from the twin fails (the margin is 2)."""
    from v4compile.api import fp32_twin
    from v4compile.model.config import ModelConfig
    from v4compile.model.reference import ReferenceModel

    model = ReferenceModel(ModelConfig.preset("tiny"), dtype=torch.bfloat16).eval()
    twin = fp32_twin(model)
    exact = check_parity(model, TwinEngine(model, twin, 0.0), "bf16")
    assert exact["ok"] and exact["judged_by"] == "precision floor", exact
    assert exact["logits_calc_diff"] > 1e-2 and max(exact["engine_vs_fp32"]) == 0.0
    floor = max(exact["precision_floor"])
    with pytest.raises(ParityError, match="vs the float32 twin: engine .* bf16 reference .* \\(margin 2.0x\\)"):
        check_parity(model, TwinEngine(model, twin, 3.0 * floor**0.5), "bf16")  # calc_diff ~ 9 floor / 2


class TracingEngine(EagerEngine):
    """Prefill logits far from eager (noise), and a trace program whose streams are the eager model's own, with
    noise of 0.3 std added to layer `bent`'s output (None: untouched): what the per-layer local judgement sees."""

    max_len = 64
    manifest = {"entry_points": {"prefill": {}, "decode": {}, "trace": {}}}

    def __init__(self, model, noise: float, bent: int | None) -> None:
        super().__init__(model, noise)
        self.bent = bent

    def trace(self, tokens):
        tr: dict = {}
        logits = self.model(tokens, 0, self.model.new_cache(tokens.shape[0], self.max_len), trace=tr)
        g = torch.Generator().manual_seed(1)
        hidden = {i: h + 0.3 * h.float().std() * torch.randn(h.shape, generator=g) if i == self.bent else h
                  for i, h in tr["hidden"].items()}
        return {"logits": logits, "hidden": hidden}


def test_noisy_model_beyond_its_floor_is_judged_layer_by_layer_with_a_trace_program():
    """Past the bound and the floor rule, a model noisier than the bound under bf16 alone is judged by the local
    (teacher-forced) error of each layer and of the head when the engine has a trace program; a layer that
    computes something else fails, naming the layer; without a trace program the error says to build with one."""
    from v4compile.model.config import ModelConfig
    from v4compile.model.reference import ReferenceModel

    model = ReferenceModel(ModelConfig.preset("tiny"), dtype=torch.bfloat16).eval()
    noise = 0.5  # logits calc_diff ~ 0.1: beyond the bound and 2x the floor
    ok = check_parity(model, TracingEngine(model, noise, None), "bf16")
    assert ok["ok"] and ok["judged_by"] == "local per layer", ok
    assert sorted(ok["local_calc_diff"]) == ["0", "1", "2", "3"] and max(ok["local_calc_diff"].values()) == 0.0
    assert ok["head_local_calc_diff"] == 0.0 and ok["local_tolerance"] == 1e-2
    with pytest.raises(ParityError, match=r"teacher-forced per layer \(bound 1e-02\): layers over it 1 "):
        check_parity(model, TracingEngine(model, noise, 1), "bf16")
    untraced = TracingEngine(model, noise, None)
    untraced.manifest = EagerEngine.manifest
    with pytest.raises(ParityError, match="build with --trace"):
        check_parity(model, untraced, "bf16")


def test_precision_floor_command(tmp_path):
    """`python -m v4compile.bench.precision_floor`: the floor the check above falls back to, per parity prompt."""
    import json

    from v4compile.bench import precision_floor

    out = tmp_path / "floor.json"
    assert precision_floor.main(["--preset", "tiny", "--device", "cpu", "--max-len", "64", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["tokens"] for r in rows] == [32, 7, 1] and all(0 < r["bf16_vs_fp32"] < 0.1 for r in rows)
