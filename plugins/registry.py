"""Kernel registry: which implementation runs each v4 op on each target (STYLE.md item 6).

An entry is (op, target, supports, priority, fn). `supports(*args, **kwargs) -> bool` receives the op's
arguments as the node will see them (real tensors, or the FakeTensors in an FX node's `meta["val"]`),
so a capability check can look at dtype, shape, device and scalar arguments. Lookup returns the entry
with the highest priority whose predicate holds (ties: the one registered first). Registration happens
when a kernel module is imported; the target modules import the kernel modules they want.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from v4compile.errors import UnsupportedOpError

Predicate = Callable[..., bool]


@dataclass(frozen=True)
class KernelEntry:
    """One implementation of `op` on `target`."""

    op: str  # graph op name, e.g. "v4::sparse_attention"
    target: str  # "h100", "h200", "cpu", ...
    fn: Callable[..., Any]  # the callable that runs it (a triton_op, a launcher, a decomposition)
    supports: Predicate  # capability check on the op's arguments
    priority: int
    name: str  # for messages and manifests: module.qualname of fn


_REGISTRY: dict[tuple[str, str], list[KernelEntry]] = {}


def _always(*_args: Any, **_kwargs: Any) -> bool:
    return True


def register_kernel(op: str, target: str | Iterable[str], supports: Predicate | None = None,
                    priority: int = 0, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register `fn` as an implementation of `op` on each target (re-registering a name replaces it)."""
    targets = [target] if isinstance(target, str) else list(target)
    if not op or "::" not in op:
        raise ValueError(f"register_kernel: op must be 'namespace::name', got {op!r}")
    if not targets:
        raise ValueError(f"register_kernel({op!r}): no target given")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        key = name or f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
        for t in targets:
            entries = [e for e in _REGISTRY.get((op, t), []) if e.name != key]
            entries.append(KernelEntry(op, t, fn, supports or _always, priority, key))
            # stable sort: equal priorities keep registration order
            _REGISTRY[(op, t)] = sorted(entries, key=lambda e: -e.priority)
        return fn

    return deco


def unregister_kernel(op: str, target: str, name: str) -> bool:
    """Remove one entry by its name; True if something was removed (used by tests)."""
    entries = _REGISTRY.get((op, target), [])
    kept = [e for e in entries if e.name != name]
    _REGISTRY[(op, target)] = kept
    return len(kept) != len(entries)


def registered(op: str | None = None, target: str | None = None) -> list[KernelEntry]:
    """Every entry, optionally filtered by op and/or target, in lookup order per (op, target)."""
    return [e for (o, t), es in sorted(_REGISTRY.items()) for e in es
            if (op is None or o == op) and (target is None or t == target)]


def lookup(op: str, target: str, *args: Any, **kwargs: Any) -> KernelEntry | None:
    """First entry (by priority) of `op` on `target` whose predicate accepts these arguments; None if none does."""
    for entry in _REGISTRY.get((op, target), []):
        if entry.supports(*args, **kwargs):
            return entry
    return None


def _reason(op: str, target: str) -> str:
    n = len(_REGISTRY.get((op, target), []))
    return "no kernel registered" if n == 0 else f"{n} kernel(s) registered, none supports these inputs"


def select_kernels(calls: Iterable[tuple[str, str, tuple, dict]], target: str,
                   strict: bool = True) -> dict[str, KernelEntry | None]:
    """Resolve many calls at once: `calls` yields (node_name, op, args, kwargs) -> {node_name: entry or None}.

    In strict mode every unsupported call is collected and ONE UnsupportedOpError lists them all.
    """
    chosen: dict[str, KernelEntry | None] = {}
    missing: list[str] = []
    for node_name, op, args, kwargs in calls:
        entry = lookup(op, target, *args, **kwargs)
        chosen[node_name] = entry
        if entry is None:
            missing.append(f"{node_name} ({op}): {_reason(op, target)}")
    if strict and missing:
        raise UnsupportedOpError(f"target {target!r}: {len(missing)} node(s) have no supported kernel: "
                                 + "; ".join(missing))
    return chosen


def node_call(node: Any) -> tuple[str, str, tuple, dict]:
    """(name, op, args, kwargs) of an FX call_function node, with argument nodes replaced by meta['val']."""
    def val(a: Any) -> Any:
        if hasattr(a, "meta") and hasattr(a, "op"):  # an fx.Node
            return a.meta.get("val", a)
        if isinstance(a, (list, tuple)):
            return type(a)(val(x) for x in a)
        return a

    schema = getattr(node.target, "_schema", None)  # OpOverload: schema name without the overload
    op = schema.name if schema is not None else str(node.target)
    return node.name, op, tuple(val(a) for a in node.args), {k: val(v) for k, v in node.kwargs.items()}
