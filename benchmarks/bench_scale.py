"""Scale table: capaboost_fx vs PEFT LoRA on a decoder of >= 200M parameters, side by side.

    .venv/bin/python benchmarks/bench_scale.py                 # ~270M LLaMA-shaped, fp32
    .venv/bin/python benchmarks/bench_scale.py --quick         # small config (CI smoke)
    .venv/bin/python benchmarks/bench_scale.py --llama7b       # + transform of LLaMA-7B on meta

Memory is resident memory (RSS, psutil) of this process, sampled every 5 ms by a thread, as a
fraction of the model's parameter bytes: extra after transform / get_peft_model, peak during
it, extra after fold / merge_and_unload (PEFT merges a deep copy here so both keep the trained
module, as capaboost_fx does). Activation memory is the bytes autograd saves for backward in
one forward with the model's gradient checkpointing on (counted with saved_tensors_hooks:
exact, not sampled). Prints a markdown table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import threading
import time
from pathlib import Path

import psutil
import torch

import capaboost_fx as cbx


def rss() -> int:
    return psutil.Process(os.getpid()).memory_info().rss


class Peak:
    """Peak RSS while the block runs."""

    def __enter__(self) -> Peak:
        self.peak, self.start, self._stop = rss(), rss(), False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, rss())
        self.end = rss()


def build(args: argparse.Namespace, layers: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.ffn, num_hidden_layers=layers or args.layers,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128,
                      use_cache=False, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


SPEC = cbx.Spec(targets=["*.q_proj", "*.v_proj"], rank=8, num_masks=2, density=0.5, alpha=16)


def saved_bytes(fn) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def one_step_extra(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """RSS growth of one AdamW step (gradients and optimizer state of the adapters)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with Peak() as t:
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return t.end - t.start


def memory_rows(args: argparse.Namespace) -> dict:
    import peft

    model = build(args)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    target_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if n.endswith(("q_proj.weight", "v_proj.weight")))
    ids = torch.randint(0, args.vocab, (2, 16))
    gc.collect()
    with Peak() as t:
        tm = cbx.transform(model, SPEC, example_kwargs={"input_ids": ids, "labels": ids})
    ours = {"transform_extra": (t.end - t.start) / nbytes, "transform_peak": (t.peak - t.start) / nbytes,
            "transform_seconds": tm.capture_info.transform_seconds,
            "export_seconds": tm.capture_info.export_seconds}
    ours["step_extra"] = one_step_extra(tm, ids) / nbytes
    with Peak() as t:
        deploy = cbx.fold(tm)
    ours["fold_extra"] = (t.end - t.start) / nbytes
    del deploy, tm
    gc.collect()

    with Peak() as t:
        pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16,
                                                        target_modules=["q_proj", "v_proj"]))
    theirs = {"transform_extra": (t.end - t.start) / nbytes,
              "transform_peak": (t.peak - t.start) / nbytes}
    theirs["step_extra"] = one_step_extra(pm, ids) / nbytes
    with Peak() as t:
        merged = copy.deepcopy(pm).merge_and_unload()
    theirs["fold_extra"] = (t.end - t.start) / nbytes
    del merged, pm
    return {"params": sum(p.numel() for p in model.parameters()), "model_bytes": nbytes,
            "target_fraction": target_bytes / nbytes, "capaboost_fx": ours, "peft": theirs}


def activation_rows(args: argparse.Namespace) -> dict:
    import peft

    model = build(args, layers=args.ck_layers)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    tm = cbx.transform(model, SPEC, example_kwargs={"input_ids": ids[:2, :16],
                                                    "labels": ids[:2, :16]})
    tm.train()

    def ours_step() -> torch.Tensor:
        return tm(input_ids=ids, labels=ids).loss

    ours = saved_bytes(ours_step)
    tm = None  # free it before PEFT runs
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16,
                                                    target_modules=["q_proj", "v_proj"]))
    pm.train()
    theirs = saved_bytes(lambda: pm(input_ids=ids, labels=ids).loss)
    return {"layers": args.ck_layers, "batch": args.batch, "seq": args.seq,
            "capaboost_fx_bytes": ours, "peft_bytes": theirs, "ratio": ours / theirs}


def fsdp_rows(layers: int = 12) -> dict:
    """Per-rank peak parameter memory during forward, 2 gloo processes, root-only vs
    per-block ``fully_shard`` (examples/ddp_train.py, checkpointing on)."""
    import subprocess
    import sys
    import tempfile

    here = Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"
    torchrun = Path(sys.executable).with_name("torchrun")
    out = {}
    for engine in ("fsdp2", "fsdp2-blocks"):
        folder = tempfile.mkdtemp()
        subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(here),
                        "--engine", engine, "--layers", str(layers), "--checkpoint",
                        "--steps", "2", "--out", folder], check=True, capture_output=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        out[engine] = json.loads(Path(folder, "summary.json").read_text())
    return {"layers": layers, "root_only": out["fsdp2"]["peak_forward_param_fraction"],
            "per_block": out["fsdp2-blocks"]["peak_forward_param_fraction"]}


def load_row(args: argparse.Namespace) -> dict:
    """Peak RSS of load_base_weights into a training module built under init_empty_weights,
    from sharded safetensors (saved by save_pretrained), as a fraction of the model's bytes."""
    import tempfile

    from accelerate import init_empty_weights

    model = build(args)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    folder = tempfile.mkdtemp()
    model.save_pretrained(folder, max_shard_size="200MB")
    config = model.config
    del model
    gc.collect()
    from transformers import LlamaForCausalLM

    with init_empty_weights():
        empty = LlamaForCausalLM(config)
    ids = torch.randint(0, args.vocab, (2, 16))
    tm = cbx.transform(empty, SPEC, example_kwargs={"input_ids": ids, "labels": ids},
                       modes=("train",))
    gc.collect()
    with Peak() as t:
        report = cbx.load_base_weights(tm, folder)
    start = t.start
    with Peak() as t2, torch.no_grad():  # safetensors memory-maps: pages load on first use
        tm.eval()(input_ids=ids)
    shards = len(list(Path(folder).glob("*.safetensors")))
    return {"shards": shards, "loaded": report["loaded"], "seconds": report["seconds"],
            "peak": (t.peak - start) / nbytes, "extra_after": (t.end - start) / nbytes,
            "extra_after_first_forward": (t2.end - start) / nbytes,
            "peak_through_first_forward": (t2.peak - start) / nbytes}


def llama7b_row() -> dict:
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, use_cache=False)
    with init_empty_weights():
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    ids = torch.randint(0, 32000, (2, 16))
    t0 = time.perf_counter()
    tm = cbx.transform(model, SPEC, example_kwargs={"input_ids": ids, "labels": ids})
    return {"transform_seconds": round(time.perf_counter() - t0, 2),
            "export_seconds": tm.capture_info.export_seconds,
            "blocks": len(tm.blocks()), "targets": len(cbx.adapters(tm))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--llama7b", action="store_true")
    p.add_argument("--load-only", action="store_true",
                   help="only measure load_base_weights (peak memory of streaming the shards)")
    p.add_argument("--out", default="runs/bench_scale.json")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.quick:
        args.vocab, args.hidden, args.ffn, args.layers = 1000, 256, 512, 4
        args.ck_layers, args.batch, args.seq = 2, 2, 64
    else:
        args.vocab, args.hidden, args.ffn, args.layers = 32000, 1024, 2816, 16
        args.ck_layers, args.batch, args.seq = 8, 4, 768
    if args.load_only:
        row = load_row(args)
        print(f"load_base_weights: {row['shards']} shards, {row['loaded']} tensors, "
              f"{row['seconds']} s; peak RSS {row['peak']:.3f} of the model's bytes, "
              f"{row['extra_after']:.3f} kept after; after the first forward (pages touched) "
              f"{row['extra_after_first_forward']:.3f}, peak {row['peak_through_first_forward']:.3f}")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"load_base_weights": row}, indent=2))
        return 0
    result = {"memory": memory_rows(args), "activations": activation_rows(args),
              "fsdp": fsdp_rows(), "load_base_weights": load_row(args)}
    if args.llama7b:
        result["llama7b_meta"] = llama7b_row()
    m, a = result["memory"], result["activations"]
    ours, theirs = m["capaboost_fx"], m["peft"]
    lines = [f"decoder: {m['params'] / 1e6:.0f}M parameters, fp32; targets (q,v) are "
             f"{m['target_fraction']:.3f} of the model's bytes",
             "", "| figure (fraction of the model's bytes) | capaboost_fx | PEFT |",
             "| --- | ---: | ---: |"]
    for key, label in [("transform_extra", "extra after transform / get_peft_model"),
                       ("transform_peak", "peak during transform"),
                       ("step_extra", "extra after one AdamW step (batch 2 x 16)"),
                       ("fold_extra", "extra after fold / merge_and_unload (of a copy)")]:
        lines.append(f"| {label} | {ours[key]:.3f} | {theirs[key]:.3f} |")
    lines.append(f"| activation bytes, checkpointing on ({a['layers']} layers, batch "
                 f"{a['batch']} x {a['seq']}) | {a['ratio']:.3f}x PEFT | 1 |")
    lines.append(f"| transform / its torch.export time | {ours['transform_seconds']:.2f} s / "
                 f"{ours['export_seconds']:.2f} s = "
                 f"{ours['transform_seconds'] / ours['export_seconds']:.2f} | |")
    f = result["fsdp"]
    lines.append(f"| per-rank peak parameter memory in forward, 2 ranks, per-block FSDP2 "
                 f"({f['layers']}-layer BERT) | {f['per_block']:.3f} (root-only "
                 f"{f['root_only']:.3f}) | |")
    if "llama7b_meta" in result:
        r = result["llama7b_meta"]
        lines.append(f"| LLaMA-7B on meta: transform / export | {r['transform_seconds']} s / "
                     f"{r['export_seconds']} s | |")
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
