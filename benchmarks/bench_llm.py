"""LLM fine-tuning benchmarks: generate throughput and memory, and a quantized (QLoRA-style)
base side by side with PEFT. Prints tables and writes JSON to benchmarks/results/.

    python benchmarks/bench_llm.py generate [--quick]
    python benchmarks/bench_llm.py qlora [--quick] [--quant int8|nf4|bnb4]
    python benchmarks/bench_llm.py step [--quick]
    python benchmarks/bench_llm.py reference [--quick]

generate: a LLaMA-style decoder (~40M parameters; --quick: ~7M), greedy decoding of a fixed
number of new tokens, rounds alternated between the base model's own ``generate``, the
training module's ``generate`` (graph and eager paths: the merged view, built once) and the
folded module's. Ratios are per round (tokens/s vs the base). Memory: the bytes of tensors
the generation view holds that the training module does not (exact), against the targeted
weights' bytes.

step: one training step (forward, backward, AdamW) of a LLaMA-style decoder (~60M parameters;
--quick: ~8M), batch 4 x 128, CapaBoost (q/v, r=8, d=2) on the graph and eager paths vs PEFT
LoRA (q/v, r=8), in fp32 and under what TRL turns on by default (bf16 autocast over the fp32
base, gradient checkpointing per layer); the arms alternate per round in one process.

reference: the resident memory a DPO run holds for its reference model, in a fresh process per
arm, right after ``DPOTrainer(...)`` is built on a ``from_pretrained`` decoder (~110M
parameters; --quick: ~15M): ``ref_model=model`` (your untouched model, which the training
module reads in place: no copy) vs no ``ref_model`` (TRL loads a second copy from the path).

qlora: a ~270M-parameter LLaMA-style decoder (--quick: ~30M) whose decoder linears are
quantized (torchao int8 weight-only by default), CapaBoost (q/v, r=8, d=2) vs PEFT LoRA
(q/v, r=8). Memory is the resident set (RSS, after ``malloc_trim``) of a fresh process per
arm: after quantizing, after wrapping, after one AdamW step; step time is measured in one
process, both arms over the same quantized base, alternated per round.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RATIO_HEADERS,
    Contention,
    alternate,
    machine,
    ratio,
    ratio_row,
    setup_torch,
    summary,
    table,
    write_json,
)

import capaboost_fx as cbx  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def llama(hidden: int, layers: int, inter: int, vocab: int, heads: int, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, vocab_size=vocab,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------- generate


def bench_generate(quick: bool, rounds: int) -> dict:
    size = (256, 4, 688, 4000, 4) if quick else (512, 8, 1376, 8000, 8)
    model = llama(*size)
    spec = cbx.Spec(targets=["*.q_proj", "*.v_proj"], rank=8, num_masks=2, density=0.5)
    batch, prompt, new = 4, 16, 32
    ids = torch.randint(3, size[3], (batch, prompt))
    example = {"input_ids": ids, "labels": ids}
    arms = {"base": model}
    for capture in ("graph", "eager"):
        tm = cbx.transform(model, spec, example_kwargs=example, capture=capture).eval()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for a in cbx.adapters(tm).values():
                a.B.copy_(torch.randn(a.B.shape, generator=g) * 0.05)
        arms[f"train_{capture}"] = tm
    arms["folded"] = cbx.fold(arms["train_graph"])
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                  do_sample=False)
    tokens = {n: m.generate(ids, **kwargs) for n, m in arms.items()}  # warm-up, view built
    same = torch.equal(tokens["train_graph"], tokens["folded"])
    same_eager = torch.equal(tokens["train_eager"], tokens["folded"])

    def run(m):
        def once() -> float:
            t0 = time.perf_counter()
            m.generate(ids, **kwargs)
            return time.perf_counter() - t0
        return once

    seconds = alternate({n: run(m) for n, m in arms.items()}, rounds)
    tps = {n: [batch * new / s for s in v] for n, v in seconds.items()}
    ratios = {n: ratio(tps, n, "base", ">= 0.95") for n in arms if n != "base"}
    tm = arms["train_graph"]
    view = tm.generation_model()
    own = {p.data_ptr() for p in tm.parameters()} | {b.data_ptr() for b in tm.buffers()}
    extra = nbytes(p for p in view.parameters() if p.data_ptr() not in own)
    targeted = nbytes(tm.wrapped.get_parameter(a.weight_fqn)
                      for a in cbx.adapters(tm).values())
    model_bytes = nbytes(model.parameters())
    t0 = time.perf_counter()  # the cost of one merge (after an optimizer step)
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.add_(1e-4)
    tm.generation_model()
    merge_s = time.perf_counter() - t0
    out = {
        "model_params": sum(p.numel() for p in model.parameters()),
        "batch": batch, "prompt": prompt, "new_tokens": new, "rounds": rounds,
        "tokens_per_second": {n: summary(v) for n, v in tps.items()},
        "ratios_vs_base": ratios,
        "greedy_tokens_equal_folded": {"graph": same, "eager": same_eager},
        "view_extra_bytes": extra, "targeted_weight_bytes": targeted,
        "model_bytes": model_bytes,
        "extra_memory_target": "<= targeted + 0.05 x model bytes",
        "extra_memory_met": extra <= targeted + 0.05 * model_bytes,
        "merge_seconds_after_a_step": round(merge_s, 4),
    }
    print(table(["arm", "tokens/s (median)", "IQR"],
                [[n, s["median"], f"{s['q1']:.1f}–{s['q3']:.1f}"]
                 for n, s in out["tokens_per_second"].items()]))
    print(table(RATIO_HEADERS, [ratio_row(f"{n} / base", r) for n, r in ratios.items()]))
    print(f"generation view: {extra / 1e6:.2f} MB new (targeted weights {targeted / 1e6:.2f} "
          f"MB, model {model_bytes / 1e6:.1f} MB); one re-merge {merge_s * 1e3:.1f} ms; "
          f"greedy tokens equal the folded model's: graph {same}, eager {same_eager}")
    return out


# --------------------------------------------------------------------------- qlora


def _malloc_trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass


def rss_mb() -> float:
    _malloc_trim()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def quantized_llama(quick: bool, quant: str) -> nn.Module:
    model = llama(*((384, 4, 1024, 8000, 6) if quick else (1024, 16, 2816, 32000, 16)))
    linears = [n for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and "lm_head" not in n]
    if quant == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig(),
                  filter_fn=lambda m, n: isinstance(m, nn.Linear) and "lm_head" not in n)
    elif quant == "nf4":
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        for n in linears:
            m = model.get_submodule(n)
            m.weight = nn.Parameter(to_nf4(m.weight.detach()), requires_grad=False)
    elif quant == "bnb4":
        import bitsandbytes as bnb

        for n in linears:
            m = model.get_submodule(n)
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=False,
                                  compute_dtype=torch.float32, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(m.weight.detach(), requires_grad=False,
                                         quant_type="nf4")
            parent, _, child = n.rpartition(".")
            setattr(model.get_submodule(parent), child, q.to("cpu"))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def wrap(model: nn.Module, arm: str, batch: dict) -> nn.Module:
    if arm == "capaboost":
        spec = cbx.Spec(targets=["*.q_proj", "*.v_proj"], rank=8, num_masks=2, density=0.5)
        return cbx.transform(model, spec, example_kwargs=batch)
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj",
                                                                                 "v_proj"]))


def step(m: nn.Module, opt: torch.optim.Optimizer, batch: dict) -> float:
    t0 = time.perf_counter()
    m(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def _batch(quick: bool) -> dict:
    ids = torch.randint(3, 8000, (2, 64 if quick else 128))
    return {"input_ids": ids, "labels": ids}


def qlora_memory_arm(arm: str, quick: bool, quant: str) -> dict:
    """One arm in this (fresh) process: RSS after quantizing, wrapping and one step."""
    batch = _batch(quick)
    start = rss_mb()
    model = quantized_llama(quick, quant)
    quantized = rss_mb()
    m = wrap(model, arm, batch).train()
    wrapped = rss_mb()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    step(m, opt, batch)
    stepped = rss_mb()
    return {"arm": arm, "start_mb": start, "quantized_mb": quantized, "wrapped_mb": wrapped,
            "after_step_mb": stepped}


def bench_qlora(quick: bool, quant: str, rounds: int) -> dict:
    fp32 = llama(*((384, 4, 1024, 8000, 6) if quick else (1024, 16, 2816, 32000, 16)))
    fp32_mb = nbytes(fp32.parameters()) / 2**20
    params = sum(p.numel() for p in fp32.parameters())
    del fp32
    memory = {}
    for arm in ("peft", "capaboost"):
        proc = subprocess.run(
            [sys.executable, __file__, "_qlora_arm", arm, quant] + (["--quick"] if quick else []),
            capture_output=True, text=True, check=True)
        memory[arm] = json.loads(proc.stdout.strip().splitlines()[-1])
    # step time: both arms over one quantized base (capaboost first: PEFT edits the model)
    batch = _batch(quick)
    model = quantized_llama(quick, quant)
    arms = {"capaboost": wrap(model, "capaboost", batch).train()}
    arms["peft"] = wrap(model, "peft", batch).train()
    opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            for n, m in arms.items()}
    for n, m in arms.items():
        step(m, opts[n], batch)  # warm-up (AdamW state)
    seconds = alternate({n: (lambda n=n: step(arms[n], opts[n], batch)) for n in arms}, rounds)
    r = ratio(seconds, "capaboost", "peft", "<= 1.10")
    rows = []
    for stage in ("wrapped_mb", "after_step_mb"):
        c, p = memory["capaboost"][stage], memory["peft"][stage]
        rows.append([stage, round(p, 1), round(c, 1), round((c - p) / fp32_mb, 4),
                     "<= 0.05", "met" if (c - p) / fp32_mb <= 0.05 else "missed"])
    print(f"{params / 1e6:.0f}M-parameter decoder, fp32 {fp32_mb:.0f} MB, {quant} base")
    print(table(["RSS", "PEFT MB", "CapaBoost MB", "(CapaBoost-PEFT)/fp32", "target",
                 "verdict"], rows))
    print(table(RATIO_HEADERS, [ratio_row("step time CapaBoost / PEFT", r)]))
    return {"quant": quant, "model_params": params, "fp32_mb": fp32_mb, "memory": memory,
            "memory_rows": rows, "step_seconds": {n: summary(v) for n, v in seconds.items()},
            "step_ratio": r, "batch": list(batch["input_ids"].shape)}


# --------------------------------------------------------------------------- step


def _step_arms(quick: bool) -> tuple[dict, dict]:
    from peft import LoraConfig, get_peft_model

    size = (256, 4, 688, 4000, 4) if quick else (512, 8, 1376, 8000, 8)
    ids = torch.randint(3, size[3], (4, 128))
    batch = {"input_ids": ids, "labels": ids}
    spec = cbx.Spec(targets=["*.q_proj", "*.v_proj"], rank=8, num_masks=2, density=0.5)
    arms = {}
    for ck in (False, True):
        tag = "bf16+ckpt" if ck else "fp32"
        for capture in ("graph", "eager"):
            tm = cbx.transform(llama(*size), spec, example_kwargs=batch, capture=capture).train()
            if ck:
                tm.gradient_checkpointing_enable({"use_reentrant": False})
            arms[f"capaboost-{capture} {tag}"] = tm
        pm = get_peft_model(llama(*size), LoraConfig(r=8, lora_alpha=16,
                                                      target_modules=["q_proj", "v_proj"]))
        if ck:
            pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        arms[f"peft {tag}"] = pm.train()
    return arms, batch


def bench_step(quick: bool, rounds: int) -> dict:
    arms, batch = _step_arms(quick)
    opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            for n, m in arms.items()}

    def run(name: str) -> float:
        t0 = time.perf_counter()
        ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if "bf16" in name
               else contextlib.nullcontext())
        with ctx:
            loss = arms[name](**batch).loss
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for n in arms:  # warm-up: AdamW state, the bf16 capture of the graph path
        run(n)
        run(n)
    seconds = alternate({n: (lambda n=n: run(n)) for n in arms}, rounds)
    ratios = {}
    for tag in ("fp32", "bf16+ckpt"):
        for capture in ("graph", "eager"):
            target = "<= 1.00" if capture == "graph" else None
            ratios[f"{capture} {tag}"] = ratio(seconds, f"capaboost-{capture} {tag}",
                                               f"peft {tag}", target)
    params = sum(p.numel() for p in arms["peft fp32"].parameters())
    print(f"{params / 1e6:.0f}M-parameter decoder, batch {list(batch['input_ids'].shape)}, "
          f"{rounds} rounds alternated")
    print(table(RATIO_HEADERS, [ratio_row(f"step CapaBoost {k} / PEFT", r)
                                for k, r in ratios.items()]))
    return {"model_params": params, "batch": list(batch["input_ids"].shape),
            "step_seconds": {n: summary(v) for n, v in seconds.items()}, "ratios": ratios}


# --------------------------------------------------------------------------- reference


def reference_arm(arm: str, model_dir: str) -> dict:
    """One arm in this (fresh) process: RSS after loading, transforming, building DPOTrainer."""
    import datasets
    import transformers
    import trl

    start = rss_mb()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    loaded = rss_mb()
    ids = torch.randint(3, 4000, (2, 16))
    spec = cbx.Spec(targets=["*.q_proj", "*.v_proj"], rank=8, num_masks=2, density=0.5)
    tm = cbx.transform(model, spec, example_kwargs={"input_ids": ids, "labels": ids})
    transformed = rss_mb()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    pairs = datasets.Dataset.from_dict({"prompt": ["a b"] * 4, "chosen": [" c"] * 4,
                                        "rejected": [" d"] * 4})
    args = trl.DPOConfig(output_dir=os.path.join(model_dir, "run"), use_cpu=True,
                         report_to="none", max_steps=1, per_device_train_batch_size=2,
                         save_strategy="no")
    trainer = trl.DPOTrainer(model=tm, ref_model=model if arm == "ref_model=model" else None,
                             args=args, processing_class=tok, train_dataset=pairs)
    built = rss_mb()
    trainer.train()  # one step: the reference's weights are read (a loaded file is mmapped)
    stepped = rss_mb()
    return {"arm": arm, "start_mb": start, "loaded_mb": loaded, "transformed_mb": transformed,
            "trainer_mb": built, "after_step_mb": stepped,
            "reference_is_a_copy": trainer.ref_model is not model}


def bench_reference(quick: bool) -> dict:
    import tempfile


    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from tiny_lm import char_tokenizer

    size = (256, 4, 688, 4000, 4) if quick else (768, 12, 2048, 4000, 12)
    with tempfile.TemporaryDirectory() as d:
        model = llama(*size)
        fp32_mb = nbytes(model.parameters()) / 2**20
        model.save_pretrained(d)
        char_tokenizer().save_pretrained(d)
        del model
        arms = {}
        for arm in ("ref_model=model", "TRL reload (no ref_model)"):
            proc = subprocess.run([sys.executable, __file__, "_reference_arm", arm, d],
                                  capture_output=True, text=True, check=True)
            arms[arm] = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = [[arm, round(r["trainer_mb"] - r["transformed_mb"], 1),
             round(r["after_step_mb"] - r["transformed_mb"], 1),
             round((r["after_step_mb"] - r["transformed_mb"]) / fp32_mb, 3),
             r["reference_is_a_copy"]] for arm, r in arms.items()]
    print(f"decoder of {fp32_mb:.0f} MB (fp32); resident memory over the training module's")
    print(table(["reference", "DPOTrainer(...) adds MB", "after one step MB", "/ model bytes",
                 "reference is a copy"], rows))
    return {"fp32_mb": fp32_mb, "arms": arms, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["generate", "qlora", "step", "reference", "_qlora_arm",
                                    "_reference_arm"])
    p.add_argument("args", nargs="*")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--quant", default="int8", choices=["int8", "nf4", "bnb4"])
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")
    setup_torch()
    if a.what == "_qlora_arm":
        arm, quant = a.args
        print(json.dumps(qlora_memory_arm(arm, a.quick, quant)))
        return {}
    if a.what == "_reference_arm":
        print(json.dumps(reference_arm(*a.args)))
        return {}
    contention = Contention()
    if a.what == "generate":
        data = bench_generate(a.quick, a.rounds or (4 if a.quick else 8))
    elif a.what == "step":
        data = bench_step(a.quick, a.rounds or (4 if a.quick else 8))
    elif a.what == "reference":
        data = bench_reference(a.quick)
    else:
        data = bench_qlora(a.quick, a.quant, a.rounds or (3 if a.quick else 5))
    data = {"benchmark": a.what, "quick": a.quick, "machine": machine(),
            "contention": contention.stop(), **data}
    name = a.what if a.what != "qlora" else f"qlora_{a.quant}"
    out = a.out or str(RESULTS / f"llm_{name}{'_quick' if a.quick else ''}.json")
    write_json(out, data)
    print(f"wrote {out}")
    return data


if __name__ == "__main__":
    main()
