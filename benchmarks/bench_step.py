"""Benchmark 1: training-step time (forward + backward + AdamW step).

Configurations (one set of base weights, batch x seq tokens, float32, CPU, 2 threads):
PEFT LoRA r=8/16/32, CapaBoost d=2/4 through `cbx.transform`, the loop formulation at d=4
(the official code's d masked copies one after another), the CapaBoost d=2 adapters installed
eagerly, and the base model eager vs captured (no rewrite). Each round runs one step of every
configuration, in a rotating order; every ratio is the median of per-round ratios.

A torch.profiler pass over the pairs behind each target then says where the time goes.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from common import (
    RATIO_HEADERS,
    Contention,
    Context,
    LoopMaskedLoRA,
    Settings,
    TrainConfig,
    alternate,
    ratio,
    ratio_row,
    summary,
    table,
    train_step,
)
from torch import nn

# (a, b, target): the four targets of the brief first.
RATIOS = [
    ("capaboost_d2", "peft_r8", "<= 1.05"),
    ("capaboost_d4", "peft_r8", "<= 1.10"),
    ("loop_d4", "capaboost_d4", ">= 1.3"),
    ("base_captured", "base_eager", "<= 1.05"),
    ("capaboost_d2", "eager_capaboost_d2", "<= 1.05"),
    ("capaboost_d2", "peft_r16", None),
    ("capaboost_d4", "peft_r32", None),
    ("peft_r32", "peft_r8", None),
    ("base_eager", "peft_r8", None),
]

# Pairs profiled op by op, and what each explains.
PROFILE_PAIRS = [
    ("capaboost_d2", "peft_r8"),
    ("capaboost_d4", "peft_r8"),
    ("loop_d4", "capaboost_d4"),
    ("base_captured", "base_eager"),
]


class _Stepper:
    """One configuration's optimizer and timer; remembers the forward/backward/step split."""

    def __init__(self, cfg: TrainConfig, batch: dict[str, torch.Tensor]) -> None:
        self.cfg, self.batch = cfg, batch
        self.opt = cfg.optimizer()
        self.split: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}

    def __call__(self) -> float:
        import torch.nn.functional as F

        t0 = time.perf_counter()
        loss = F.cross_entropy(self.cfg.logits(self.batch), self.batch["labels"])
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        self.split["forward"].append(t1 - t0)
        self.split["backward"].append(t2 - t1)
        self.split["optimizer"].append(t3 - t2)
        return t3 - t0


def profile_step(cfg: TrainConfig, batch: dict[str, torch.Tensor], steps: int) -> dict[str, Any]:
    """Self CPU time per ATen op (ms per step) over `steps` profiled training steps."""
    from torch.profiler import ProfilerActivity, profile

    opt = cfg.optimizer()
    train_step(cfg, opt, batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            train_step(cfg, opt, batch)
    ops: dict[str, dict[str, float]] = {}
    for e in prof.key_averages():
        if e.key.startswith(("aten::", "Optimizer", "autograd::")) or "Backward" in e.key:
            ops[e.key] = {"self_ms": e.self_cpu_time_total / 1000 / steps,
                          "calls": e.count / steps}
    total = sum(v["self_ms"] for k, v in ops.items() if k.startswith("aten::"))
    return {"aten_self_ms_per_step": total, "ops": ops}


def diff_ops(a: dict, b: dict, top: int = 8) -> list[dict[str, Any]]:
    """The ATen ops whose self time (ms/step) differs most between two profiles."""
    keys = {k for k in a["ops"] if k.startswith("aten::")} | {
        k for k in b["ops"] if k.startswith("aten::")}
    rows = []
    for k in keys:
        ea, eb = a["ops"].get(k, {}), b["ops"].get(k, {})
        rows.append({"op": k, "a_ms": round(ea.get("self_ms", 0.0), 2),
                     "b_ms": round(eb.get("self_ms", 0.0), 2),
                     "diff_ms": round(ea.get("self_ms", 0.0) - eb.get("self_ms", 0.0), 2),
                     "a_calls": ea.get("calls", 0), "b_calls": eb.get("calls", 0)})
    rows.sort(key=lambda r: -abs(r["diff_ms"]))
    return rows[:top]


# --------------------------------------------------------------------------- one-layer bench


class _CatAdapter(nn.Module):
    """CapaBoost's own formulation for one layer (the library's CapaBoostAdapter)."""

    def __init__(self, base: nn.Linear, d: int) -> None:
        import capaboost_fx as cbx

        super().__init__()
        self.base = base
        name = f"layer_d{d}"
        self.adapter = cbx.CapaBoostAdapter(
            cbx.AdapterSite(base.in_features, base.out_features, name=name),
            cbx.Spec(targets=[name], rank=8, num_masks=d, density=0.5, alpha=16.0))
        with torch.no_grad():
            self.adapter.B.normal_(0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.adapter(x)


class _LoRA(nn.Module):
    """A plain LoRA layer, as PEFT computes it (dropout off)."""

    def __init__(self, base: nn.Linear, r: int) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        self.scaling = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling


def layer_bench(st: Settings) -> dict[str, Any]:
    """Forward + backward of ONE adapted query projection (hidden x hidden, base frozen) on a
    batch x seq x hidden activation: the adapter's share, without the rest of the network."""
    h = st.size.hidden
    torch.manual_seed(0)
    base = nn.Linear(h, h)
    base.requires_grad_(False)
    cat = {d: _CatAdapter(base, d) for d in (2, 4)}
    mods: dict[str, nn.Module] = {
        "frozen_linear": base,
        "lora_r8": _LoRA(base, 8),
        "capaboost_d2": cat[2],
        "capaboost_d4": cat[4],
        "loop_d2": LoopMaskedLoRA(base, cat[2].adapter.A, cat[2].adapter.B, cat[2].adapter.mask_A,
                                  cat[2].adapter.mask_B, cat[2].adapter.scaling),
        "loop_d4": LoopMaskedLoRA(base, cat[4].adapter.A, cat[4].adapter.B, cat[4].adapter.mask_A,
                                  cat[4].adapter.mask_B, cat[4].adapter.scaling),
    }
    x = torch.randn(st.batch, st.seq, h, requires_grad=True)
    with torch.no_grad():
        check = float((mods["loop_d4"](x) - cat[4](x)).abs().max())
    iters = 3 if st.quick else 5

    def bench(m: nn.Module):
        def fn() -> float:
            t0 = time.perf_counter()
            for _ in range(iters):
                m(x).sum().backward()
                for p in [x, *m.parameters()]:
                    p.grad = None
            return (time.perf_counter() - t0) / iters
        return fn

    fns = {k: bench(m) for k, m in mods.items()}
    for f in fns.values():
        f()
    samples = alternate(fns, st.layer_rounds)
    return {
        "what": f"forward+backward of one {h}x{h} nn.Linear (frozen) + adapter on a "
                f"{st.batch}x{st.seq}x{h} input that requires grad, {iters} iterations per "
                "measurement",
        "loop_d4_vs_capaboost_d4_max_abs_diff": check,
        "seconds": {k: summary(v) for k, v in samples.items()},
        "ratios": [ratio(samples, "loop_d4", "capaboost_d4"),
                   ratio(samples, "loop_d2", "capaboost_d2"),
                   ratio(samples, "capaboost_d2", "lora_r8"),
                   ratio(samples, "capaboost_d4", "lora_r8"),
                   ratio(samples, "lora_r8", "frozen_linear")],
    }


# --------------------------------------------------------------------------- main


def run(st: Settings, ctx: Context, log=print) -> dict[str, Any]:
    cfgs = ctx.configs()
    batch = ctx.batch
    steppers = {n: _Stepper(c, batch) for n, c in cfgs.items()}
    for s in steppers.values():  # warm-up: allocator, AdamW state, first-call paths
        s()
        s()
    for s in steppers.values():
        for v in s.split.values():
            v.clear()
    t0 = time.perf_counter()
    load = [Contention()]
    others: list[float | None] = []

    def on_round(r: int) -> None:
        c = load[0].stop()
        others.append(c.get("others_cpu_share"))
        load[0] = Contention()
        log(f"  step round {r + 1}/{st.step_rounds} ({c['wall_seconds']} s, CPU share taken "
            f"by other processes {others[-1]})")

    samples = alternate(steppers, st.step_rounds, on_round=on_round)
    seconds = time.perf_counter() - t0
    ratios = [ratio(samples, a, b, t) for a, b, t in RATIOS]

    log("  profiling ...")
    steps = 1 if st.quick else 2
    profiled = {n: profile_step(cfgs[n], batch, steps)
                for n in dict.fromkeys(x for pair in PROFILE_PAIRS for x in pair)}
    profile = {
        f"{a} vs {b}": {
            "aten_self_ms_per_step": {a: round(profiled[a]["aten_self_ms_per_step"], 1),
                                      b: round(profiled[b]["aten_self_ms_per_step"], 1)},
            "largest_differences": diff_ops(profiled[a], profiled[b]),
        }
        for a, b in PROFILE_PAIRS
    }
    log("  one-layer bench ...")
    layer = layer_bench(st)
    return {
        "configs": {n: {"label": c.label, "trainable_params": c.trainable, "notes": c.notes}
                    for n, c in cfgs.items()},
        "setup": ctx.setup,
        "rounds": st.step_rounds,
        "others_cpu_share_per_round": others,
        "measure_seconds": round(seconds, 1),
        "step_seconds": {n: summary(v) for n, v in samples.items()},
        "split_seconds_median": {
            n: {k: round(summary(v)["median"], 4) for k, v in s.split.items()}
            for n, s in steppers.items()
        },
        "ratios": ratios,
        "profile": profile,
        "layer": layer,
    }


def report(res: dict[str, Any]) -> str:
    rows = [[n, c["label"], c["trainable_params"], res["step_seconds"][n]["median"],
             f"{res['step_seconds'][n]['q1']:.3f}–{res['step_seconds'][n]['q3']:.3f}",
             res["split_seconds_median"][n]["forward"], res["split_seconds_median"][n]["backward"],
             res["split_seconds_median"][n]["optimizer"]]
            for n, c in res["configs"].items()]
    out = ["### Training step time (s)", table(
        ["config", "what", "trainable", "median s", "IQR", "fwd", "bwd", "opt"], rows), "",
        "### Training step ratios (per-round, side by side)",
        table(RATIO_HEADERS, [ratio_row(f"{r['a']} / {r['b']}", r) for r in res["ratios"]])]
    lay = res["layer"]
    out += ["", f"### One adapted layer ({lay['what']})",
            table(RATIO_HEADERS, [ratio_row(f"{r['a']} / {r['b']}", r) for r in lay["ratios"]])]
    out += ["", "### Profile: largest self-time differences (ms/step)"]
    for pair, p in res["profile"].items():
        out.append(f"{pair}: ATen self total {p['aten_self_ms_per_step']}")
        out.append(table(["op", "a ms", "b ms", "diff", "a calls", "b calls"],
                         [[d["op"], d["a_ms"], d["b_ms"], d["diff_ms"], d["a_calls"],
                           d["b_calls"]] for d in p["largest_differences"][:5]]))
    return "\n".join(out)
