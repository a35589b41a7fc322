"""One prepared GPU check (run it where a CUDA GPU is present; it exits 0 with a note otherwise).

    .venv/bin/python examples/gpu_check.py --out runs/gpu_check.json

Trains a BERT-base-shaped model (random weights) transformed by capaboost_fx on CUDA in bf16
autocast under torch.compile, times training steps against PEFT LoRA r=8 side by side, folds,
checks fold parity on the GPU, and (when onnxruntime-gpu is installed) exports and serves the
folded model with the CUDA execution provider; a bf16 decoder (gradient checkpointing) vs
PEFT; a QLoRA-style 4-bit decoder vs PEFT (step time, peak memory) and generate throughput
of the training module vs the base model. Prints and writes the figures as JSON.
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


def decoder_check(args: argparse.Namespace) -> dict:
    """bf16 LLaMA-shaped decoder, gradient checkpointing on: step time and peak CUDA memory of
    capaboost_fx vs PEFT LoRA r=8 (q/v), interleaved rounds, same weights."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = torch.device("cuda")
    cfg = LlamaConfig(vocab_size=32000, hidden_size=args.dec_hidden,
                      intermediate_size=args.dec_hidden * 11 // 4,
                      num_hidden_layers=args.dec_layers, num_attention_heads=args.dec_hidden // 128,
                      num_key_value_heads=args.dec_hidden // 256, use_cache=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(dev, torch.bfloat16)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, cfg.vocab_size, (args.dec_batch, args.dec_seq), device=dev)
    spec = cbx.Spec(targets=["*.q_proj", "*.v_proj"], rank=8, num_masks=2, density=0.5)
    tm = cbx.transform(base, spec, example_kwargs={"input_ids": ids[:2, :16],
                                                   "labels": ids[:2, :16]}).train()
    lora = peft.get_peft_model(base, peft.LoraConfig(
        r=8, target_modules=["q_proj", "v_proj"])).train()
    arms = {"capaboost_fx": tm, "peft": lora}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            for k, m in arms.items()}

    def step(name: str) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        arms[name](input_ids=ids, labels=ids).loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    peak = {}
    for name in arms:  # warm-up, then the peak of one step on its own
        step(name)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(name)
        peak[name] = torch.cuda.max_memory_allocated() - before
    ratios = []
    for _ in range(args.rounds):
        t = {name: step(name) for name in arms}
        ratios.append(t["capaboost_fx"] / t["peft"])
    return {"decoder_params": sum(p.numel() for p in base.parameters()),
            "blocks_checkpointed": sum(b.checkpoint for b in tm.blocks().values()),
            "batch": args.dec_batch, "seq": args.dec_seq,
            "step_ratio_vs_peft": statistics.median(ratios),
            "peak_step_memory_ratio_vs_peft": peak["capaboost_fx"] / peak["peft"],
            "peak_step_bytes": peak}


def qlora_generate_check(args: argparse.Namespace) -> dict:
    """QLoRA-style: a bf16 LLaMA-shaped decoder whose linears are bitsandbytes 4-bit (or
    torchao NF4 when bitsandbytes is missing), CapaBoost vs PEFT LoRA (q/v, r=8) over it:
    step time and peak CUDA memory, interleaved; then tokens/s of train_model.generate vs the
    base model's own generate (greedy, KV cache) and the memory the generation view adds."""
    import peft
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = torch.device("cuda")
    cfg = LlamaConfig(vocab_size=32000, hidden_size=args.dec_hidden,
                      intermediate_size=args.dec_hidden * 11 // 4,
                      num_hidden_layers=args.dec_layers, num_attention_heads=args.dec_hidden // 128,
                      num_key_value_heads=args.dec_hidden // 256)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(torch.bfloat16)
    try:
        import bitsandbytes as bnb

        how = "bitsandbytes Linear4bit nf4"
        for name, m in list(base.named_modules()):
            if isinstance(m, nn.Linear) and "lm_head" not in name:
                q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=False,
                                      compute_dtype=torch.bfloat16, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(m.weight.detach(), requires_grad=False,
                                             quant_type="nf4")
                parent, _, child = name.rpartition(".")
                setattr(base.get_submodule(parent), child, q)
    except ImportError:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        how = "torchao NF4"
        for name, m in base.named_modules():
            if isinstance(m, nn.Linear) and "lm_head" not in name:
                m.weight = nn.Parameter(to_nf4(m.weight.detach()), requires_grad=False)
    base = base.to(dev)
    for p in base.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, cfg.vocab_size, (args.dec_batch, 512), device=dev)
    spec = cbx.Spec(targets=["*.q_proj", "*.v_proj"], rank=8, num_masks=2, density=0.5)
    tm = cbx.transform(base, spec, example_kwargs={"input_ids": ids[:2, :16]}).train()
    out: dict = {"qlora_quantization": how, "qlora_capture": tm.capture_info.capture}
    prompt = ids[:, :32]
    gen = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False)

    def tokens_per_s(model) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(prompt, **gen)
        torch.cuda.synchronize()
        return prompt.shape[0] * 64 / (time.perf_counter() - t0)

    tm.eval()
    tm.generate(prompt, **gen)  # warm-up, the view is built
    before = torch.cuda.memory_allocated()
    tm.generate(prompt, **gen)
    out["generate_view_extra_bytes"] = torch.cuda.memory_allocated() - before
    ratios = [tokens_per_s(tm) / tokens_per_s(base) for _ in range(args.rounds)]
    out["generate_tokens_per_s_ratio_vs_base"] = statistics.median(ratios)
    tm.train()
    lora = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    arms = {"capaboost_fx": tm, "peft": lora.train()}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            for k, m in arms.items()}

    def step(name: str) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = arms[name](input_ids=ids, labels=ids).loss
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    peak = {}
    for name in arms:
        step(name)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(name)
        peak[name] = torch.cuda.max_memory_allocated() - before
    times = [{n: step(n) for n in arms} for _ in range(args.rounds)]
    out["qlora_step_ratio_vs_peft"] = statistics.median(
        t["capaboost_fx"] / t["peft"] for t in times)
    out["qlora_peak_step_bytes"] = peak
    return out


def fsdp_check() -> dict:
    """Per-block FSDP2 on every GPU of this machine (nccl): the per-rank peak parameter
    memory during forward as a fraction of the unsharded model (examples/ddp_train.py)."""
    import subprocess
    import sys
    import tempfile

    n = torch.cuda.device_count()
    if n < 2:
        return {"fsdp_per_block": f"needs >= 2 GPUs, found {n}; the CPU figure comes from "
                                  "pytest tests/test_distributed.py -k per_block -s"}
    here = os.path.dirname(os.path.abspath(__file__))
    out = tempfile.mkdtemp()
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", str(n),
                           os.path.join(here, "ddp_train.py"), "--engine", "fsdp2-blocks",
                           "--backend", "nccl", "--layers", "12", "--checkpoint", "--out", out],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
        return {"fsdp_per_block_error": proc.stderr[-2000:]}
    with open(os.path.join(out, "summary.json")) as f:
        return {"fsdp_per_block": json.load(f)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu_check.json")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--dec-hidden", type=int, default=2048)
    parser.add_argument("--dec-layers", type=int, default=16)
    parser.add_argument("--dec-batch", type=int, default=4)
    parser.add_argument("--dec-seq", type=int, default=2048)
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
    for part in (lambda: decoder_check(args), lambda: qlora_generate_check(args), fsdp_check):
        try:
            result.update(part())
        except Exception as e:  # report, do not hide
            result.setdefault("errors", []).append(f"{type(e).__name__}: {e}")
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
