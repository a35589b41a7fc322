"""Split: cut a flat captured graph into one subgraph per *block* (a transformer layer).

Per-block FSDP2 (``fully_shard(block)``) and per-block activation checkpointing both need each
block's forward to be a call of its own module: FSDP2 gathers a block's weights in that
module's pre-forward hook, and checkpointing recomputes that call. ``torch.export`` flattens
the model into one graph; this pass restores the block level from ``nn_module_stack``:

    root graph:   ... h = call_module(wrapped.model.layers.0)(key, h, cos, sin, mask) ...
    block graph:  placeholders (key, h, cos, sin, mask) -> the block's ops -> output

The block graph reads its own weights relative to the block (``self_attn.q_proj.weight``), so
whatever FSDP2 puts there is what the graph sees. A block whose ops are not one contiguous run
(a module called twice, shared across blocks) is left in the root graph, with the reason.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

from torch import fx

from .capture import BASE
from .match import in_module, module_calls


@dataclass
class SplitResult:
    root: fx.Graph
    blocks: dict[str, fx.Graph] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # block -> why it was not split


_in_block = in_module


def _attr_prefix(block: str) -> str:
    return f"{BASE}.{block}."


def _region(graph: fx.Graph, block: str) -> tuple[list[fx.Node], str | None]:
    nodes = list(graph.nodes)
    idx = [i for i, n in enumerate(nodes) if n.op not in ("placeholder", "get_attr", "output")
           and _in_block(n, block)]
    if not idx:
        return [], "the block runs no op in this graph"
    calls = module_calls([nodes[i] for i in idx], block)
    if len(calls) > 1:
        return [], (f"it is called {len(calls)} times per forward; a block is a module called "
                    "once (FSDP2 gathers its weights around one call)")
    run = nodes[idx[0]: idx[-1] + 1]
    outside = [n for n in run if n.op not in ("get_attr",) and not _in_block(n, block)]
    if outside:
        return [], (f"its ops are interleaved with others ({outside[0].name}); a module called "
                    "more than once or shared with another block cannot be a block")
    prefix = _attr_prefix(block)
    attrs = [n for n in nodes if n.op == "get_attr" and n.target.startswith(prefix)
             and n.users and all(u in run for u in n.users)]
    modules = [n for n in run if n.op == "call_module" and not n.target.startswith(prefix)]
    if modules:
        return [], f"it calls {modules[0].target!r}, which lives outside the block"
    return attrs + [n for n in run if n.op != "get_attr" or n in attrs], None


def split_blocks(graph: fx.Graph, blocks: list[str], key: int) -> SplitResult:
    """Move each block's ops into a graph of its own, called from `graph` (changed in place).
    The call passes `key` first, so one block module can hold graphs for several captures."""
    result = SplitResult(graph)
    for block in blocks:
        region, why = _region(graph, block)
        if why:
            result.refused[block] = why
            continue
        members = set(region)
        inputs: list[fx.Node] = []
        for n in region:
            for a in n.all_input_nodes:
                if a not in members and a not in inputs:
                    inputs.append(a)
        outputs = [n for n in region if any(u not in members for u in n.users)]

        sub = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        sub.placeholder("capture_key")
        for a in inputs:
            env[a] = sub.placeholder(a.name)
            env[a].meta = dict(a.meta)
        prefix = _attr_prefix(block)
        for n in region:
            new = sub.node_copy(n, env.__getitem__)
            if new.op in ("get_attr", "call_module"):
                new.target = new.target[len(prefix):]
            env[n] = new
        sub.output(tuple(env[o] for o in outputs))
        sub.lint()

        first = next(n for n in region if n.op != "get_attr")
        with graph.inserting_before(first):
            call = graph.call_module(f"{BASE}.{block}", (key, *inputs))
            call.meta["capaboost_block"] = block
            outs = [graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
        for o, new in zip(outputs, outs, strict=True):
            new.meta = dict(o.meta)
            o.replace_all_uses_with(new, delete_user_cb=lambda u, m=members: u not in m)
        for n in reversed(region):
            graph.erase_node(n)
        result.blocks[block] = sub
    graph.lint()
    return result
