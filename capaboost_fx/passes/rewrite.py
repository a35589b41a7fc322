"""Rewrite: each matched linear op gets the CapaBoost update added to its output.

    y = op(x, W0, b)                      (untouched: linear / addmm / mm / matmul)
    y' = y + s · B_cat (A_cat drop(x))    (call_module to the target's CapaBoostAdapter)

where ``B_cat A_cat = Σ_i (B ⊙ M^B_i)(A ⊙ M^A_i)``. Every use of a weight gets the same adapter
(one weight, one adapter). Inserted nodes are tagged in ``node.meta["capaboost"]`` so the fold
pass can find and remove exactly them.
"""

from __future__ import annotations

import torch
from torch import fx

from .capture import BASE
from .match import Candidate, module_output

META = "capaboost"


def adapter_key(name: str) -> str:
    """ModuleDict key of a target (keys may not contain dots)."""
    return name.replace(".", "/")


def rewrite(graph: fx.Graph, targets: dict[str, Candidate], mode: str,
            sequential: frozenset[str] = frozenset()) -> list[str]:
    """Insert the adapter update after every site of `targets` in `graph`; returns, per site
    rewritten, the target name (so callers can assert how many places changed). Targets in
    `sequential` read the op's output y (``y + adapter(y)``), the others its input x."""
    changed = []
    # Module outputs last, innermost first: an adapter inside a module (an op's, or a nested
    # module's) becomes part of what that module hands on, so it is found again here.
    order = sorted(targets.items(), key=lambda kv: (
        kv[1].kind == "module", -kv[1].name.count(".") if kv[1].kind == "module" else 0))
    for name, cand in order:
        sites = cand.sites.get(mode, [])
        if cand.kind == "module" and sites:
            site, why = module_output(graph, cand.name)
            if site is None:
                raise AssertionError(f"module output of {name!r} lost by an earlier rewrite: {why}")
            sites = [site]
        for site in sites:
            y = site.node
            source = y if name in sequential else site.x
            with graph.inserting_after(y):
                # y rides along for its dtype: under torch.autocast the op's output may be
                # bf16 while x is float32, and the sum must keep y's dtype (as PEFT's does).
                delta = graph.call_module(f"{BASE}.{cand.adapter_path}", (source, y))
            with graph.inserting_after(delta):
                out = graph.call_function(torch.ops.aten.add.Tensor, (y, delta))
            y.replace_all_uses_with(out, delete_user_cb=lambda user, out=out, delta=delta,
                                    inner=site.region: user not in (out, delta, *inner))
            for n in (delta, out):  # y's place and shape: the update has y's shape
                n.meta["nn_module_stack"] = dict(y.meta.get("nn_module_stack") or {})
                if "val" in y.meta:
                    n.meta["val"] = y.meta["val"]
            delta.meta[META] = {"target": name, "role": "delta"}
            out.meta[META] = {"target": name, "role": "add"}
            changed.append(name)
    graph.lint()
    return changed


DENSE = "capaboost_dense"  # ModuleDict of folded nonlinear adapters on the deploy module


def unrewrite(graph: fx.Graph, keep: frozenset[str] = frozenset()) -> list[str]:
    """Remove every node `rewrite` inserted (used by the fold); returns the targets removed.
    Targets in `keep` (nonlinear parallel adapters) stay, retargeted to ``capaboost_dense``."""
    removed = []
    for node in list(graph.nodes):
        tag = node.meta.get(META)
        if tag and tag["role"] == "delta" and tag["target"] in keep:
            node.target = f"{DENSE}.{adapter_key(tag['target'])}"
        elif tag and tag["role"] == "add" and tag["target"] not in keep:
            y, delta = node.args[:2]
            node.replace_all_uses_with(y)
            graph.erase_node(node)
            graph.erase_node(delta)
            removed.append(tag["target"])
    graph.lint()
    return removed
