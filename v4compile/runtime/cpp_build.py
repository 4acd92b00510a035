"""Builds the C++ runtime `v4run` (v4compile/runtime/cpp/) against the installed torch wheel's libtorch.

The binary is cached under `build_dir/<hash>/v4run`, where the hash covers the sources, the torch
version and location, and the build method, so a second call is free and an edited source rebuilds.
CMake is used when present (CMakeLists.txt finds libtorch through torch.utils.cmake_prefix_path);
otherwise, or when CMake cannot configure (e.g. a CUDA wheel on a machine without the CUDA toolkit that
Caffe2's CMake config looks for), the sources are compiled with the C++ compiler directly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from v4compile.errors import V4Error

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent / "cpp"
SOURCES = ("v4manifest.cpp", "v4engine.cpp", "v4run.cpp")
METHODS = ("auto", "cmake", "gxx")


class CppBuildError(V4Error):
    """v4run could not be compiled; the message carries the failing command and the compiler's last lines."""


class CppToolchainError(CppBuildError):
    """No C++ compiler (or no CMake where method='cmake' was asked for)."""


def _torch_paths() -> tuple[str, Path]:
    import torch

    return torch.__version__, Path(torch.__file__).resolve().parent


def source_hash(method: str = "auto") -> str:
    """Hex digest of the runtime sources, torch version and location, and the build method."""
    version, torch_dir = _torch_paths()
    h = hashlib.sha256()
    for path in sorted(SOURCE_DIR.iterdir()):
        if path.is_file() and path.suffix in (".cpp", ".h", ".txt"):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(f"{version}\0{torch_dir}\0{method}\0{_compiler() or ''}".encode())
    return h.hexdigest()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build_v4run(build_dir: str | os.PathLike[str], *, method: str = "auto", jobs: int | None = None) -> Path:
    """Compiles v4run into build_dir (cached by source hash) and returns the path of the binary."""
    if method not in METHODS:
        raise CppBuildError(f"build method {method!r}: expected one of {', '.join(METHODS)}")
    if _compiler() is None:
        raise CppToolchainError("no C++ compiler found (set CXX, or install g++)")
    if method == "cmake" and shutil.which("cmake") is None:
        raise CppToolchainError("cmake not found (method='cmake')")
    build_dir = Path(build_dir)
    out = build_dir / source_hash(method)[:16] / "v4run"
    if out.is_file() and os.access(out, os.X_OK):
        return out
    build_dir.mkdir(parents=True, exist_ok=True)
    jobs = jobs or max(1, min(len(SOURCES), os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix=".v4run-", dir=build_dir) as tmp:
        work = Path(tmp)
        binary = None
        if method in ("auto", "cmake") and shutil.which("cmake"):
            try:
                binary = _build_cmake(work / "cmake", jobs)
            except CppBuildError as err:
                if method == "cmake":
                    raise
                log.warning("cmake build of v4run failed, compiling directly instead: %s", err)
        if binary is None:
            binary = _build_direct(work / "direct", jobs)
        out.parent.mkdir(parents=True, exist_ok=True)
        staged = out.parent / f".v4run.{os.getpid()}"
        shutil.copy2(binary, staged)
        os.replace(staged, out)  # atomic: a concurrent build sees either no binary or a whole one
    return out


def _run(cmd: list[str], cwd: Path, log_path: Path) -> None:
    with open(log_path, "a") as logf:
        logf.write("$ " + " ".join(cmd) + "\n")
        logf.flush()
        proc = subprocess.run(cmd, cwd=cwd, stdout=logf, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        raise CppBuildError(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}):\n" + "\n".join(tail))


def _build_cmake(work: Path, jobs: int) -> Path:
    work.mkdir(parents=True)
    log_path = work / "build.log"
    _run(["cmake", "-S", str(SOURCE_DIR), "-B", str(work), f"-DPython_EXECUTABLE={sys.executable}",
          "-DCMAKE_BUILD_TYPE=Release"], work, log_path)
    _run(["cmake", "--build", str(work), "--target", "v4run", "-j", str(jobs)], work, log_path)
    return work / "v4run"


def direct_flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) for building against the torch wheel without CMake."""
    import torch

    _, torch_dir = _torch_paths()
    inc, lib = torch_dir / "include", torch_dir / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cflags = ["-std=c++20", "-O2", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{inc}",
              f"-I{inc / 'torch' / 'csrc' / 'api' / 'include'}"]
    libs = ["-ltorch", "-ltorch_cpu", "-lc10"]
    if (lib / "libtorch_cuda.so").exists():  # CUDA wheel: keep torch_cuda linked so its hooks register
        # the CUDA libraries torch_cuda needs are found at run time through its own RUNPATH (nvidia-* wheels)
        libs = ["-Wl,--no-as-needed", "-ltorch_cuda", "-lc10_cuda", "-Wl,--as-needed", "-Wl,--allow-shlib-undefined",
                *libs]
    ldflags = [f"-L{lib}", *libs, "-ldl", "-lpthread", f"-Wl,-rpath,{lib}"]
    return cflags, ldflags


def _build_direct(work: Path, jobs: int) -> Path:
    work.mkdir(parents=True)
    cxx = _compiler()
    assert cxx is not None  # checked by build_v4run
    cflags, ldflags = direct_flags()
    objects = []
    pending: list[tuple[subprocess.Popen[bytes], Path, list[str]]] = []
    for name in SOURCES:
        obj, log_path = work / (name + ".o"), work / (name + ".log")
        cmd = [cxx, *cflags, "-c", str(SOURCE_DIR / name), "-o", str(obj)]
        with open(log_path, "w") as logf:
            pending.append((subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT), log_path, cmd))
        objects.append(obj)
        while len(pending) >= jobs or (pending and name == SOURCES[-1]):
            proc, log_path, cmd = pending.pop(0)
            if proc.wait() != 0:
                for other, _, _ in pending:
                    other.wait()
                tail = log_path.read_text(errors="replace").splitlines()[-25:]
                raise CppBuildError(f"{cxx} -c {cmd[-3]} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    binary = work / "v4run"
    _run([cxx, *map(str, objects), "-o", str(binary), *ldflags], work, work / "link.log")
    return binary


if __name__ == "__main__":  # python -m v4compile.runtime.cpp_build BUILD_DIR  -> prints the v4run path
    import argparse

    parser = argparse.ArgumentParser(description="Build the C++ runtime v4run (cached by source hash).")
    parser.add_argument("build_dir", nargs="?", default="build/v4run")
    parser.add_argument("--method", choices=METHODS, default="auto")
    ns = parser.parse_args()
    try:
        print(build_v4run(ns.build_dir, method=ns.method))
    except CppBuildError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
