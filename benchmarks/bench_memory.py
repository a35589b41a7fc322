"""Benchmark 2: peak memory of one training step (forward + backward + AdamW step), CPU.

How it is measured. On CPU torch has no allocator statistics (``torch.cuda.max_memory_allocated``
has no CPU twin), and the process's peak RSS mixes in the allocator's caching, Python and the
capture's own transient use. So the step runs under ``torch.profiler.profile(profile_memory=True)``,
which records every allocation and free made by torch's CPU allocator with its size and time;
the running sum of those events over the step gives its exact peak of extra bytes (activations
kept for backward, gradients, temporaries, AdamW's scratch). To that we add the resident state at
the start of the step (every parameter, buffer and AdamW state tensor, each storage counted
once; gradients are None, `zero_grad(set_to_none=True)`), measured by walking the tensors.

    peak = resident state + max over the step of (bytes allocated - bytes freed)

AdamW's state is created by a warm-up step first, so every measured step is a steady-state step.
Configurations are measured alternately, several rounds (the numbers are deterministic up to
a few kB; the rounds show it).
"""

from __future__ import annotations

import gc
from typing import Any

import common
import torch

RATIOS = [
    ("capaboost_d2", "peft_r8", "<= 1.10"),
    ("capaboost_d4", "peft_r8", "<= 1.10"),
    ("loop_d4", "peft_r8", None),
    ("peft_r16", "peft_r8", None),
    ("peft_r32", "peft_r8", None),
    ("base_captured", "base_eager", None),
    ("capaboost_d2", "eager_capaboost_d2", None),
]


def resident_bytes(cfg: common.TrainConfig, opt: torch.optim.Optimizer) -> int:
    """Bytes of distinct storages held by the module's parameters and buffers, their grads,
    and the optimizer state."""
    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())

    for p in cfg.module.parameters():
        add(p)
        add(p.grad)
    for b in cfg.module.buffers():
        add(b)
    for state in opt.state.values():
        for v in state.values():
            add(v)
    return sum(seen.values())


def step_peak(cfg: common.TrainConfig, opt: torch.optim.Optimizer,
              batch: dict[str, torch.Tensor]) -> dict[str, int]:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    resident = resident_bytes(cfg, opt)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        common.train_step(cfg, opt, batch)
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    events.sort()
    cur = peak = 0
    for _, size in events:
        cur += size
        peak = max(peak, cur)
    return {"resident": resident, "step_peak_extra": peak, "step_net": cur,
            "peak": resident + peak, "events": len(events)}


def run(st: common.Settings, ctx: common.Context, log=print) -> dict[str, Any]:
    cfgs = ctx.configs()
    batch = ctx.batch
    opts = {n: c.optimizer() for n, c in cfgs.items()}
    for n, c in cfgs.items():
        common.train_step(c, opts[n], batch)  # AdamW state exists from here on
    detail: dict[str, list[dict[str, int]]] = {n: [] for n in cfgs}

    def measure(n: str):
        def fn() -> float:
            r = step_peak(cfgs[n], opts[n], batch)
            detail[n].append(r)
            return float(r["peak"])
        return fn

    rounds = 1 if st.quick else 2
    samples = common.alternate({n: measure(n) for n in cfgs}, rounds)
    extra = {n: [float(r["step_peak_extra"]) for r in rs] for n, rs in detail.items()}
    mib = 2.0 ** 20
    return {
        "method": "torch.profiler(profile_memory=True): running sum of the CPU allocator's "
                  "alloc/free events over one steady-state training step, plus the bytes of "
                  "parameters, buffers and AdamW state resident at the start of the step",
        "rounds": rounds,
        "peak_MiB": {n: common.summary([v / mib for v in s]) for n, s in samples.items()},
        "step_extra_MiB": {n: common.summary([v / mib for v in s]) for n, s in extra.items()},
        "resident_MiB": {n: detail[n][0]["resident"] / mib for n in cfgs},
        "ratios": [common.ratio(samples, a, b, t) for a, b, t in RATIOS],
        "ratios_step_extra": [common.ratio(extra, a, b) for a, b, _ in RATIOS],
    }


def report(res: dict[str, Any]) -> str:
    rows = [[n, res["peak_MiB"][n]["median"], res["resident_MiB"][n],
             res["step_extra_MiB"][n]["median"]] for n in res["peak_MiB"]]
    return "\n".join([
        "### Peak memory of a training step (MiB)", f"method: {res['method']}",
        common.table(["config", "peak", "resident state", "step extra (activations, grads, temps)"],
              rows), "",
        "### Peak memory ratios (whole step peak)",
        common.table(common.RATIO_HEADERS, [common.ratio_row(f"{r['a']} / {r['b']}", r) for r in res["ratios"]]),
        "", "### Ratios of the step's extra bytes only (without weights)",
        common.table(common.RATIO_HEADERS, [common.ratio_row(f"{r['a']} / {r['b']}", r)
                              for r in res["ratios_step_extra"]]),
    ])
