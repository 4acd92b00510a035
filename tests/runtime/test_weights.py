"""The engine weights file (runtime/weights.py): round trip of every dtype engines store, views kept, constants
shared between models stored once, and typed errors for a file or section that would leave a constant unbound."""

import json

import pytest
import torch
from safetensors.torch import load_file

from v4compile.errors import EngineError
from v4compile.runtime.weights import WEIGHTS_FILE, read_weights, write_weights


def _consts() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=g)
    return {"w": w, "wt": w.t(),  # a transposed view of the same storage
            "fp8": torch.randn(4, 8, generator=g).to(torch.float8_e4m3fn),
            "e8m0": torch.randint(100, 140, (3, 2), generator=g, dtype=torch.uint8).view(torch.float8_e8m0fnu),
            "bf16": torch.randn(7, generator=g).to(torch.bfloat16), "idx": torch.arange(5),
            "empty": torch.zeros(0, 3), "col": torch.randn(4, 6, generator=g)[:, 2]}  # strided column


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t


def test_round_trip_keeps_values_dtypes_and_views(tmp_path):
    consts = _consts()
    section = write_weights({"prefill": consts}, tmp_path / WEIGHTS_FILE)
    got = read_weights(tmp_path, json.loads(json.dumps(section)), torch.device("cpu"))["prefill"]
    assert set(got) == set(consts)
    for k, v in consts.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].stride() == v.stride(), k
        assert torch.equal(_bits(got[k]), _bits(v)), k
    assert set(load_file(str(tmp_path / WEIGHTS_FILE))) == set(consts)  # plain safetensors for other tools


def test_shared_constants_are_stored_once(tmp_path):
    """Same tensor in two models, or equal values under one name: one stored tensor, one device copy at load;
    the same name with other values: stored for each model."""
    base = _consts()
    other = {**base, "w": base["w"].clone(), "bf16": base["bf16"] + 1}  # equal copy; different values
    section = write_weights({"prefill": base, "decode": other}, tmp_path / WEIGHTS_FILE)
    models = section["models"]
    assert models["decode"]["w"][0] == "w" and models["decode"]["bf16"][0] == "decode:bf16"
    assert len(load_file(str(tmp_path / WEIGHTS_FILE))) == len(base) + 1
    got = read_weights(tmp_path, section, torch.device("cpu"))
    assert got["prefill"]["idx"].data_ptr() == got["decode"]["idx"].data_ptr()
    assert torch.equal(got["decode"]["bf16"], base["bf16"] + 1)


def test_bad_files_and_sections_are_engine_errors(tmp_path):
    section = write_weights({"prefill": _consts()}, tmp_path / WEIGHTS_FILE)
    dev = torch.device("cpu")
    with pytest.raises(EngineError, match="no 'weights' section"):
        read_weights(tmp_path, None, dev)
    with pytest.raises(EngineError, match="malformed"):
        read_weights(tmp_path, {"file": "../x.safetensors", "models": {}}, dev)
    bad = json.loads(json.dumps(section))
    bad["models"]["prefill"]["w"][0] = "missing"
    with pytest.raises(EngineError, match="has no tensor 'missing'"):
        read_weights(tmp_path, bad, dev)
    bad = json.loads(json.dumps(section))
    bad["models"]["prefill"]["w"][1] = [60, 5]
    with pytest.raises(EngineError, match="does not fit its stored tensor"):
        read_weights(tmp_path, bad, dev)
    data = (tmp_path / WEIGHTS_FILE).read_bytes()
    (tmp_path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineError, match="cannot read the engine's weights"):
        read_weights(tmp_path, section, dev)
    (tmp_path / WEIGHTS_FILE).unlink()
    with pytest.raises(EngineError, match="cannot read the engine's weights"):
        read_weights(tmp_path, section, dev)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_models_share_bound_weights(tmp_path):
    """A CUDA AOTInductor model compiled with the engine's options, packaged as prefill and decode, bound to one
    set of weights read onto the GPU: eager outputs, one storage for both models."""
    from torch._inductor.package import package_aoti

    from v4compile.runtime.engine import load_model
    from v4compile.targets.aoti import EXTERNAL_WEIGHTS

    m = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 64)).cuda().eval()
    x = torch.randn(8, 256, device="cuda")
    ep = torch.export.export(m, (x,))
    out = torch._inductor.aot_compile(ep.module(), (x,), options={"aot_inductor.package": True, **EXTERNAL_WEIGHTS})
    files = [f for f in out if isinstance(f, str)]
    consts = {k: v[0] for f in out if not isinstance(f, str) for k, v in f.items()}
    package_aoti(str(tmp_path / "m.pt2"), {"prefill": files, "decode": files})
    section = write_weights({"prefill": consts, "decode": consts}, tmp_path / WEIGHTS_FILE)
    w = read_weights(tmp_path, section, torch.device("cuda"))
    first = lambda y: y[0] if isinstance(y, (list, tuple)) else y
    with torch.no_grad():
        ref = m(x)
        for name in ("prefill", "decode"):
            got = first(load_model(tmp_path / "m.pt2", name, torch.device("cuda"), w[name])(x))
            assert (got - ref).abs().max() < 1e-5, name
    assert w["prefill"]["0.weight"].data_ptr() == w["decode"]["0.weight"].data_ptr()
