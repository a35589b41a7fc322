"""Latency, measured side by side: `measure_latency` times several sessions or callables in
interleaved rounds (`round_order`) and reports `LatencyStats` (median, quartiles from
``statistics.quantiles``). One timing rule for compare_onnx, the demo and the benchmarks."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from capaboost_fx.errors import InputError


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
    from capaboost_fx.onnx.runtime import Session, _to_numpy  # runtime re-exports this module

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
