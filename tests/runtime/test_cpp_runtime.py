"""C++ runtime v4run: build once, toy-engine round trip against the same computation in Python, the real tiny
engine against the eager reference, manifest checks (checksum, format version, arch, torch version, malformed
JSON), SHA-256 vs hashlib."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from v4compile.runtime import manifest as mf
from v4compile.runtime.cpp_build import CppBuildError, CppToolchainError, build_v4run, source_hash
from v4compile.runtime.weights import WEIGHTS_FILE, write_weights
from v4compile.targets import aoti

# Toy engine sizes: vocab, width, max_len, max_batch.
V, D, L, B = 32, 8, 16, 3
EOS = 9  # toy config's eos_token_id


class Toy(torch.nn.Module):
    """The engine calling convention in miniature: (tokens, start_pos, kv, score) -> logits, caches in place."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(V, D, generator=g))
        self.pe = torch.nn.Parameter(torch.randn(L, D, generator=g))
        self.w_out = torch.nn.Parameter(torch.randn(D, V, generator=g))
        self.w_tok = torch.nn.Parameter(torch.randn(D, V, generator=g))

    def forward(self, tokens: torch.Tensor, start_pos: torch.Tensor, kv: torch.Tensor, score: torch.Tensor):
        b, t = tokens.shape
        pos = start_pos[:, None] + torch.arange(t, device=tokens.device)[None, :]  # [b, t]
        x = self.emb[tokens] + self.pe[pos]  # [b, t, D]
        kv.scatter_(1, pos[..., None].expand(b, t, D), x)  # kv [b, L, D]: one row per position
        score.copy_(torch.maximum(score, x.amax(1)))  # running max from -inf, like a compressor score state
        mask = (torch.arange(kv.shape[1], device=tokens.device)[None, None, :] <= pos[..., None]).to(kv.dtype)
        h = mask @ kv  # [b, t, D]: causal prefix sums
        return (x @ self.w_tok + torch.tanh(h) @ self.w_out + 0.5 * score[:, None, :] @ self.w_out).float()


def new_cache(batch: int, score_init: float = float("-inf")) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(batch, L, D), torch.full((batch, D), score_init)


def greedy_reference(prompt: list[int], n_new: int, stop: int = -1, score_init: float = float("-inf"),
                     keep_cache: bool = True) -> list[int]:
    """Greedy tokens of the eager toy; score_init/keep_cache break it on purpose to show the test can fail."""
    model = Toy().eval()
    kv, score = new_cache(1, score_init)
    out: list[int] = []
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), torch.tensor([0]), kv, score)
        out.append(int(logits[0, -1].argmax()))
        pos = len(prompt)
        while len(out) < n_new and out[-1] != stop:
            if not keep_cache:
                kv, score = new_cache(1, score_init)
            logits = model(torch.tensor([[out[-1]]]), torch.tensor([pos]), kv, score)
            out.append(int(logits[0, 0].argmax()))
            pos += 1
    return out


# both models keep their constants outside their .so (as `v4compile build` does); build_toy_engine writes them
# once to weights.safetensors (runtime/weights.py), which the runtimes bind to each model at load time
PACKAGE_OPTIONS = {"aot_inductor.package": True, **aoti.EXTERNAL_WEIGHTS}


def build_toy_engine(out: Path) -> Path:
    """Exports the toy as "prefill" (dynamic B, T) and "decode" (dynamic B, T=1) into one model.pt2 + manifest."""
    from torch._inductor import aot_compile
    from torch._inductor.package import package_aoti

    model = Toy().eval()
    batch, seq = torch.export.Dim("batch", min=1, max=B), torch.export.Dim("seq", min=1, max=L)
    files, weights = {}, {}
    for name, t, tdim in (("prefill", 4, {0: batch, 1: seq}), ("decode", 1, {0: batch})):
        args = (torch.zeros(2, t, dtype=torch.long), torch.zeros(2, dtype=torch.long), *new_cache(2))
        with torch.no_grad():
            ep = torch.export.export(model, args, dynamic_shapes=(tdim, {0: batch}, {0: batch}, {0: batch}))
        out_files = aot_compile(ep.module(), args, options=dict(PACKAGE_OPTIONS))
        files[name] = [f for f in out_files if isinstance(f, str)]
        weights[name] = {fqn: v[0] for f in out_files if not isinstance(f, str) for fqn, v in f.items()}
    out.mkdir(parents=True, exist_ok=True)
    package_aoti(str(out / "model.pt2"), files)
    section = write_weights(weights, out / WEIGHTS_FILE)
    manifest = {
        "format_version": mf.FORMAT_VERSION, "v4compile": "0.1.0", "torch": torch.__version__, "triton": None,
        "target": "cpu", "arch": "cpu", "precision": "fp32",
        "config": {"vocab_size": V, "eos_token_id": EOS, "dim": D},
        "build": {"toy": True}, "kernels": {},
        "entry_points": {"prefill": {"max_batch": B, "max_len": L}, "decode": {"max_batch": B}},
        "cache": {"max_batch": B, "max_len": L, "tensors": [
            {"name": "kv", "shape": [-1, L, D], "dtype": "float32", "init": "zeros"},
            {"name": "score", "shape": [-1, D], "dtype": "float32", "init": "neg_inf"}]},
        "weights": section,
        "files": {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in ("model.pt2", WEIGHTS_FILE)},
        "parity": None,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


@pytest.fixture(scope="session")
def v4run_build(tmp_path_factory) -> dict[str, Future]:
    """Starts compiling v4run (CMake, and the direct-compiler fallback) in the background so that both builds
    overlap the toy engine's AOTInductor build (2 cores: ~40 s instead of ~80 s)."""
    build_dir = os.environ.get("V4COMPILE_CPP_CACHE") or tmp_path_factory.mktemp("v4run-build")
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {"auto": pool.submit(build_v4run, build_dir),
               "gxx": pool.submit(build_v4run, tmp_path_factory.mktemp("v4run-gxx"), method="gxx")}
    yield futures
    pool.shutdown(wait=True)


def built(future: Future) -> Path:
    try:
        return future.result(timeout=600)
    except CppToolchainError as err:
        pytest.skip(f"cannot build v4run: {err}")


@pytest.fixture(scope="session")
def v4run(v4run_build: dict[str, Future]) -> Path:
    return built(v4run_build["auto"])


@pytest.fixture(scope="session")
def toy_engine(v4run_build: dict[str, Future], tmp_path_factory) -> Path:
    return build_toy_engine(tmp_path_factory.mktemp("toy") / "engine")


def run(binary: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120)


def token_lines(proc: subprocess.CompletedProcess[str]) -> list[list[int]]:
    """v4run's output: one line of comma-separated ids per prompt."""
    assert proc.returncode == 0, f"v4run failed (exit {proc.returncode}): {proc.stderr}"
    return [[int(x) for x in line.split(",")] if line else [] for line in proc.stdout.splitlines()]


def tokens_of(proc: subprocess.CompletedProcess[str]) -> list[int]:
    lines = token_lines(proc)
    assert len(lines) == 1, f"expected one line of token ids, got {proc.stdout!r}"
    return lines[0]


def engine_copy(toy_engine: Path, tmp_path: Path, edit=None) -> Path:
    """A copy of the toy engine whose manifest dict went through `edit` (manifest rewritten, not re-hashed)."""
    dst = tmp_path / "engine"
    shutil.copytree(toy_engine, dst)
    if edit is not None:
        man = json.loads((dst / "manifest.json").read_text())
        edit(man)
        (dst / "manifest.json").write_text(json.dumps(man))
    return dst


def expect_error(proc: subprocess.CompletedProcess[str], *needles: str, code: int = 2) -> None:
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}; stderr: {proc.stderr!r}"
    assert proc.stdout == "", f"nothing may be printed on stdout on error, got {proc.stdout!r}"
    err = proc.stderr.strip()
    assert err.startswith("error: "), err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


# ------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("prompt", [[3], [3, 4, 5], [0, 31, 7, 7, 2, 30, 11, 5, 19, 8]])
def test_toy_engine_matches_python(v4run: Path, toy_engine: Path, prompt: list[int]) -> None:
    n_new = L - len(prompt)  # the longest generation the engine accepts
    want = greedy_reference(prompt, n_new)
    got = tokens_of(run(v4run, str(toy_engine), "--prompt-ids", ",".join(map(str, prompt)),
                        "--max-new-tokens", str(n_new), "--no-stop"))
    assert got == want, f"prompt {prompt}: v4run {got}, python {want}"


def test_reference_is_sensitive_to_cache_handling() -> None:
    """The round trip can fail: a zero-initialised score state or a dropped cache changes the tokens."""
    for prompt in ([3, 4, 5], [0, 31, 7, 7, 2, 30, 11, 5, 19, 8]):
        good = greedy_reference(prompt, 6)
        assert good != greedy_reference(prompt, 6, keep_cache=False), prompt
    assert any(greedy_reference(p, 8) != greedy_reference(p, 8, score_init=0.0) for p in ([3], [3, 4, 5], [17, 2]))


def test_stop_token(v4run: Path, toy_engine: Path) -> None:
    prompt = [3, 4, 5]
    full = greedy_reference(prompt, 12)
    stop = full[2] if full[2] not in full[:2] else full[0]
    got = tokens_of(run(v4run, str(toy_engine), "--prompt-ids", "3,4,5", "--max-new-tokens", "12",
                        "--stop-token", str(stop)))
    assert got == full[: full.index(stop) + 1], (got, full, stop)
    # Without an override the manifest's config.eos_token_id stops generation.
    got_eos = tokens_of(run(v4run, str(toy_engine), "--prompt-ids", "3,4,5", "--max-new-tokens", "12"))
    assert got_eos == greedy_reference(prompt, 12, stop=EOS)
    assert tokens_of(run(v4run, str(toy_engine), "--prompt-ids", "3", "--max-new-tokens", "0")) == []


def test_batch_gives_each_prompt_its_tokens_alone(v4run: Path, toy_engine: Path) -> None:
    """Prompts of different lengths decode together, each at its own position, as if alone; with a stop token
    the sequences finish at different steps."""
    prompts = [[3], [0, 31, 7, 7, 2], [5, 6, 7, 8, 9, 10, 11, 12]]
    args = [a for p in prompts for a in ("--prompt-ids", ",".join(map(str, p)))]
    got = token_lines(run(v4run, str(toy_engine), *args, "--max-new-tokens", "8", "--no-stop"))
    assert got == [greedy_reference(p, 8) for p in prompts]
    alone = [greedy_reference(p, 8) for p in prompts]
    stop = next(t for t in alone[1][:-1] if t not in alone[0] or alone[0].index(t) > alone[1].index(t))
    got = token_lines(run(v4run, str(toy_engine), *args, "--max-new-tokens", "8", "--stop-token", str(stop)))
    want = [greedy_reference(p, 8, stop=stop) for p in prompts]
    assert got == want, (got, want, stop)
    assert len({len(w) for w in want}) > 1, f"stop {stop} should end the sequences at different steps: {want}"
    expect_error(run(v4run, str(toy_engine), *args, "--prompt-ids", "1", "--max-new-tokens", "2"),
                 f"4 prompts, the engine serves 1..{B}")


def test_bad_input(v4run: Path, toy_engine: Path) -> None:
    expect_error(run(v4run, str(toy_engine), "--prompt-ids", f"1,{V}", "--max-new-tokens", "2"),
                 f"token id {V}", "vocab_size")
    expect_error(run(v4run, str(toy_engine), "--prompt-ids", "1,-1", "--max-new-tokens", "2"), "token id -1")
    expect_error(run(v4run, str(toy_engine), "--prompt-ids", ",".join(["1"] * (L + 1)), "--max-new-tokens", "1"),
                 f"{L + 1} tokens", f"max_len {L}")
    expect_error(run(v4run, str(toy_engine), "--prompt-ids", "1,2", "--max-new-tokens", str(L - 1)),
                 f"prompt 0 of 2 tokens + {L - 1} new tokens exceeds the engine's max_len {L}")
    expect_error(run(v4run, str(toy_engine), "--prompt-ids", "1,x", "--max-new-tokens", "2"), '"x" is not an integer')
    expect_error(run(v4run, str(toy_engine), "--max-new-tokens", "2"), "missing --prompt-ids")
    expect_error(run(v4run, str(toy_engine), "--prompt-ids", "1"), "1 tokens + 16 new tokens")  # default as Python
    expect_error(run(v4run, str(toy_engine), "--prompt-ids", "1", "--max-new-tokens", "2", "--frobnicate"),
                 "unknown option --frobnicate")


# ------------------------------------------------------------------------------------------ real engine


def test_real_engine_prints_the_eager_greedy_tokens(engine_dir: Path, eager, v4run: Path) -> None:
    """The session's tiny cpu engine (tests/runtime/conftest.py): v4run gives the eager reference's greedy tokens,
    alone, batched, and with the config's eos stop."""
    from v4compile.api import eager_generate

    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, eager.cfg.vocab_size, (n,), generator=g).tolist() for n in (1, 9, 23)]
    with torch.no_grad():
        want = [eager_generate(eager, p, 6) for p in prompts]
    args = [a for p in prompts for a in ("--prompt-ids", ",".join(map(str, p)))]
    assert token_lines(run(v4run, str(engine_dir), *args[:2], "--max-new-tokens", "6", "--no-stop")) == want[:1]
    got = token_lines(run(v4run, str(engine_dir), *args, "--max-new-tokens", "6", "--no-stop"))
    assert got == want, "batched decode differs from each prompt alone"
    # Greedy is deterministic: a stop keeps the prefix up to its first occurrence (the config's eos by default).
    cut = lambda stop: [w[: w.index(stop) + 1] if stop in w else w for w in want]  # noqa: E731
    got = token_lines(run(v4run, str(engine_dir), *args, "--max-new-tokens", "6"))
    assert got == cut(eager.cfg.eos_token_id)
    got = token_lines(run(v4run, str(engine_dir), *args, "--max-new-tokens", "6", "--stop-token", str(want[2][2])))
    assert got == cut(want[2][2]) and len(got[2]) == want[2].index(want[2][2]) + 1


def test_production_layout_engine_gives_the_python_engines_tokens(production_engine_dir: Path, production_engine,
                                                                  v4run: Path) -> None:
    """A bf16 engine whose caches are uint8 (production KV layout, allocated from the manifest by dtype): v4run's
    greedy tokens are the Python runtime's (the same compiled program), alone and batched."""
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 1024, (n,), generator=g).tolist() for n in (3, 12)]
    want = production_engine.generate(prompts, 6, stop_tokens=())
    args = [a for p in prompts for a in ("--prompt-ids", ",".join(map(str, p)))]
    assert token_lines(run(v4run, str(production_engine_dir), *args, "--max-new-tokens", "6", "--no-stop")) == want


# ------------------------------------------------------------------------------------------ SHA-256


@pytest.mark.parametrize("impl", ["default", "builtin"])  # OpenSSL's when libcrypto loads; the portable code
def test_sha256_matches_hashlib(v4run: Path, tmp_path: Path, impl: str, monkeypatch) -> None:
    if impl == "builtin":
        monkeypatch.setenv("V4RUN_SHA256", "builtin")
    gen = torch.Generator().manual_seed(1)
    sizes = [0, 1, 3, 55, 56, 57, 63, 64, 65, 119, 120, 128, 1000, (4 << 20) + 17]  # padding and chunk edges
    paths = []
    for n in sizes:
        p = tmp_path / f"f{n}.bin"
        p.write_bytes(torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).numpy().tobytes())
        paths.append(p)
    (tmp_path / "abc").write_bytes(b"abc")
    paths.append(tmp_path / "abc")
    proc = run(v4run, "--sha256", *map(str, paths))
    assert proc.returncode == 0, proc.stderr
    got = [line.split("  ", 1) for line in proc.stdout.splitlines()]
    assert [p for _, p in got] == [str(p) for p in paths]
    for (digest, _), path in zip(got, paths):
        assert digest == hashlib.sha256(path.read_bytes()).hexdigest(), f"{path.name}: {digest}"
    assert got[-1][0] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2 "abc"


# ------------------------------------------------------------------------------------------ manifest checks


def test_changed_byte_is_a_checksum_error(v4run: Path, toy_engine: Path, tmp_path: Path) -> None:
    eng = engine_copy(toy_engine, tmp_path)
    data = bytearray((eng / "model.pt2").read_bytes())
    data[len(data) // 2] ^= 0x01
    (eng / "model.pt2").write_bytes(bytes(data))
    expect_error(run(v4run, str(eng), "--prompt-ids", "1", "--max-new-tokens", "1"), "checksum mismatch for model.pt2")


def test_future_format_version(v4run: Path, toy_engine: Path, tmp_path: Path) -> None:
    future = mf.FORMAT_VERSION + 1
    eng = engine_copy(toy_engine, tmp_path, lambda m: m.update(format_version=future))
    expect_error(run(v4run, str(eng), "--prompt-ids", "1", "--max-new-tokens", "1"),
                 f"format version {future}, this v4run reads {mf.FORMAT_VERSION}")


def test_format_version_1_engine_is_refused(v4run: Path, toy_engine: Path, tmp_path: Path) -> None:
    """Format 1 engines kept their constants inside the models' .so files; this runtime reads format 2 only."""
    eng = engine_copy(toy_engine, tmp_path, lambda m: m.update(format_version=1))
    expect_error(run(v4run, str(eng), "--prompt-ids", "1", "--max-new-tokens", "1"),
                 f"format version 1, this v4run reads {mf.FORMAT_VERSION}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of an sm_90 engine on a CPU-only machine")
def test_sm90_engine_on_cpu(v4run: Path, toy_engine: Path, tmp_path: Path) -> None:
    eng = engine_copy(toy_engine, tmp_path, lambda m: m.update(arch="sm_90", target="h200"))
    expect_error(run(v4run, str(eng), "--prompt-ids", "1", "--max-new-tokens", "1"),
                 "engine built for arch sm_90 (target h200)", "this machine is cpu")


def test_torch_version_mismatch(v4run: Path, toy_engine: Path, tmp_path: Path) -> None:
    eng = engine_copy(toy_engine, tmp_path, lambda m: m.update(torch="1.99.0+cu999"))
    major, minor = torch.__version__.split(".")[:2]
    expect_error(run(v4run, str(eng), "--prompt-ids", "1", "--max-new-tokens", "1"),
                 "engine built with torch 1.99", f"libtorch {major}.{minor}")


def test_missing_listed_file(v4run: Path, toy_engine: Path, tmp_path: Path) -> None:
    eng = engine_copy(toy_engine, tmp_path, lambda m: m["files"].update({"weights/shard0.bin": "0" * 64}))
    expect_error(run(v4run, str(eng), "--prompt-ids", "1", "--max-new-tokens", "1"), "weights/shard0.bin", "cannot be read")


@pytest.mark.parametrize("text, needle", [
    ('{"format_version": 1,\n "a": ', "invalid JSON: unexpected end of input at line 2 column 7"),
    ('{"format_version": 1,', "invalid JSON: expected a string key at line 1 column 22"),
    ('{"format_version": 1, "format_version": 1}', 'duplicate key "format_version"'),
    ('{"format_version": 1, "a": [1, 2,]}', "invalid JSON: unexpected character ']'"),
    ('{"format_version": 01}', "invalid JSON"),
    ('{"format_version": 1} x', "unexpected text after the JSON value"),
    ('{"format_version": "1"}', "format_version must be a number, found string"),
    ('{"format_version": 1.5}', "format_version must be an integer, found 1.5"),
    ('[1]', "top level must be an object"),
])
def test_malformed_manifest(v4run: Path, toy_engine: Path, tmp_path: Path, text: str, needle: str) -> None:
    eng = engine_copy(toy_engine, tmp_path)
    (eng / "manifest.json").write_text(text)
    expect_error(run(v4run, str(eng), "--prompt-ids", "1", "--max-new-tokens", "1"), needle)


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.pop("cache"), 'manifest has no "cache"'),
    (lambda m: m["cache"]["tensors"][1].update(init="ones"), 'cache.tensors[1].init is "ones"'),
    (lambda m: m["cache"]["tensors"][0].update(shape=[1, L, D]), "cache.tensors[0].shape[0] = 1, expected -1"),
    (lambda m: m["cache"]["tensors"][0].update(dtype="complex32"), 'dtype "complex32"'),
    (lambda m: m["files"].update({"../escape": "0" * 64}), '"../escape", not a path inside the engine directory'),
    (lambda m: m["files"].update({"model.pt2": "ABC"}), 'files["model.pt2"] must be a lowercase sha256'),
    (lambda m: m.update(files={}), "no checksum for model.pt2"),
])
def test_invalid_manifest_fields(v4run: Path, toy_engine: Path, tmp_path: Path, edit, needle: str) -> None:
    eng = engine_copy(toy_engine, tmp_path, edit)
    expect_error(run(v4run, str(eng), "--prompt-ids", "1", "--max-new-tokens", "1"), needle)


def test_toy_weights_are_stored_once(toy_engine: Path) -> None:
    """The fixture's models carry no constants in their .so; weights.safetensors holds each of the four once and
    both models name the same stored tensors."""
    from safetensors.torch import load_file

    man = json.loads((toy_engine / "manifest.json").read_text())
    models = man["weights"]["models"]
    assert sorted(models["prefill"]) == sorted(models["decode"]) == ["emb", "pe", "w_out", "w_tok"]
    assert all(models["prefill"][k][0] == models["decode"][k][0] for k in models["prefill"])
    stored = load_file(str(toy_engine / WEIGHTS_FILE))
    assert sorted(stored) == ["emb", "pe", "w_out", "w_tok"]
    assert torch.equal(stored["emb"].view(V, D), Toy().emb.detach())


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["weights"]["models"]["decode"].pop("w_tok"), 'model "decode" needs 1 constants that'),
    (lambda m: m["weights"]["models"]["prefill"]["emb"].__setitem__(0, "nope"), 'has no tensor "nope"'),
    (lambda m: m["weights"]["models"]["prefill"]["emb"].__setitem__(1, [V + 1, D]), "does not fit stored tensor"),
    (lambda m: m["weights"].update(file="../w.safetensors"), "is not a file name in the engine directory"),
    (lambda m: m.pop("weights"), 'manifest has no "weights"'),
    (lambda m: m["files"].pop(WEIGHTS_FILE), f"no checksum for {WEIGHTS_FILE}"),
])
def test_bad_weights_section_is_refused(v4run: Path, toy_engine: Path, tmp_path: Path, edit, needle: str) -> None:
    """A manifest whose weights section would leave a constant unbound (running it would crash) or point outside
    the file: a typed error before any model runs."""
    eng = engine_copy(toy_engine, tmp_path, edit)
    expect_error(run(v4run, str(eng), "--prompt-ids", "1", "--max-new-tokens", "1"), needle)


def test_truncated_weights_file_is_refused(v4run: Path, toy_engine: Path, tmp_path: Path) -> None:
    """A weights file cut short (checksum updated, as by a careless copy tool): named, not read past its end."""
    eng = engine_copy(toy_engine, tmp_path)
    data = (eng / WEIGHTS_FILE).read_bytes()
    (eng / WEIGHTS_FILE).write_bytes(data[:-16])
    man = json.loads((eng / "manifest.json").read_text())
    man["files"][WEIGHTS_FILE] = hashlib.sha256(data[:-16]).hexdigest()
    (eng / "manifest.json").write_text(json.dumps(man))
    expect_error(run(v4run, str(eng), "--prompt-ids", "1", "--max-new-tokens", "1"), "past the end of the file")


def test_manifest_with_python_json_extensions(v4run: Path, toy_engine: Path, tmp_path: Path) -> None:
    """json.dumps writes NaN/Infinity and escapes non-ASCII; such a manifest still loads and runs."""
    def edit(m: dict) -> None:
        m["parity"] = {"max_rel": float("inf"), "kl": float("nan"), "min": float("-inf"), "note": "é \U0001F600 \"q\"",
                       "nested": [[{"a": None, "b": True, "c": False, "d": -1.5e-3}]]}
    eng = engine_copy(toy_engine, tmp_path, edit)
    assert "Infinity" in (eng / "manifest.json").read_text() and "\\ud83d" in (eng / "manifest.json").read_text()
    assert tokens_of(run(v4run, str(eng), "--prompt-ids", "3,4,5", "--max-new-tokens", "4", "--no-stop")) == \
        greedy_reference([3, 4, 5], 4)


# ------------------------------------------------------------------------------------------ build


def test_direct_compiler_build(v4run: Path, v4run_build: dict[str, Future], toy_engine: Path) -> None:
    """The fallback without CMake builds a v4run that behaves the same; a second call is a cache hit."""
    binary = built(v4run_build["gxx"])
    assert binary != v4run and binary.parent.name == source_hash("gxx")[:16]
    mtime = binary.stat().st_mtime_ns
    assert build_v4run(binary.parent.parent, method="gxx") == binary and binary.stat().st_mtime_ns == mtime
    assert tokens_of(run(binary, str(toy_engine), "--prompt-ids", "3,4,5", "--max-new-tokens", "5", "--no-stop")) == \
        greedy_reference([3, 4, 5], 5)
    assert [p.name for p in binary.parent.parent.iterdir()] == [binary.parent.name], "temporary build dir left behind"
    with pytest.raises(CppBuildError, match="build method 'make'"):
        build_v4run(binary.parent.parent, method="make")


def test_compile_error_is_reported(tmp_path: Path, monkeypatch) -> None:
    """A source that does not compile raises CppBuildError with the compiler's message, leaving nothing behind."""
    from v4compile.runtime import cpp_build

    if cpp_build._compiler() is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "src"
    src.mkdir()
    for name in cpp_build.SOURCES:
        (src / name).write_text("int main() { return undeclared_v4_symbol; }\n")
    monkeypatch.setattr(cpp_build, "SOURCE_DIR", src)
    with pytest.raises(CppBuildError, match="undeclared_v4_symbol"):
        build_v4run(tmp_path / "out", method="gxx")
    assert list((tmp_path / "out").iterdir()) == []
