"""Serve many fine-tunes of one base from one onnxruntime session (multi-LoRA, per request).

Three "tenants" fine-tune the same tiny LLaMA with CapaBoost (a few optimizer steps each, on
their own random token stream: the point is that their adapters differ). Then:

1. ``export_onnx(tenant_0, "base.onnx", multi_lora=True)``: one ONNX file, the unmerged base
   with each target's rank-d·r adapter as initializers a run may override;
2. ``save_onnx_adapter(tenant_k, "tenant_k.onnx_adapter", base="base.onnx")``: one small file
   per tenant (onnxruntime's adapter format, checksummed);
3. one `MultiLoraSession`: requests alternate between tenants, also from four threads at once,
   and every answer is checked against that tenant's folded PyTorch model.

    .venv/bin/python examples/serve_many.py                  # writes runs/serve_many/
    .venv/bin/python examples/serve_many.py --out /tmp/x     # elsewhere
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import capaboost_fx as cbx  # noqa: E402

VOCAB = 128


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, use_cache=False)
    return LlamaForCausalLM(cfg).eval()


def fine_tune(model: torch.nn.Module, tenant: int, steps: int) -> cbx.CapaBoostModel:
    """A CapaBoost fine-tune of `model` (never changed) on the tenant's own token stream."""
    spec = cbx.Spec(targets=["*.q_proj", "*.v_proj", "*.down_proj"], rank=4, num_masks=2,
                    density=0.5, seed=tenant)
    gen = torch.Generator().manual_seed(100 + tenant)
    ids = torch.randint(0, VOCAB, (4, 16), generator=gen)
    tm = cbx.transform(model, spec, example_kwargs={"input_ids": ids, "labels": ids})
    opt = torch.optim.AdamW([p for p in tm.parameters() if p.requires_grad], lr=3e-2)
    tm.train()
    for _ in range(steps):
        # each tenant learns to favour its own tokens: ids shifted by the tenant number
        loss = tm(input_ids=ids, labels=(ids + 7 * tenant) % VOCAB).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return tm.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join("runs", "serve_many"))
    ap.add_argument("--tenants", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per tenant")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.makedirs(args.out, exist_ok=True)

    model = tiny_llama()
    tenants = {f"tenant_{k}": fine_tune(model, k, args.steps) for k in range(args.tenants)}
    example = {"input_ids": torch.randint(0, VOCAB, (2, 12))}
    base = os.path.join(args.out, "base.onnx")
    rep = cbx.export_onnx(tenants["tenant_0"], base, example_kwargs=example, multi_lora=True)
    print(f"wrote {base}: {len(rep.targets)} targets, {len(rep.slots)} adapter slots, "
          f"fusions {rep.export.fusions}, {rep.export.file_bytes:,} bytes")
    files = {}
    for name, tm in tenants.items():
        files[name] = cbx.save_onnx_adapter(tm, os.path.join(args.out, f"{name}.onnx_adapter"),
                                            base=base)
        print(f"wrote {files[name]} ({os.path.getsize(files[name]):,} bytes)")

    session = cbx.MultiLoraSession(base, files)
    requests = [(torch.randint(0, VOCAB, (1 + i % 3, 10 + i)), f"tenant_{i % args.tenants}")
                for i in range(12)]
    with torch.no_grad():
        folded = {name: cbx.fold(tm) for name, tm in tenants.items()}
        want = [folded[name](input_ids=ids).logits.numpy() for ids, name in requests]

    def serve(i: int) -> tuple[int, np.ndarray, float]:
        ids, name = requests[i]
        start = time.perf_counter()
        logits = session.run({"input_ids": ids}, adapter=name)[0]
        return i, logits, (time.perf_counter() - start) * 1e3

    worst = 0.0
    print("\n| request | tenant | batch × tokens | ms | max rel diff vs folded |")
    print("| ---: | --- | --- | ---: | ---: |")
    for i in range(len(requests)):  # one after another, the tenant changing every request
        _, logits, ms = serve(i)
        rel = float(np.abs(logits - want[i]).max() / np.abs(want[i]).max())
        worst = max(worst, rel)
        ids, name = requests[i]
        print(f"| {i} | {name} | {ids.shape[0]} × {ids.shape[1]} | {ms:.2f} | {rel:.1e} |")
    with ThreadPoolExecutor(max_workers=4) as pool:  # and from four threads at once
        for i, logits, _ in pool.map(serve, list(range(len(requests))) * 2):
            worst = max(worst, float(np.abs(logits - want[i]).max() / np.abs(want[i]).max()))
    if worst > 1e-4:
        print(f"MISMATCH: max relative difference {worst:.2e}")
        return 1
    print(f"\nall requests equal their folded fine-tunes (max relative difference {worst:.1e}, "
          "also from 4 threads on one session)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
