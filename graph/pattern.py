"""Pattern rewrites over FX graphs: patterns with named captures, rule lists, a fixed-point driver.

A rewrite is data (STYLE.md item 3): `Rule(pattern, fn)` where `pattern` describes a node and its inputs
and `fn(m: Match) -> dict[str, Node] | None` is a pure module-level function. `fn` returns the replacement
for one or more captured nodes (`{"root": new_node}`; multi-output fusions also replace e.g. getitem
captures), or `None` when the rule does not apply after all; then the graph is left exactly as it was.
`RuleSet`s compose with `+` and are applied by `rewrite(gm, rules)` until no rule fires (fixed point)
or the step limit is hit, which raises `RewriteError` naming the rule set.

    pat = P(torch.ops.v4.sinkhorn, P(operator.getitem, P(torch.ops.v4.hc_mix, ...), 2, name="logits"), ...)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import fx

log = logging.getLogger(__name__)


class RewriteError(RuntimeError):
    """The rewrite driver did not reach a fixed point within its step limit."""


class _Wildcard:
    """Matches any argument (node or constant); captured when named."""

    def __init__(self, name: str | None = None):
        self.name = name

    def __repr__(self) -> str:
        return f"Any({self.name or ''})"


def Any(name: str | None = None) -> _Wildcard:  # noqa: N802 - reads like a pattern constructor
    return _Wildcard(name)


@dataclass(frozen=True)
class P:
    """A call_function node whose target is `op` (an OpOverload, its packet, or a tuple of those)."""

    op: Any
    args: tuple = ()
    name: str | None = None
    kwargs: dict = field(default_factory=dict)
    single_user: bool = False  # every consumer of this node must lie inside the match

    def __init__(self, op: Any, *args: Any, name: str | None = None, single_user: bool = False, **kwargs: Any):
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "kwargs", kwargs)
        object.__setattr__(self, "single_user", single_user)

    def target_matches(self, target: Any) -> bool:
        ops = self.op if isinstance(self.op, tuple) else (self.op,)
        for op in ops:
            if target is op or getattr(target, "overloadpacket", None) is op:
                return True
        return False


class Match:
    """Captures of one successful match; `call` inserts new nodes before the matched root."""

    def __init__(self, graph: fx.Graph, root: fx.Node):
        self.graph, self.root = graph, root
        self.captures: dict[str, Any] = {}
        self.nodes: list[fx.Node] = []  # every node the pattern matched (for single_user checks)

    def __getitem__(self, name: str) -> Any:
        return self.captures[name]

    def __contains__(self, name: str) -> bool:
        return name in self.captures

    def call(self, op: Any, *args: Any, **kwargs: Any) -> fx.Node:
        """Insert `op(*args, **kwargs)` before the root, with meta['val'] computed on fake tensors."""
        with self.graph.inserting_before(self.root):
            node = self.graph.call_function(op, tuple(args), kwargs)
        node.meta["val"] = _fake_eval(op, args, kwargs)
        if "stack_trace" in self.root.meta:
            node.meta["stack_trace"] = self.root.meta["stack_trace"]
        return node


def _fake_eval(op: Any, args: tuple, kwargs: dict) -> Any:
    def val(a: Any) -> Any:
        return a.meta.get("val") if isinstance(a, fx.Node) else a

    from torch._guards import detect_fake_mode

    fargs = torch.utils._pytree.tree_map(val, (args, kwargs))
    mode = detect_fake_mode(torch.utils._pytree.tree_leaves(fargs))
    if mode is None:
        return None
    with mode:
        return op(*fargs[0], **fargs[1])


def match(pattern: Any, arg: Any, m: Match) -> bool:
    """Structural match of `pattern` against `arg` (an fx.Node or a constant), filling `m.captures`."""
    if isinstance(pattern, _Wildcard):
        return _capture(m, pattern.name, arg)
    if isinstance(pattern, P):
        if not (isinstance(arg, fx.Node) and arg.op == "call_function" and pattern.target_matches(arg.target)):
            return False
        if len(pattern.args) > len(arg.args):
            return False
        for p, a in zip(pattern.args, arg.args):
            if not match(p, a, m):
                return False
        for k, p in pattern.kwargs.items():
            if k not in arg.kwargs or not match(p, arg.kwargs[k], m):
                return False
        m.nodes.append(arg)
        if pattern.single_user:
            m.captures.setdefault("_single_user", []).append(arg)
        return _capture(m, pattern.name, arg)
    if isinstance(pattern, list):  # a list argument (e.g. aten.cat's tensors), matched element by element
        return (isinstance(arg, (list, tuple)) and len(arg) == len(pattern)
                and all(match(p, a, m) for p, a in zip(pattern, arg)))
    return pattern == arg  # a literal constant in the pattern


def _capture(m: Match, name: str | None, value: Any) -> bool:
    if name is None:
        return True
    if name in m.captures:  # the same name twice must bind the same node
        return m.captures[name] is value
    m.captures[name] = value
    return True


@dataclass(frozen=True)
class Rule:
    pattern: P
    fn: Callable[[Match], dict[str, fx.Node] | None]

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


@dataclass(frozen=True)
class RuleSet:
    name: str
    rules: tuple[Rule, ...]

    def __add__(self, other: "RuleSet") -> "RuleSet":
        return RuleSet(f"{self.name}+{other.name}", self.rules + other.rules)


def rules(name: str, *items: Rule | tuple) -> RuleSet:
    """`rules("fuse_mhc", (pattern, fn), ...)` -> RuleSet."""
    return RuleSet(name, tuple(r if isinstance(r, Rule) else Rule(*r) for r in items))


def _try(rule: Rule, graph: fx.Graph, node: fx.Node) -> bool:
    m = Match(graph, node)
    if not match(rule.pattern, node, m):
        return False
    inside = set(m.nodes)
    for n in m.captures.pop("_single_user", []):
        if any(u not in inside for u in n.users) and n is not node:
            return False
    before = len(graph.nodes)
    replacement = rule.fn(m)
    if replacement is None:
        assert len(graph.nodes) == before, f"rule {rule.name} returned None after editing the graph"
        return False
    for cap, new in replacement.items():
        old = node if cap == "root" else m.captures[cap]
        old.replace_all_uses_with(new)
    _erase_dead(graph, [node, *m.nodes])
    return True


def _erase_dead(graph: fx.Graph, candidates: Iterable[fx.Node]) -> None:
    """Erase matched nodes left without users, and transitively their pure inputs."""
    work = list(candidates)
    while work:
        n = work.pop()
        if getattr(n, "_erased", False) or n.users or n.op != "call_function" or _has_side_effects(n):
            continue
        inputs = [a for a in n.all_input_nodes]
        graph.erase_node(n)
        work.extend(inputs)


def _has_side_effects(n: fx.Node) -> bool:
    schema = getattr(n.target, "_schema", None)
    return bool(schema is not None and (schema.is_mutable or any(a.alias_info and a.alias_info.is_write
                                                                  for a in schema.arguments)))


def rewrite(gm: fx.GraphModule, ruleset: RuleSet, max_steps: int = 10_000) -> int:
    """Apply `ruleset` until no rule fires; returns the number of rewrites. Raises RewriteError past max_steps."""
    graph, steps = gm.graph, 0
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if getattr(node, "_erased", False):  # erased by an earlier rewrite in this sweep
                continue
            for rule in ruleset.rules:
                if _try(rule, graph, node):
                    steps += 1
                    changed = True
                    if steps > max_steps:
                        raise RewriteError(f"rule set {ruleset.name!r} did not reach a fixed point within "
                                           f"{max_steps} rewrites (last rule: {rule.name})")
                    break
    if steps:
        graph.lint()
        gm.recompile()
    log.info("%s: %d rewrites", ruleset.name, steps)
    return steps
