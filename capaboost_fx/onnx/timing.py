"""Latency, measured side by side: `measure_latency` times several sessions or callables in
interleaved rounds (`round_order`) and reports `LatencyStats` (median, quartiles from
``statistics.quantiles``); `compare_latency` says whether two of them differ beyond the spread
of the rounds or by noise; `conditions` records what a time was measured under (CPU, cores,
threads, load average at start and end, versions). One timing rule for compare_onnx, the demo
and the benchmarks."""

from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from capaboost_fx.errors import InputError
from capaboost_fx.onnx.runtime import Session, _to_numpy


@dataclass
class LatencyStats:
    """onnxruntime latency of one model, in milliseconds per call (one sample per round)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    providers: list[str]
    p25_ms: float = 0.0
    p75_ms: float = 0.0
    samples_ms: list[float] = field(default_factory=list, repr=False)  # in round order

    @classmethod
    def of(cls, seconds: Sequence[float], providers: Sequence[str] = ()) -> LatencyStats:
        """Summarise per-round times in seconds (kept in round order in `samples_ms`).

        Example::

            >>> LatencyStats.of([0.001, 0.002, 0.003]).median_ms
            2.0
        """
        if not seconds:
            raise InputError("no latency samples to summarise")
        samples = [s * 1e3 for s in seconds]
        ms = sorted(samples)
        if len(ms) > 1:
            deciles = statistics.quantiles(ms, n=10, method="inclusive")
            quartiles = statistics.quantiles(ms, n=4, method="inclusive")
        else:
            deciles, quartiles = [ms[0]] * 9, [ms[0]] * 3
        return cls(
            median_ms=statistics.median(ms),
            p10_ms=deciles[0],
            p90_ms=deciles[-1],
            mean_ms=statistics.fmean(ms),
            min_ms=ms[0],
            runs=len(ms),
            providers=list(providers),
            p25_ms=quartiles[0],
            p75_ms=quartiles[-1],
            samples_ms=samples,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Runner = Any  # a Session, an onnxruntime.InferenceSession, or a callable taking no arguments


def _runner(target: Runner, feeds: Mapping[str, Any] | None, name: str) -> tuple[Callable, list]:
    if isinstance(target, Session):
        if feeds is None:
            raise InputError(f"measure_latency: {name!r} is a session; pass its feeds")
        inner, arrays = target.inner, {n: _to_numpy(feeds[n], n) for n in target.input_names}
        return (lambda: inner.run(None, arrays)), list(target.providers)
    if hasattr(target, "run") and hasattr(target, "get_inputs"):  # an InferenceSession
        if feeds is None:
            raise InputError(f"measure_latency: {name!r} is a session; pass its feeds")
        names = [i.name for i in target.get_inputs()]
        arrays = {n: _to_numpy(feeds[n], n) for n in names}
        return (lambda: target.run(None, arrays)), list(target.get_providers())
    if callable(target):
        return target, []
    raise InputError(
        f"measure_latency: {name!r} is a {type(target).__name__}; pass a Session, an "
        "onnxruntime.InferenceSession or a callable"
    )


def round_order(names: list[str], r: int) -> list[str]:
    """The order of round `r` when timing several things side by side: rotated by one each
    round and reversed every other cycle, so each takes every position and no one always
    follows the same neighbour."""
    k = r % len(names)
    order = names[k:] + names[:k]
    return order[::-1] if (r // len(names)) % 2 else order


def measure_latency(
    targets: Runner | Mapping[str, Runner],
    feeds: Mapping[str, Any] | None = None,
    *,
    runs: int = 30,
    warmup: int = 3,
    calls_per_run: int = 1,
    on_round: Callable[[int], None] | None = None,
) -> LatencyStats | dict[str, LatencyStats]:
    """Time one or several models in onnxruntime, side by side; the median is the figure to quote.

    `targets`: a `Session` (from `open_session`), an ``onnxruntime.InferenceSession`` or a
    callable (e.g. a run with IO binding), or a dict ``{name: target}`` to compare several.
    `feeds`: the inputs by input name (numpy or torch), shared by all targets, or
    ``{target name: feeds}`` when the targets take different inputs. Feeds are converted to
    numpy once, before timing.

    Every target first runs `warmup` times (a new shape allocates and plans); then `runs`
    rounds, each running every target `calls_per_run` times (the round's sample is the median
    of those), the order rotated each round (and reversed every other cycle) so that no target
    always runs first or after the same neighbour. Returns `LatencyStats` (one target) or
    ``{name: LatencyStats}``; `samples_ms` keeps the rounds in order, so ratios can be taken
    per round.

    Example::

        sess = open_session("model.onnx", providers="cpu", intra_op_num_threads=2)
        measure_latency(sess, {"input_ids": ids}, runs=20).median_ms
        both = measure_latency({"base": a, "folded": b}, {"input_ids": ids})
        both["folded"].median_ms / both["base"].median_ms
    """
    if runs < 1 or warmup < 0 or calls_per_run < 1:
        raise InputError(
            f"runs={runs}, warmup={warmup}, calls_per_run={calls_per_run}; need runs >= 1, "
            "warmup >= 0, calls_per_run >= 1"
        )
    single = not isinstance(targets, Mapping)
    named: dict[str, Runner] = {"model": targets} if single else dict(targets)
    if not named:
        raise InputError("measure_latency: no targets")
    per_target = (
        feeds is not None
        and not single
        and set(feeds) == set(named)
        and all(isinstance(v, Mapping) for v in feeds.values())
    )
    runners, providers = {}, {}
    for name, target in named.items():
        runners[name], providers[name] = _runner(
            target, feeds[name] if per_target else feeds, name
        )
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()  # a collection inside one timed call would land on one target only
    try:
        for r in range(runs):
            for n in round_order(names, r):
                fn, calls = runners[n], []
                for _ in range(calls_per_run):
                    t0 = time.perf_counter()
                    fn()
                    calls.append(time.perf_counter() - t0)
                times[n].append(statistics.median(calls))
            if on_round is not None:
                on_round(r)
    finally:
        if gc_was_enabled:
            gc.enable()
    stats = {n: LatencyStats.of(times[n], providers[n]) for n in names}
    return stats["model"] if single else stats


@dataclass
class LatencyComparison:
    """Two latencies measured side by side, and whether their difference is beyond the noise.

    `difference`: ``other.median / base.median - 1``. `spread`: half the p10-p90 range of the
    per-round ratios ``other / base`` (rounds are interleaved, so a ratio compares two calls
    made moments apart); without per-round samples, the larger relative p10-p90 half-range of
    the two. `noise`: ``abs(difference) <= spread``.
    """

    difference: float
    spread: float
    rounds: int
    noise: bool
    per_round: bool  # the spread comes from per-round ratios

    def describe(self) -> str:
        """E.g. ``+3.0 % (within the ±8.0 % spread of 20 interleaved rounds: noise)``."""
        if self.rounds < 2:
            return f"{100 * self.difference:+.1f} % (one round: no spread measured, no call made)"
        where = "within" if self.noise else "beyond"
        call = "noise" if self.noise else "a real difference"
        rounds = f"{self.rounds} interleaved round{'s' if self.rounds != 1 else ''}"
        return (f"{100 * self.difference:+.1f} % ({where} the ±{100 * self.spread:.1f} % spread "
                f"of {rounds}: {call})")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "text": self.describe()}


def compare_latency(base: LatencyStats, other: LatencyStats) -> LatencyComparison:
    """Is `other` faster or slower than `base`, beyond the spread of the interleaved rounds?

    Example::

        >>> a = LatencyStats.of([0.010, 0.011, 0.009, 0.010])
        >>> compare_latency(a, LatencyStats.of([0.020, 0.022, 0.018, 0.020])).noise
        False
    """
    if base.median_ms <= 0:
        raise InputError("compare_latency: the base median is not positive")
    difference = other.median_ms / base.median_ms - 1
    a, b = base.samples_ms, other.samples_ms
    if len(a) == len(b) and len(a) > 1 and all(x > 0 for x in a):
        ratios = sorted(y / x for x, y in zip(a, b, strict=True))
        deciles = statistics.quantiles(ratios, n=10, method="inclusive")
        spread, per_round = (deciles[-1] - deciles[0]) / 2, True
    else:
        spread = max((s.p90_ms - s.p10_ms) / 2 / s.median_ms if s.median_ms > 0 else 0.0
                     for s in (base, other))
        per_round = False
    return LatencyComparison(difference=difference, spread=spread,
                             rounds=min(base.runs, other.runs),
                             noise=abs(difference) <= spread, per_round=per_round)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # not available (Windows)
        return None


def conditions(start: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a time is measured under: CPU model, cores, torch threads, load average (1, 5, 15
    minutes), Python and torch versions. Call it before timing and once more after, passing the
    first result: the second call adds ``load_average_end`` (and keeps the rest of `start`).

    Example::

        c = conditions()
        ...  # the work being timed
        c = conditions(c)
        print(f"{seconds:.0f} s ({describe_conditions(c)})")
    """
    if start is not None:
        return {**start, "load_average_end": _load_average()}
    torch = sys.modules.get("torch")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cores_available": cores,
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "load_average_start": _load_average(),
        "python": platform.python_version(),
        "torch": getattr(torch, "__version__", None),
        "platform": platform.platform(),
    }


def describe_conditions(c: Mapping[str, Any]) -> str:
    """One line for beside a time, e.g. ``2 cores (AMD EPYC 7B13), 2 torch threads, load
    average 0.4 at start / 2.1 at end (1 min), Python 3.11.9, torch 2.13.0``."""
    parts = [f"{c.get('cores_available') or c.get('cpu_count')} cores ({c.get('cpu_model')})"]
    if c.get("torch_threads") is not None:
        parts.append(f"{c['torch_threads']} torch threads")
    start, end = c.get("load_average_start"), c.get("load_average_end")
    if start:
        load = f"load average {start[0]:.1f} at start"
        load += f" / {end[0]:.1f} at end (1 min)" if end else " (1 min)"
        parts.append(load)
    parts.append(f"Python {c.get('python')}")
    if c.get("torch"):
        parts.append(f"torch {c['torch']}")
    return ", ".join(parts)
