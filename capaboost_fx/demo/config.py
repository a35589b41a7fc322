"""Settings of the demo: `DemoConfig` (the command-line options as a dataclass), the two arms'
specs, and the argument parser."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from capaboost_fx import Spec

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
TARGETS = ["*.query", "*.value"]
TRAINABLE = ["classifier"]
ARMS = ("lora", "capaboost")
ARM_TITLES = {"lora": "LoRA", "capaboost": "CapaBoost-LoRA"}
CITATIONS = [
    "Socher et al., Recursive Deep Models for Semantic Compositionality Over a Sentiment "
    "Treebank, EMNLP 2013",
    "Wang et al., GLUE: A Multi-Task Benchmark and Analysis Platform for Natural Language "
    "Understanding, 2018 (arXiv:1804.07461)",
    "Song et al., Increasing Model Capacity for Free: A Simple Strategy for Parameter "
    "Efficient Fine-tuning (CapaBoost), ICLR 2024 (arXiv:2407.01320)",
]
#: ``--quick`` values, used for every option not given explicitly. Only the budget shrinks:
#: the arms keep their settings (learning rates included).
QUICK = {"steps": 30, "batch_size": 16, "max_length": 32, "eval_size": 256, "latency_runs": 10}


@dataclass
class DemoConfig:
    """Settings of one demo run (the command-line options, as a dataclass).

    The defaults are the best settings of the quality study (``benchmarks/quality.py``, README
    "Quality"), at its budget (100 steps × batch 16) for both arms: LoRA r = 8 and CapaBoost
    r = 8, d = 4, density 0.5 (its best arm; with d·density² = 1 both scalings give the same s),
    each at its best learning rate, 3e-3 for both.
    """

    out: str = "runs/demo"
    steps: int = 100
    batch_size: int = 16
    lora_lr: float = 3e-3
    capaboost_lr: float = 3e-3
    seed: int = 0
    max_length: int = 64
    eval_size: int = 2000
    train_size: int | None = None  # None: all 4,000 shipped rows
    eval_batch_size: int = 64
    rank: int = 8
    alpha: float = 16.0
    num_masks: int = 4
    density: float = 0.5
    scaling: str = "paper"  # CapaBoost arm: Spec.scaling
    init: str = "standard"  # both arms: Spec.init
    warmup: float = 0.06  # fraction of steps with linear warm-up, then linear decay to 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    threads: int | None = None  # None: every core this process may use
    model: str | None = None  # a BERT checkpoint directory; None: the shipped MiniLM-L6
    onnx: bool = True
    latency_runs: int = 30
    progress: bool = True
    quick: bool = False

    def validate(self) -> DemoConfig:
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 2, f"batch_size must be >= 2, got {self.batch_size}"),
            (self.eval_batch_size >= 2, f"eval_batch_size must be >= 2, got {self.eval_batch_size}"),
            (self.max_length >= 8, f"max_length must be >= 8, got {self.max_length}"),
            (self.eval_size >= 2, f"eval_size must be >= 2, got {self.eval_size}"),
            (self.train_size is None or self.train_size >= 2,
             f"train_size must be >= 2, got {self.train_size}"),
            (self.lora_lr > 0 and self.capaboost_lr > 0,
             f"learning rates must be > 0, got {self.lora_lr} and {self.capaboost_lr}"),
            (0 <= self.warmup < 1, f"warmup must be in [0, 1), got {self.warmup}"),
            (self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}"),
            (self.latency_runs >= 1, f"latency_runs must be >= 1, got {self.latency_runs}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for arm in ARMS:  # the Spec validates rank, num_masks, density, alpha, scaling, init
            arm_spec(self, arm)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lr(self, arm: str) -> float:
        return self.lora_lr if arm == "lora" else self.capaboost_lr


def arm_spec(config: DemoConfig, arm: str) -> Spec:
    """The Spec of one arm: plain LoRA (d = 1, density 1) or CapaBoost (d, density, scaling)."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose one of {list(ARMS)}")
    boost = arm == "capaboost"
    return Spec(targets=list(TARGETS), rank=config.rank,
                num_masks=config.num_masks if boost else 1,
                density=config.density if boost else 1.0, alpha=config.alpha,
                scaling=config.scaling if boost else "paper", init=config.init,
                seed=config.seed, trainable=list(TRAINABLE))


def default_prog() -> str:
    """How the user started the demo: ``capaboost-fx demo`` or ``python -m capaboost_fx.demo``."""
    if os.path.basename(sys.argv[0] if sys.argv else "").startswith("capaboost-fx"):
        return "capaboost-fx demo"
    return "python -m capaboost_fx.demo"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    d = DemoConfig()
    p = argparse.ArgumentParser(
        prog=prog or default_prog(),
        description="Fine-tune MiniLM-L6 on SST-2 with LoRA and CapaBoost-LoRA side by side, "
        "fold, export to ONNX, serve with onnxruntime and write a report.",
    )
    p.add_argument("--out", default=None, help=f"report folder (default {d.out})")
    p.add_argument("--quick", action="store_true",
                   help="a short run, a fraction of the default run's time (measured times "
                   "with their machine and load: docs/demo.md; report.md records both): "
                   + ", ".join(
                       f"{k.replace('_', '-')}={v}" for k, v in QUICK.items())
                   + " unless given")
    p.add_argument("--steps", type=int, help=f"training steps per arm (default {d.steps})")
    p.add_argument("--batch-size", type=int, help=f"training batch size (default {d.batch_size})")
    p.add_argument("--lr", type=float, help="AdamW learning rate of both arms (default: each "
                   f"arm's best in the quality study, LoRA {d.lora_lr:g}, CapaBoost "
                   f"{d.capaboost_lr:g})")
    p.add_argument("--lora-lr", type=float, help=f"LoRA's learning rate (default {d.lora_lr:g})")
    p.add_argument("--capaboost-lr", type=float,
                   help=f"CapaBoost's learning rate (default {d.capaboost_lr:g})")
    p.add_argument("--seed", type=int, help=f"seed of data order, masks, init (default {d.seed})")
    p.add_argument("--max-length", type=int, help=f"max tokens per sentence (default {d.max_length})")
    p.add_argument("--eval-size", type=int,
                   help=f"dev sentences to evaluate on, at most 2000 (default {d.eval_size})")
    p.add_argument("--train-size", type=int, help="training rows to use (default: all 4000)")
    p.add_argument("--num-masks", type=int, help=f"CapaBoost's d (default {d.num_masks})")
    p.add_argument("--scaling", choices=["paper", "normalized"],
                   help=f"CapaBoost's Spec.scaling (default {d.scaling})")
    p.add_argument("--threads", type=int, help="torch/onnxruntime threads (default: all cores)")
    p.add_argument("--model", help="a BERT checkpoint directory (default: the shipped MiniLM-L6)")
    p.add_argument("--latency-runs", type=int,
                   help=f"timed onnxruntime runs per model (default {d.latency_runs})")
    p.add_argument("--skip-onnx", action="store_true", help="stop after training and folding")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or messages")
    return p


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    if args.lr is not None:
        values.update(lora_lr=args.lr, capaboost_lr=args.lr)
    for name in ("out", "steps", "batch_size", "lora_lr", "capaboost_lr", "seed", "max_length",
                 "eval_size", "train_size", "num_masks", "scaling", "threads", "model",
                 "latency_runs"):
        v = getattr(args, name)
        if v is not None:
            values[name] = v
    values.update(quick=bool(args.quick), onnx=not args.skip_onnx, progress=not args.no_progress)
    return DemoConfig(**values).validate()


def parse(argv: Sequence[str] | None = None, prog: str | None = None) -> DemoConfig:
    """The config of a command line (exits with status 2 and a usage message on bad options)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except ValueError as e:  # SpecError is a ValueError too
        parser.error(str(e))
        raise  # unreachable: parser.error exits
