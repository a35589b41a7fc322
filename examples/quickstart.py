"""Quickstart: transform a small BERT, train a few steps, fold back to the original graph."""

import torch
from transformers import BertConfig, BertForSequenceClassification

import capaboost_fx as cbx

torch.manual_seed(0)
config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, num_labels=2)
model = BertForSequenceClassification(config)
ids, labels = torch.randint(0, 1000, (8, 16)), torch.randint(0, 2, (8,))

spec = cbx.Spec(targets=["*.query", "*.value"], rank=8, num_masks=2, density=0.5,
                alpha=16.0, trainable=["classifier"])
train_model = cbx.transform(model, spec, example_kwargs={"input_ids": ids, "labels": labels})
print(cbx.inspect(model, spec, example_kwargs={"input_ids": ids, "labels": labels}))

opt = torch.optim.AdamW([p for p in train_model.parameters() if p.requires_grad], lr=1e-3)
train_model.train()
for step in range(5):  # batches may have other sizes than the example
    loss = train_model(input_ids=ids, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    print(f"step {step}: loss {loss.item():.4f}")

deploy = cbx.fold(train_model)  # original architecture, merged weights
x = {"input_ids": torch.randint(0, 1000, (3, 10)), "labels": torch.zeros(3, dtype=torch.long)}
diff = (deploy(**x).logits - train_model.eval()(**x).logits).abs().max().item()
print(f"fold: max |folded - unfolded| = {diff:.2e}")
