"""One prepared GPU check (run it where a CUDA GPU is present; it exits 0 with a note otherwise).

    .venv/bin/python examples/gpu_check.py --out runs/gpu_check.json

Trains a BERT-base-shaped model (random weights) transformed by capaboost_fx on CUDA in bf16
autocast under torch.compile, times training steps against PEFT LoRA r=8 side by side, folds,
checks fold parity on the GPU, and (when onnxruntime-gpu is installed) exports and serves the
folded model with the CUDA execution provider. Prints and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

import capaboost_fx as cbx


def _step(model, opt, batch) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(**batch).logits
    torch.nn.functional.cross_entropy(logits.float(), batch["labels"]).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu_check.json")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    os.makedirs("runs", exist_ok=True)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here")
        return 0
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    dev = torch.device("cuda")
    config = BertConfig(num_hidden_layers=args.layers, num_labels=2)
    base = BertForSequenceClassification(config).to(dev)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=dev)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.randint(0, 2, (args.batch,), device=dev)}
    example = {k: v[:4, :16] if v.dim() == 2 else v[:4] for k, v in batch.items()}
    spec = cbx.Spec(targets=["*.query", "*.value"], rank=8, num_masks=2, density=0.5)
    tm = cbx.transform(base, spec, example_kwargs=example).train()
    compiled = torch.compile(tm, fullgraph=True)
    opt = torch.optim.AdamW([p for p in tm.parameters() if p.requires_grad], lr=1e-4)

    import peft

    lora = peft.get_peft_model(copy.deepcopy(base),
                               peft.LoraConfig(r=8, target_modules=["query", "value"])).train()
    opt_l = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(3):  # warm-up (and compilation)
        _step(compiled, opt, batch)
        _step(lora, opt_l, batch)
    ratios = []
    for _ in range(args.rounds):
        times = []
        for model, o in ((compiled, opt), (lora, opt_l)):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            _step(model, o, batch)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        ratios.append(times[0] / times[1])

    tm.eval()
    deploy = cbx.fold(tm)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        diff = (deploy(**batch).logits.float() - tm(**batch).logits.float()).abs().max().item()
    result = {"device": torch.cuda.get_device_name(), "layers": args.layers,
              "batch": args.batch, "seq": args.seq,
              "step_ratio_capaboost_compiled_vs_peft_r8": statistics.median(ratios),
              "step_ratio_min_max": [min(ratios), max(ratios)],
              "fold_max_abs_diff_bf16_autocast": diff}
    try:
        from capaboost_fx.onnx import open_session

        cpu_batch = {k: v.cpu() for k, v in example.items()}
        deploy_cpu = cbx.fold(tm.float().cpu())
        cbx.export_onnx(deploy_cpu, "runs/gpu_check.onnx", example_kwargs=cpu_batch)
        sess = open_session("runs/gpu_check.onnx", providers="cuda")
        result["onnxruntime_providers"] = sess.providers
    except Exception as e:  # report, do not hide: the GPU training figures still stand
        result["onnxruntime_error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
