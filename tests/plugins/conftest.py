"""Plugin tests run the Triton kernels on the CPU through the interpreter (DESIGN.md section 9)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any test module imports triton

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


def _patch_interpreter_index() -> None:
    """Work around triton 3.6's interpreter under numpy >= 2.4.

    Broken: the interpreter's `tensor.__index__` is `int(handle.data)`; a scalar such as `tl.program_id(0) * n`
    is a 1-element array there, and numpy 2.4 refuses `int()` of a 1-d array, so any `range()` whose bounds
    depend on the program id fails. Safe: we read the single element instead, which is what int() used to do.
    Remove when triton's interpreter converts with `.item()` (or numpy < 2.4 is pinned).
    """
    try:
        import triton.runtime.interpreter as interp
    except ImportError:
        return
    original = getattr(interp, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_v4_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._v4_patched = True
    interp._patch_lang_tensor = patched


def _patch_interpreter_bf16_dot() -> None:
    """Work around triton 3.6's interpreter multiplying bfloat16 dot operands as raw integers.

    Broken: `InterpreterBuilder.create_dot` hands numpy the uint16 storage of bf16 tensors, so `tl.dot` on
    bf16 returns products of bit patterns. Safe: bf16 -> float32 is exact (bits << 16) and the dot then
    accumulates in float32, which is what the GPU's bf16 MMA with an fp32 accumulator computes.
    Remove when the interpreter converts bf16 operands itself.
    """
    try:
        import numpy as np
        import triton.language as tl
        import triton.runtime.interpreter as interp
    except ImportError:
        return
    builder = getattr(interp, "InterpreterBuilder", None)
    original = getattr(builder, "create_dot", None)
    if original is None or getattr(original, "_v4_patched", False):
        return

    def as_f32(h):
        if h.dtype == tl.bfloat16:
            return interp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, as_f32(a), as_f32(b), d, input_precision, max_num_imprecise_acc)

    create_dot._v4_patched = True
    builder.create_dot = create_dot


def _patch_interpreter_bf16_cast() -> None:
    """Work around triton 3.6's interpreter truncating float32 -> bfloat16 casts.

    Broken: `InterpreterBuilder.cast_impl` drops the low 16 bits (round toward zero) where the GPU's
    `.to(tl.bfloat16)` rounds to nearest-even; the bias alone moves bf16 attention outputs by ~1e-5 calc_diff.
    Safe: the replacement is the standard bit-exact RNE (NaN kept quiet), applied only to f32 -> bf16.
    Remove when the interpreter rounds this cast to nearest-even.
    """
    try:
        import numpy as np
        import triton.language as tl
        import triton.runtime.interpreter as interp
    except ImportError:
        return
    builder = getattr(interp, "InterpreterBuilder", None)
    original = getattr(builder, "cast_impl", None)
    if original is None or getattr(original, "_v4_patched", False):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            nan = np.isnan(src.data)
            rounded = np.where(nan, ((bits >> 16) | 0x40).astype(np.uint16), rounded)
            return interp.TensorHandle(rounded, dst_type.scalar)
        return original(self, src, dst_type)

    cast_impl._v4_patched = True
    builder.cast_impl = cast_impl


_patch_interpreter_index()
_patch_interpreter_bf16_dot()
_patch_interpreter_bf16_cast()


@pytest.fixture(scope="module")
def exact_interpreter_casts():
    """Triton 3.6's interpreter rounds float downcasts wrongly: fp32 -> e4m3 can carry out of the mantissa
    without bumping the exponent (31.7 -> 16) and rounds half up; fp32 -> bf16 truncates. The GPU rounds to
    nearest-even (cvt.rn), as torch does, so for the duration of this module the interpreter's converter
    uses torch's casts for those pairs (other conversions untouched). Remove when the interpreter is fixed.
    Modules whose kernels cast to e4m3 use it: pytestmark = pytest.mark.usefixtures("exact_interpreter_casts")."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    import triton.runtime.interpreter as interp
    from triton._C.libtriton import ir

    torch_of = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8e4nv": torch.float8_e4m3fn}
    ints = {1: (np.int8, torch.int8, np.uint8), 2: (np.int16, torch.int16, np.uint16), 4: (np.int32, torch.int32, np.uint32)}
    original = interp._convert_float

    def exact(data, src_ty, dst_ty, rounding):
        src, dst = torch_of.get(src_ty.name), torch_of.get(dst_ty.name)
        if src is None or dst is None or rounding not in (None, ir.ROUNDING_MODE.RTNE):
            return original(data, src_ty, dst_ty, rounding)
        arr = np.asarray(data)
        raw = np.frombuffer(arr.tobytes(), dtype=ints[src.itemsize][0]).reshape(arr.shape).copy()
        out = torch.from_numpy(raw).view(src).to(dst)
        return out.view(ints[dst.itemsize][1]).numpy().view(ints[dst.itemsize][2])

    interp._convert_float = exact
    yield
    interp._convert_float = original
