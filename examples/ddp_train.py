"""Multi-process training of a capaboost_fx module with PyTorch's own engines (DDP or FSDP2).

    # one machine, 2 processes on CPU (gloo); use --backend nccl on GPUs
    .venv/bin/torchrun --standalone --nproc_per_node 2 examples/ddp_train.py --out runs/ddp
    # several machines: the same script, torchrun's usual rendezvous flags
    torchrun --nnodes 2 --node_rank $RANK --nproc_per_node 8 \
        --rdzv_backend c10d --rdzv_endpoint $HOST:29500 examples/ddp_train.py --backend nccl

Every rank builds the same base model and calls `transform` itself: masks come from seeded
local generators, so they are identical on every rank with no communication (checked here).
Each rank trains on its slice of each global batch; rank 0 writes the adapter and a JSON
summary (masks equal across ranks, A/B equal across ranks after training).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import capaboost_fx as cbx

SPEC = cbx.Spec(targets=["*.query", "*.value"], rank=4, num_masks=2, density=0.5,
                trainable=["classifier"], seed=11)
# decoders (--family llama / qwen2): the attention projections of every layer
DECODER_SPEC = cbx.Spec(targets=["*.q_proj", "*.v_proj"], rank=4, num_masks=2, density=0.5,
                        seed=11)
DECODERS = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def spec_for(family: str = "bert") -> cbx.Spec:
    return SPEC if family == "bert" else DECODER_SPEC


def build_model(layers: int = 2, family: str = "bert") -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)  # the same base model on every rank
    if family in DECODERS:
        config_cls, model_cls = DECODERS[family]
        config = getattr(transformers, config_cls)(
            vocab_size=128, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
            use_cache=False)
        return getattr(transformers, model_cls)(config).double()
    config = transformers.BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=64, num_labels=2, max_position_embeddings=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config).double()


def global_batches(steps: int, batch: int, seq: int = 12,
                   family: str = "bert") -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, 128, (batch, seq), generator=gen)
        labels = ids if family in DECODERS else torch.randint(0, 2, (batch,), generator=gen)
        out.append({"input_ids": ids, "labels": labels})
    return out


def example_inputs(family: str = "bert") -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 128, (3, 7))
    return {"input_ids": ids,
            "labels": ids if family in DECODERS else torch.zeros(3, dtype=torch.long)}


def digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train(train_model: torch.nn.Module, batches, rank: int, world: int, lr: float) -> None:
    params = [p for p in train_model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    train_model.train()
    for batch in batches:
        local = {k: v.chunk(world)[rank] for k, v in batch.items()}
        train_model(**local).loss.backward()
        opt.step()
        opt.zero_grad()


def param_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters materialized on this rank: local shards of sharded ones, full
    tensors of unsharded (gathered) ones."""
    total = 0
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def track_peak_param_bytes(tm: torch.nn.Module) -> list[int]:
    """Parameter bytes seen at the start and end of every block's forward (after FSDP2's
    pre-forward all-gather): the peak is max() of the list."""
    seen: list[int] = []
    for block in [*tm.blocks().values(), tm]:
        block.register_forward_pre_hook(lambda m, a: seen.append(param_bytes(tm)))
        block.register_forward_hook(lambda m, a, o: seen.append(param_bytes(tm)))
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="DDP / FSDP2 training of a CapaBoost module")
    parser.add_argument("--out", default="runs/ddp")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="global batch size")
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--engine", choices=["ddp", "fsdp2", "fsdp2-blocks"], default="ddp",
                        help="fsdp2: fully_shard the root only; fsdp2-blocks: each transformer "
                             "block, then the root (torchtitan's recipe)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--checkpoint", action="store_true",
                        help="activation checkpointing on every block")
    parser.add_argument("--family", default="bert", choices=["bert", *DECODERS])
    parser.add_argument("--capture", default="auto", choices=["auto", "graph", "eager"])
    parser.add_argument("--rank0-save", action="store_true",
                        help="show the mistake: save_pretrained on rank 0 only (a collective "
                             "under FSDP2), and write the error it gives to rank0_error.txt")
    args = parser.parse_args(argv)

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if args.backend == "nccl":  # one GPU per process
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    tm = cbx.transform(build_model(args.layers, args.family).to(device), spec_for(args.family),
                       example_kwargs=example_inputs(args.family),
                       checkpoint=True if args.checkpoint else None, capture=args.capture)
    full_bytes = param_bytes(tm)
    adapters = cbx.adapters(tm)
    mask_digest = digest([t for a in adapters.values() for t in (a.mask_A, a.mask_B)])
    init_digest = digest([a.A for a in adapters.values()])

    if args.engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        engine = DistributedDataParallel(tm)
    else:
        from torch.distributed.fsdp import fully_shard

        if args.engine == "fsdp2-blocks":
            for block in tm.blocks().values():  # each block's weights gathered around it only
                fully_shard(block)
        engine = fully_shard(tm)
    peak = track_peak_param_bytes(tm)
    batches = [{k: v.to(device) for k, v in b.items()}
               for b in global_batches(args.steps, args.batch, family=args.family)]
    train(engine, batches, rank, world, args.lr)

    if args.engine.startswith("fsdp2"):  # gather full tensors of the sharded parameters
        state = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
                 for n, p in tm.named_parameters() if p.requires_grad}
    else:
        state = {n: p.detach() for n, p in tm.named_parameters() if p.requires_grad}
    if args.rank0_save:
        return _rank0_save(tm, rank, Path(args.out))
    # Every rank calls these (sharded tensors are gathered); rank 0 writes.
    tm.save_pretrained(Path(args.out) / "adapter", is_main_process=rank == 0)
    targets = {a.weight_fqn for a in adapters.values()}
    merged = {k: v.detach().contiguous() for k, v in cbx.merged_state_dict(tm).items()
              if k in targets}
    if not (tm.capture_info.capture == "eager" and args.engine.startswith("fsdp2")):
        cbx.fold(tm)  # the deploy module builds under sharding too (graph path)
    digests = [None] * world
    dist.all_gather_object(digests, (mask_digest, init_digest, digest(list(state.values()))))
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        save_file({n: t.contiguous() for n, t in state.items()}, out / "trained.safetensors")
        save_file(merged, out / "merged_targets.safetensors")
        summary = {"world_size": world, "engine": args.engine,
                   "masks_equal": len({d[0] for d in digests}) == 1,
                   "init_equal": len({d[1] for d in digests}) == 1,
                   "params_equal": len({d[2] for d in digests}) == 1,
                   "peak_forward_param_fraction": round(max(peak) / full_bytes, 4)}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary))
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _rank0_save(tm: Any, rank: int, out: Path) -> int:
    """save_pretrained on rank 0 alone: a CollectiveError there (gloo), never a hang."""
    import time

    if rank == 0:
        try:
            tm.save_pretrained(out / "adapter")
            message = "no error"
        except cbx.CollectiveError as e:
            message = f"CollectiveError: {e}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "rank0_error.txt").write_text(message)
    else:  # stays up (not calling) until rank 0's wait is over
        time.sleep(float(os.environ.get("CAPABOOST_FX_COLLECTIVE_TIMEOUT", "120")) + 3)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
