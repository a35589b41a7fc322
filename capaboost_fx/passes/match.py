"""Match: find the linear ops of a captured graph whose weight is a parameter.

Patterns (ATen, as ``torch.export`` emits them), with the weight ``W`` a ``get_attr`` of a
parameter, optionally through one transpose (``aten.t``, ``aten.transpose(0, 1)``,
``aten.permute([1, 0])``):

    aten.linear(x, W[, b])     W stored out × in   (nn.Linear, F.linear, MHA projections)
    aten.addmm(b, x, W)        W stored in × out   (GPT-2 Conv1D)
    aten.mm(x, W), aten.matmul(x, W)               W stored in × out; out × in through a transpose

A *target* is one weight, however many ops use it: one weight, one adapter, one fold. Its name
is the fully qualified name of the module owning it (``...attention.self.query``), or the
parameter's own name when it is not called ``weight`` (``layers.0.self_attn.in_proj_weight``).
Each rejected candidate carries the reason (match, check, replace).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..errors import TargetError, TargetNotFoundError, close_names
from ..masks import NM_PATTERN
from ..spec import Spec, pattern_matches
from .capture import BASE

aten = torch.ops.aten

_LINEAR_OPS = {
    aten.linear.default: "linear",
    aten.addmm.default: "addmm",
    aten.mm.default: "mm",
    aten.matmul.default: "matmul",
}
_TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default}


@dataclass
class Site:
    """One use of a weight by a linear op in one graph."""

    node: fx.Node  # produces y = op(x, W, ...)
    x: fx.Node  # the activation input
    op: str
    fqn: str  # parameter FQN inside the model (no ``wrapped.`` prefix)
    layout: str  # how W is stored: "out_in" (nn.Linear) or "in_out" (Conv1D)
    bias: str | None = None  # FQN of the op's bias parameter, if it adds one
    region: frozenset[fx.Node] = frozenset()  # a module output's own ops (module sites only)


@dataclass
class Candidate:
    """A parameter used as the weight of linear ops, in one or more graphs."""

    name: str
    fqn: str
    param: nn.Parameter
    sites: dict[str, list[Site]] = field(default_factory=lambda: defaultdict(list))
    reason: str | None = None  # why it cannot be adapted, None if it can
    aliases: list[str] = field(default_factory=list)  # names of tied copies

    kind = "op"

    @property
    def layout(self) -> str:
        return next(s.layout for ss in self.sites.values() for s in ss)

    @property
    def dtype(self) -> torch.dtype:
        return self.param.dtype

    @property
    def adapter_path(self) -> str:
        return adapter_path(self.fqn)

    @property
    def bias_fqn(self) -> str | None:
        """The bias parameter every site adds, or None (no bias, or different ones)."""
        found = {s.bias for ss in self.sites.values() for s in ss}
        return found.pop() if len(found) == 1 else None

    @property
    def ops(self) -> list[str]:
        return sorted({s.op for ss in self.sites.values() for s in ss})

    @property
    def in_features(self) -> int:
        if self.layout == "param":  # experts × out × in
            return self.param.shape[2]
        return self.param.shape[1] if self.layout == "out_in" else self.param.shape[0]

    @property
    def out_features(self) -> int:
        if self.layout == "param":
            return self.param.shape[1]
        return self.param.shape[0] if self.layout == "out_in" else self.param.shape[1]


def adapter_path(weight_fqn: str) -> str:
    """Where a weight's adapter lives in the model tree: beside the weight, in the module
    that owns it (``...q_proj.capaboost``; ``...self_attn.capaboost_in_proj_weight``)."""
    owner, _, attr = weight_fqn.rpartition(".")
    child = "capaboost" if attr == "weight" else f"capaboost_{attr}"
    return f"{owner}.{child}" if owner else child


def target_name(fqn: str) -> str:
    """``a.b.weight`` -> ``a.b``; any other parameter keeps its full name."""
    owner, _, attr = fqn.rpartition(".")
    return owner if attr == "weight" and owner else fqn


def _is_transpose(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _TRANSPOSES:
        return False
    if node.target is aten.transpose.int:
        dims = {d % 2 for d in node.args[1:3]} if len(node.args) >= 3 else set()
        return dims == {0, 1}
    if node.target is aten.permute.default:
        return list(node.args[1]) in ([1, 0], [-1, -2], [-1, 0], [1, -2])
    return True


def _weight_of(node: fx.Node, params: dict[str, nn.Parameter]) -> tuple[str, bool] | None:
    """(fqn, transposed) when `node` is a parameter's get_attr, maybe through one transpose."""
    transposed = False
    if isinstance(node, fx.Node) and _is_transpose(node):
        node, transposed = node.args[0], True
    if isinstance(node, fx.Node) and node.op == "get_attr" and node.target.startswith(BASE + "."):
        fqn = node.target[len(BASE) + 1 :]
        if fqn in params:
            return fqn, transposed
    return None


def _site(node: fx.Node, params: dict[str, nn.Parameter]) -> Site | None:
    if node.op != "call_function" or node.target not in _LINEAR_OPS:
        return None
    op = _LINEAR_OPS[node.target]
    if op == "linear":
        x, w = node.args[0], node.args[1]
        layout_plain, layout_t = "out_in", "in_out"
    elif op == "addmm":
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        x, w = node.args[1], node.args[2]
        layout_plain, layout_t = "in_out", "out_in"
    else:
        x, w = node.args[0], node.args[1]
        layout_plain, layout_t = "in_out", "out_in"
    found = _weight_of(w, params)
    if found is None:
        return None
    fqn, transposed = found
    if params[fqn].dim() != 2:
        return None
    b = node.args[2] if op == "linear" and len(node.args) > 2 else (
        node.args[0] if op == "addmm" else None)
    bias = _weight_of(b, params) if isinstance(b, fx.Node) else None
    bias_fqn = bias[0] if bias and not bias[1] and params[bias[0]].dim() == 1 else None
    return Site(node, x, op, fqn, layout_t if transposed else layout_plain, bias_fqn)


def _other_uses(graph: fx.Graph, fqn: str, site_nodes: set[fx.Node]) -> list[str]:
    """Ops other than the matched linear sites that read the weight (tied embeddings...)."""
    other = []
    for node in graph.find_nodes(op="get_attr"):
        if node.target != f"{BASE}.{fqn}":
            continue
        for user in node.users:
            if user in site_nodes:
                continue
            if _is_transpose(user) and all(u in site_nodes for u in user.users):
                continue
            other.append(f"{user.target}" if user.op == "call_function" else user.op)
    return other


def find_candidates(
    graphs: dict[str, fx.Graph], holder: nn.Module
) -> dict[str, Candidate]:
    """Every parameter used as a linear weight in any of `graphs`, by target name."""
    params = dict(holder.named_parameters(remove_duplicate=False))
    canonical = {}  # id(param) -> first fqn seen, so tied aliases share one candidate
    by_id: dict[int, Candidate] = {}
    for mode, graph in graphs.items():
        for node in graph.nodes:
            site = _site(node, params)
            if site is None:
                continue
            param = params[site.fqn]
            fqn = canonical.setdefault(id(param), site.fqn)
            cand = by_id.setdefault(id(param), Candidate(target_name(fqn), fqn, param))
            site.fqn = fqn
            cand.sites[mode].append(site)

    _expert_candidates(graphs, holder, params, by_id)
    aliases = defaultdict(list)
    for fqn, p in params.items():
        aliases[id(p)].append(fqn)
    for pid, cand in by_id.items():
        if cand.layout == "param":
            cand.aliases = [a for a in aliases[pid] if a != cand.fqn]
            continue
        cand.aliases = [target_name(a) for a in aliases[pid]]
        if len({s.layout for ss in cand.sites.values() for s in ss}) > 1:
            cand.reason = "used both as out×in and as in×out weight; cannot fold one delta"
        elif not cand.param.is_floating_point():
            cand.reason = f"weight dtype {cand.param.dtype} is not floating point"
        else:
            for mode, graph in graphs.items():
                site_nodes = {s.node for s in cand.sites.get(mode, [])}
                others = []
                for alias in aliases[pid]:
                    others += _other_uses(graph, alias, site_nodes)
                if others:
                    cand.reason = (
                        f"weight is also read by {sorted(set(others))} (tied or shared with a "
                        "non-linear op): a fold would change that use too; untie it or exclude it"
                    )
                    break
        if cand.reason is None and set(cand.sites) != set(graphs):
            missing = sorted(set(graphs) - set(cand.sites))
            cand.reason = f"its linear op is missing from the {missing} graph(s)"
    return {c.name: c for c in by_id.values()}


def _expert_candidates(graphs: dict[str, fx.Graph], holder: nn.Module,
                       params: dict[str, nn.Parameter], by_id: dict[int, Candidate]) -> None:
    """Stacked weights as targets: a 3-D parameter (experts × out × in, as MoE experts hold
    them) of a module that is not a convolution, read by the graph. Its site is the read
    itself (the ``get_attr``): the rewrite adds ΔW there, ``W + ΔW``, whatever op uses it."""
    for mode, graph in graphs.items():
        for node in graph.find_nodes(op="get_attr"):
            found = _weight_of(node, params)
            if found is None or found[1]:
                continue
            fqn = found[0]
            p = params[fqn]
            owner = holder.get_submodule(fqn.rpartition(".")[0]) if "." in fqn else holder
            if (p.dim() != 3 or p.shape[0] < 2 or not p.is_floating_point() or id(p) in by_id
                    and by_id[id(p)].layout != "param" or "Conv" in type(owner).__name__
                    or "parametrizations" in fqn):
                continue
            cand = by_id.setdefault(id(p), Candidate(target_name(fqn), fqn, p))
            cand.sites[mode].append(Site(node, node, "param", fqn, "param"))


# ----------------------------------------------------------------------------- module outputs


@dataclass
class ModuleCandidate:
    """A module whose output a sequential adapter follows (``Spec(method="sadapter")`` with a
    targets entry that names modules, not linear ops: ``"model.layers.*.mlp"``). Its site is
    the one tensor the module's ops hand to the rest of the graph."""

    name: str
    width: int
    dtype: torch.dtype
    sites: dict[str, list[Site]] = field(default_factory=lambda: defaultdict(list))
    reason: str | None = None
    aliases: list[str] = field(default_factory=list)
    kind = "module"
    fqn = None
    layout = "out_in"
    bias_fqn = None
    ops = ["module output"]

    @property
    def in_features(self) -> int:
        return self.width

    out_features = in_features

    @property
    def adapter_path(self) -> str:
        return f"{self.name}.capaboost"


def in_module(node: fx.Node, module: str) -> bool:
    """Whether `node` was traced inside a call of `module` (an FQN), per ``nn_module_stack``."""
    stack = node.meta.get("nn_module_stack") or {}
    return any(path == module for path, _ in stack.values())


def module_calls(nodes: list[fx.Node], module: str) -> set[str]:
    """The distinct calls of `module` among `nodes`: torch.export keys each call of a module
    apart in ``nn_module_stack`` ("...blk", "...blk@1")."""
    return {key for n in nodes for key, (path, _) in (n.meta.get("nn_module_stack") or {}).items()
            if path == module}


def module_output(graph: fx.Graph, module: str) -> tuple[Site | None, str | None]:
    """The site of `module`'s single tensor output in `graph`, or None and why not."""
    region = [n for n in graph.nodes
              if n.op in ("call_function", "call_module") and in_module(n, module)]
    if not region:
        return None, "it runs no op in this graph (an identity, or dropout in eval)"
    calls = module_calls(region, module)
    if len(calls) > 1:
        return None, (f"it is called {len(calls)} times per forward; a sequential adapter "
                      "follows a module called once")
    members = frozenset(region)
    outs = [n for n in region if isinstance(n.meta.get("val"), torch.Tensor)
            and any(u not in members for u in n.users)]
    if len(outs) != 1:
        return None, (f"its calls hand {len(outs)} tensors to the rest of the model; a "
                      "sequential adapter follows a module called once that returns one tensor")
    y = outs[0]
    val = y.meta["val"]
    if not val.is_floating_point() or val.dim() == 0 or not isinstance(val.shape[-1], int):
        return None, (f"its output ({val.dtype}, shape {tuple(val.shape)}) has no fixed "
                      "floating-point feature dimension")
    return Site(y, y, "module", "", "out_in", None, members), None


def module_candidates(graphs: dict[str, fx.Graph], names: list[str]) -> dict[str, ModuleCandidate]:
    """A `ModuleCandidate` per module name, with its site in each graph (or the reason)."""
    out = {}
    for name in names:
        cand = None
        for mode, graph in graphs.items():
            site, why = module_output(graph, name)
            if cand is None:
                val = site.node.meta["val"] if site else None
                cand = ModuleCandidate(name, int(val.shape[-1]) if site else 1,
                                       val.dtype if site else torch.float32)
            if site is None:
                cand.reason = cand.reason or f"{why} ({mode} mode)"
            else:
                cand.sites[mode].append(site)
        out[name] = cand
    return out


def module_targets(spec: Spec, candidates: dict[str, Candidate], module_names: list[str]) -> list[str]:
    """The modules `spec` names for sequential adapters after their output: for
    ``method="sadapter"``, each targets entry that names no linear op names modules instead."""
    if spec.method != "sadapter":
        return []
    ops = [n for c in candidates.values() for n in _names(c)]
    found = []
    for p in spec.targets:
        if not any(pattern_matches(p, n) for n in ops):
            found += [m for m in module_names if m and pattern_matches(p, m)]
    return list(dict.fromkeys(found))


def sites_for(graph: fx.Graph, mode: str, holder: nn.Module,
              wanted: dict[str, str | None]) -> tuple[dict[str, Any], dict[str, str]]:
    """The candidates in `graph` of targets already chosen: `wanted` maps a target name to its
    module (sequential after a module's output) or None (a linear op). Returns (found, {name:
    why missing})."""
    ops = find_candidates({mode: graph}, holder)
    mods = module_candidates({mode: graph}, [m for m in wanted.values() if m])
    found, missing = {}, {}
    for name, module in wanted.items():
        cand = mods.get(module) if module else ops.get(name)
        if cand is None or not cand.sites.get(mode):
            missing[name] = (cand.reason if cand is not None and cand.reason else
                             "no linear op uses its weight in this graph")
        else:
            found[name] = cand
    return found, missing


@dataclass(frozen=True)
class Rejection:
    """Why a candidate was not adapted. ``kind``: ``"not_matched"`` (no targets entry names
    it), ``"excluded"`` (an exclude entry does), ``"unsupported"`` (the weight cannot be
    adapted: tied with a non-linear use, integer, mixed layouts, missing from a mode's graph),
    ``"settings"`` (the resolved rank or mask does not fit its shape)."""

    kind: str
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass
class Selection:
    """The outcome of matching a spec against the candidates."""

    targets: dict[str, Candidate]
    skipped: dict[str, Rejection]  # name -> why
    unmatched: list[str]  # spec.targets entries that matched no candidate


def _names(c: Candidate) -> list[str]:
    return list(dict.fromkeys([c.name, *c.aliases]))


def select(candidates: dict[str, Candidate], spec: Spec) -> Selection:
    """Apply ``targets`` / ``exclude`` to the candidates; nothing is raised here."""
    targets, skipped = {}, {}
    for name, c in candidates.items():
        names = _names(c)
        hit = [p for p in spec.targets if any(pattern_matches(p, n) for n in names)]
        excl = [p for p in spec.exclude if any(pattern_matches(p, n) for n in names)]
        if not hit:
            skipped[name] = Rejection("not_matched", "not matched by targets" + (
                f" (and could not be: {c.reason})" if c.reason else ""))
        elif excl:
            skipped[name] = Rejection("excluded", f"excluded by {excl[0]!r}")
        elif c.reason:
            skipped[name] = Rejection("unsupported", c.reason)
        elif (why := _settings_problem(spec.for_target(name), c)) is not None:
            skipped[name] = Rejection("settings", why)
        else:
            targets[name] = c
    unmatched = [p for p in spec.targets
                 if not any(pattern_matches(p, n) for c in candidates.values() for n in _names(c))]
    return Selection(targets, skipped, unmatched)


def _settings_problem(spec: Spec, c: Candidate) -> str | None:
    if spec.rank > min(c.in_features, c.out_features):
        return f"rank {spec.rank} exceeds min(in, out) = {min(c.in_features, c.out_features)}"
    nm = NM_PATTERN.match(spec.mask)
    if nm and (c.in_features % int(nm.group(2)) or spec.rank % int(nm.group(2))):
        return (f"mask {spec.mask!r} groups entries along each factor's input dimension: "
                f"in_features ({c.in_features}) and rank ({spec.rank}) must both be divisible "
                f"by {nm.group(2)}")
    return None


def check(selection: Selection, candidates: dict[str, Candidate], spec: Spec,
          modules: list[str] = ()) -> None:
    """Raise when the spec asks for something that cannot be done, saying what to change.
    `modules`: the model's module names, offered as close names to a ``sadapter`` spec."""
    all_names = [n for c in candidates.values() for n in _names(c)]
    if spec.method == "sadapter":
        all_names += [m for m in modules if m and m not in all_names]
    if not candidates:
        raise TargetNotFoundError(
            "the captured graph has no linear op whose weight is a parameter of the model "
            "(nn.Linear, F.linear, Conv1D/addmm, x @ W), so nothing can be adapted. If the "
            "model computes its weights at run time, CapaBoost cannot target them."
        )
    if selection.unmatched:
        p = selection.unmatched[0]
        bare = not any(ch in p for ch in "*?[.") and not p.startswith("re:")
        if bare and any(n.endswith("." + p) for n in all_names):  # PEFT's target_modules style
            raise TargetNotFoundError(
                f"Spec.targets entry {p!r} matched no linear op: targets are full names or "
                f"patterns, not PEFT's module suffixes. Did you mean '*.{p}'? (e.g. "
                f"{next(n for n in all_names if n.endswith('.' + p))!r})")
        raise TargetNotFoundError(
            f"Spec.targets entry {p!r} matched no linear op. Closest target names: "
            f"{close_names(p, all_names)}. Targets are named by the module owning the weight "
            "(e.g. 'bert.encoder.layer.0.attention.self.query'); use globs ('*.query') or "
            "'re:<regex>'; capaboost_fx.inspect(model, spec, ...) lists every candidate."
            + ((" It names a module: to put a sequential adapter after a module's output, "
                "use method='sadapter'." if any(pattern_matches(p, m) for m in modules) else "")
               if spec.method != "sadapter" else
               " With method='sadapter' an entry naming no linear op names modules instead "
               "(e.g. 'model.layers.*.mlp'); this one names none.")
        )
    for p in spec.targets:  # a pattern whose every hit was rejected for a reason
        hits = [n for n, c in candidates.items() if any(pattern_matches(p, a) for a in _names(c))]
        if hits and not any(h in selection.targets for h in hits):
            reasons = {h: selection.skipped[h].message for h in hits[:3]}
            kind = TargetNotFoundError if all(
                selection.skipped[h].kind == "excluded" for h in hits) else TargetError
            what = ("module(s)" if all(candidates[h].kind == "module" for h in hits)
                    else "linear op(s)")
            raise kind(
                f"Spec.targets entry {p!r} matched {len(hits)} {what} but none can be "
                f"adapted: {reasons}. Change targets/exclude (or rank) so that it keeps one."
            )
    exact = [p for p in spec.targets
             if not any(ch in p for ch in "*?[") and not p.startswith("re:")]
    for p in exact:
        why = selection.skipped.get(p)
        if why is not None and p in candidates and why.kind not in ("excluded", "not_matched"):
            raise TargetError(f"target {p!r} cannot be adapted: {why.message}.")
    if not selection.targets:
        raise TargetNotFoundError(
            f"no target left: targets={spec.targets} matched {len(candidates)} candidates, "
            f"exclude={spec.exclude} removed them all. Narrow exclude."
        )
    spec.check_patterns(all_names, list(selection.targets),
                        {n: r.message for n, r in selection.skipped.items()})
