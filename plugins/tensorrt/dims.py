"""Dimension arithmetic that works on ints, on `Sym` expressions and on TensorRT shape expressions alike.

The AOT launch descriptions (plugins/tensorrt/aot.py) and the kernel plugins' shape rules (specs.py) compute
grids, extra kernel arguments and output dims with these helpers only, so the same code yields concrete numbers
(tests, the eager emulation of a plugin launch) and the symbolic expressions TensorRT evaluates per input shape
(`trtp.ShapeExpr`, whose ceiling division / min / max are `trtp.cdiv` / `trtp.min` / `trtp.max`).

`Sym` is a small symbolic integer for tests and docs: it refuses `bool()` (so a description that branches on a
dynamic dim fails here exactly as it would with TensorRT's expressions) and evaluates with `evaluate(expr, env)`.
No tensorrt import unless a TensorRT expression is actually handed in; torch.SymInt (fake-tensor shape rules
while exporting) goes through torch.sym_min / sym_max.
"""

from __future__ import annotations

from typing import Any

Dim = Any  # int | Sym | tensorrt.plugin.ShapeExpr


class Sym:
    """A symbolic integer expression: a named dim, or an operation on sub-expressions."""

    __slots__ = ("op", "args")

    def __init__(self, op: str, *args: Any) -> None:
        self.op, self.args = op, args

    @classmethod
    def dim(cls, name: str) -> "Sym":
        return cls("dim", name)

    def __add__(self, o: Dim) -> "Sym":
        return Sym("+", self, o)

    def __radd__(self, o: Dim) -> "Sym":
        return Sym("+", o, self)

    def __sub__(self, o: Dim) -> "Sym":
        return Sym("-", self, o)

    def __rsub__(self, o: Dim) -> "Sym":
        return Sym("-", o, self)

    def __mul__(self, o: Dim) -> "Sym":
        return Sym("*", self, o)

    def __rmul__(self, o: Dim) -> "Sym":
        return Sym("*", o, self)

    def __floordiv__(self, o: Dim) -> "Sym":
        return Sym("//", self, o)

    def __rfloordiv__(self, o: Dim) -> "Sym":
        return Sym("//", o, self)

    def __bool__(self) -> bool:
        raise TypeError(f"branch on the symbolic dim {self!r}: launch descriptions must be branch-free in dynamic "
                        "dims (TensorRT evaluates them as shape expressions)")

    def __repr__(self) -> str:
        if self.op == "dim":
            return str(self.args[0])
        if self.op in ("cdiv", "min", "max"):
            return f"{self.op}({self.args[0]!r}, {self.args[1]!r})"
        return f"({self.args[0]!r} {self.op} {self.args[1]!r})"


_INT_OPS = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "//": lambda a, b: a // b,
    "cdiv": lambda a, b: -(-a // b), "min": min, "max": max,
}


def evaluate(x: Dim, env: dict[str, int]) -> int:
    """Value of `x` (int or Sym) with the named dims bound by `env`."""
    if isinstance(x, int):
        return x
    if not isinstance(x, Sym):
        raise TypeError(f"cannot evaluate {type(x).__name__} {x!r} (only int and Sym)")
    if x.op == "dim":
        if x.args[0] not in env:
            raise KeyError(f"dim {x.args[0]!r} not bound (have {sorted(env)})")
        return env[x.args[0]]
    return _INT_OPS[x.op](evaluate(x.args[0], env), evaluate(x.args[1], env))


def _kind(*xs: Dim) -> str:
    """'int', 'sym' (dims.Sym), 'trt' (tensorrt.plugin expressions) or 'torch' (torch.SymInt while tracing)."""
    if all(isinstance(x, int) for x in xs):
        return "int"
    if any(isinstance(x, Sym) for x in xs):
        return "sym"
    if any(type(x).__module__.startswith("tensorrt") for x in xs):
        return "trt"
    return "torch"


def _trtp() -> Any:
    import tensorrt.plugin as trtp  # only reached with TensorRT expressions, i.e. inside tensorrt itself

    return trtp


def cdiv(a: Dim, b: Dim) -> Dim:
    """Ceiling division."""
    kind = _kind(a, b)
    if kind == "sym":
        return Sym("cdiv", a, b)
    if kind == "trt":
        return _trtp().cdiv(a, b)
    return -(-a // b)  # ints and torch.SymInt


def smin(a: Dim, b: Dim) -> Dim:
    """min of two dims."""
    kind = _kind(a, b)
    if kind == "int":
        return min(a, b)
    if kind == "sym":
        return Sym("min", a, b)
    if kind == "trt":
        return _trtp().min(a, b)
    import torch

    return torch.sym_min(a, b)


def smax(a: Dim, b: Dim) -> Dim:
    """max of two dims."""
    kind = _kind(a, b)
    if kind == "int":
        return max(a, b)
    if kind == "sym":
        return Sym("max", a, b)
    if kind == "trt":
        return _trtp().max(a, b)
    import torch

    return torch.sym_max(a, b)


def constant(x: Dim) -> int | None:
    """The value of a build-time constant dim, else None (a Sym, or a non-constant TensorRT expression)."""
    if isinstance(x, int):
        return x
    if isinstance(x, Sym):
        return None
    if getattr(x, "is_constant", False):  # trtp.ShapeExpr
        return int(x.constant_value())
    return None
