"""Compatibility table: Hugging Face families built from small configs, each taken through the
stages a user runs, beside PEFT LoRA on the same targets. Prints a Markdown table, writes JSON
(benchmarks/results/families.json) and docs/compatibility.md; regenerate with one command:

    python benchmarks/families.py             # all families (about 15 minutes on 2 cores)
    python benchmarks/families.py --only bert,t5   # a subset: printed, nothing written
    python benchmarks/families.py --render    # the page again from the JSON (notes edited)

Stages: transform (capture="auto": the path taken is shown), a training step at a batch and
sequence other than the example's (where the model allows), fold (folded == training module in
eval, adapters acting), ONNX export of the folded model verified in onnxruntime, and PEFT LoRA
(forward + backward) as the reference. A failed stage shows its error's first line; a failed
transform or ONNX stage is tried on the base model without capaboost_fx (plain torch.export /
torch.onnx.export) to tell upstream causes from ours. Upstream causes, with the threads that
explain them, are kept in UPSTREAM and EAGER_WHY and shown in the page's Notes column.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import THREADS, machine, table, write_json  # noqa: E402

import capaboost_fx as cbx  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
T = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
DEC = dict(T, vocab_size=64, num_key_value_heads=2, max_position_embeddings=64)
S2S = dict(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
           decoder_ffn_dim=64, max_position_embeddings=64)
SPEECH = dict(T, vocab_size=32, conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4),
              num_feat_extract_layers=2, num_conv_pos_embeddings=16,
              num_conv_pos_embedding_groups=4, mask_time_prob=0.5, mask_time_length=2,
              layerdrop=0.1)  # SpecAugment and LayerDrop on (tests/test_uncapturable.py: 0.5)
QV = ["*.q_proj", "*.v_proj"]
MOE = dict(DEC, num_local_experts=4, num_experts=4, num_experts_per_tok=2,
           moe_intermediate_size=32, shared_expert_intermediate_size=32)


def ids(b: int, s: int, vocab: int = 60) -> torch.Tensor:
    return torch.randint(3, vocab, (b, s))


def text(b, s):
    return {"input_ids": ids(b, s)}


def seq2seq(b, s):
    return {"input_ids": ids(b, s), "decoder_input_ids": ids(b, max(s - 3, 2))}


def lm(b, s):
    x = ids(b, s)
    return {"input_ids": x, "labels": x}


def image(b, s):
    return {"pixel_values": torch.randn(b, 3, 16, 16)}


def image_text(b, s):
    return {"input_ids": ids(b, s), "pixel_values": torch.randn(b, 3, 16, 16)}


def llava(b, s):
    x = ids(b, s, vocab=60)
    x[:, 1:5] = 63  # 4 image tokens: (16 / 8)^2 patches
    return {"input_ids": x, "pixel_values": torch.randn(b, 3, 16, 16)}


TEXT_TOWER = dict(T, vocab_size=64, max_position_embeddings=64)
VISION_TOWER = dict(T, image_size=16, patch_size=8, num_channels=3)


# name: (model class, config class, config kwargs, targets, inputs(b, s), other (b, s))
FAMILIES = {
    "bert": ("BertForSequenceClassification", "BertConfig", dict(T, vocab_size=64),
             ["*.query", "*.value"], text, (5, 11)),
    "roberta": ("RobertaForSequenceClassification", "RobertaConfig",
                dict(T, vocab_size=64, max_position_embeddings=64), ["*.query", "*.value"],
                text, (5, 11)),
    "distilbert": ("DistilBertForSequenceClassification", "DistilBertConfig",
                   dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64),
                   ["*.q_lin", "*.v_lin"], text, (5, 11)),
    "deberta-v2": ("DebertaV2ForSequenceClassification", "DebertaV2Config",
                   dict(T, vocab_size=64), ["*.query_proj", "*.value_proj"], text, (5, 11)),
    "electra": ("ElectraForSequenceClassification", "ElectraConfig",
                dict(T, vocab_size=64, embedding_size=32), ["*.query", "*.value"], text, (5, 11)),
    "funnel": ("FunnelForSequenceClassification", "FunnelConfig",
               dict(vocab_size=64, block_sizes=[1, 1], d_model=32, n_head=4, d_head=8,
                    d_inner=64), ["*.q_head", "*.v_head"], text, (5, 12)),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config",
             dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64),
             ["*.c_attn"], lm, (5, 11)),
    "llama": ("LlamaForCausalLM", "LlamaConfig", DEC, QV, lm, (5, 11)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", DEC, QV, lm, (5, 11)),
    "mistral": ("MistralForCausalLM", "MistralConfig", DEC, QV, lm, (5, 11)),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(DEC, head_dim=8), QV, lm, (5, 11)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(DEC, pad_token_id=0), ["*.qkv_proj"], lm,
             (5, 11)),
    "opt": ("OPTForCausalLM", "OPTConfig",
            dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32), QV, lm,
            (5, 11)),
    "qwen2-moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", MOE, QV, lm, (5, 11)),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", MOE, QV, lm, (5, 11)),
    "t5": ("T5ForConditionalGeneration", "T5Config",
           dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                num_heads=4, decoder_start_token_id=0), ["*.q", "*.v"], seq2seq, (5, 11)),
    "bart": ("BartForConditionalGeneration", "BartConfig", S2S, QV, seq2seq, (5, 11)),
    "led": ("LEDForConditionalGeneration", "LEDConfig",
            dict(S2S, max_encoder_position_embeddings=64, max_decoder_position_embeddings=64,
                 attention_window=[4, 4]), ["*.query", "*.value", *QV],
            lambda b, s: {"input_ids": ids(b, 16), "decoder_input_ids": ids(b, 6)}, (3, 16)),
    "whisper": ("WhisperForConditionalGeneration", "WhisperConfig",
                dict(S2S, vocab_size=64, num_mel_bins=8, max_source_positions=16,
                     max_target_positions=32, decoder_start_token_id=1, pad_token_id=0), QV,
                lambda b, s: {"input_features": torch.randn(b, 8, 32),
                              "decoder_input_ids": ids(b, s)}, (3, 6)),
    "vit": ("ViTForImageClassification", "ViTConfig",
            dict(T, image_size=16, patch_size=4, num_channels=3), QV,
            lambda b, s: {"pixel_values": torch.randn(b, 3, 16, 16)}, (5, 0)),
    "wav2vec2": ("Wav2Vec2ForCTC", "Wav2Vec2Config", SPEECH, QV,
                 lambda b, s: {"input_values": torch.randn(b, 100 * s)}, (3, 12)),
    "hubert": ("HubertForCTC", "HubertConfig", SPEECH, QV,
               lambda b, s: {"input_values": torch.randn(b, 100 * s)}, (3, 12)),
    # decoders
    "falcon": ("FalconForCausalLM", "FalconConfig",
               dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
               ["*.query_key_value"], lm, (5, 11)),
    "gpt-neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", DEC, ["*.query_key_value"], lm,
                 (5, 11)),
    "gptj": ("GPTJForCausalLM", "GPTJConfig",
             dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4),
             QV, lm, (5, 11)),
    "bloom": ("BloomForCausalLM", "BloomConfig",
              dict(vocab_size=64, hidden_size=32, n_layer=2, n_head=4), ["*.query_key_value"],
              lm, (5, 11)),
    "starcoder2": ("Starcoder2ForCausalLM", "Starcoder2Config", DEC, QV, lm, (5, 11)),
    "cohere": ("CohereForCausalLM", "CohereConfig", DEC, QV, lm, (5, 11)),
    "olmo": ("OlmoForCausalLM", "OlmoConfig", DEC, QV, lm, (5, 11)),
    "stablelm": ("StableLmForCausalLM", "StableLmConfig", DEC, QV, lm, (5, 11)),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(DEC, head_dim=8), QV, lm, (5, 11)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(DEC, head_dim=8), QV, lm, (5, 11)),
    "phi": ("PhiForCausalLM", "PhiConfig", DEC, QV, lm, (5, 11)),
    "mamba": ("MambaForCausalLM", "MambaConfig",
              dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8,
                   expand=2, conv_kernel=4), ["*.in_proj", "*.x_proj"], lm, (5, 11)),
    # MoE decoders
    "qwen3-moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(MOE, head_dim=8), QV, lm,
                  (5, 11)),
    "deepseek-v3": ("DeepseekV3ForCausalLM", "DeepseekV3Config",
                    dict(DEC, num_key_value_heads=4, moe_intermediate_size=32,
                         n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                         q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
                         qk_nope_head_dim=4, v_head_dim=8, first_k_dense_replace=1),
                    ["*.q_b_proj", "*.kv_b_proj"], lm, (5, 11)),
    # encoders
    "xlm-roberta": ("XLMRobertaForSequenceClassification", "XLMRobertaConfig",
                    dict(T, vocab_size=64, max_position_embeddings=64), ["*.query", "*.value"],
                    text, (5, 11)),
    "albert": ("AlbertForSequenceClassification", "AlbertConfig",
               dict(T, vocab_size=64, embedding_size=16), ["*.query", "*.value"], text,
               (5, 11)),
    "mpnet": ("MPNetForSequenceClassification", "MPNetConfig", dict(T, vocab_size=64),
              ["*.attn.q", "*.attn.v"], text, (5, 11)),
    "convbert": ("ConvBertForSequenceClassification", "ConvBertConfig",
                 dict(T, vocab_size=64, embedding_size=32), ["*.query", "*.value"], text,
                 (5, 11)),
    # encoder-decoders
    "mt5": ("MT5ForConditionalGeneration", "MT5Config",
            dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                 num_heads=4, decoder_start_token_id=0), ["*.q", "*.v"], seq2seq, (5, 11)),
    "pegasus": ("PegasusForConditionalGeneration", "PegasusConfig", S2S, QV, seq2seq, (5, 11)),
    "marian": ("MarianMTModel", "MarianConfig",
               dict(S2S, decoder_start_token_id=63, pad_token_id=63), QV, seq2seq, (5, 11)),
    # vision
    "deit": ("DeiTForImageClassification", "DeiTConfig",
             dict(T, image_size=16, patch_size=4, num_channels=3), QV,
             image, (5, 0)),
    "beit": ("BeitForImageClassification", "BeitConfig",
             dict(T, image_size=16, patch_size=4, num_channels=3), QV,
             image, (5, 0)),
    "swin": ("SwinForImageClassification", "SwinConfig",
             dict(image_size=16, patch_size=2, num_channels=3, embed_dim=16, depths=[1, 1],
                  num_heads=[2, 2], window_size=4), QV, image, (5, 0)),
    "convnext": ("ConvNextForImageClassification", "ConvNextConfig",
                 dict(num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
                      layer_scale_init_value=1.0),
                 ["*.pwconv1", "*.pwconv2"], image, (5, 0)),
    "segformer": ("SegformerForSemanticSegmentation", "SegformerConfig",
                  dict(num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                       hidden_sizes=[16, 32], patch_sizes=[3, 3], strides=[2, 2],
                       num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=32),
                  QV, image, (5, 0)),
    # multimodal
    "clip": ("CLIPModel", "CLIPConfig", dict(text_config=TEXT_TOWER, vision_config=VISION_TOWER,
                                             projection_dim=32), QV, image_text, (5, 7)),
    "siglip": ("SiglipModel", "SiglipConfig",
               dict(text_config=TEXT_TOWER, vision_config=VISION_TOWER), QV, image_text, (5, 7)),
    "llava": ("LlavaForConditionalGeneration", "LlavaConfig",
              dict(vision_config=dict(VISION_TOWER, model_type="clip_vision_model"),
                   text_config=dict(DEC, model_type="llama"), image_token_index=63,
                   vision_feature_layer=-1),
              ["*.language_model.*.q_proj", "*.language_model.*.v_proj"], llava, (5, 11)),
}


KINDS = {
    "decoder": ["gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi", "phi3",
                "opt", "falcon", "gpt-neox", "gptj", "bloom", "starcoder2", "cohere", "olmo",
                "stablelm", "mamba"],
    "MoE decoder": ["qwen2-moe", "qwen3-moe", "mixtral", "deepseek-v3"],
    "encoder": ["bert", "roberta", "xlm-roberta", "distilbert", "deberta-v2", "electra", "albert",
                "mpnet", "convbert", "funnel"],
    "encoder-decoder": ["t5", "mt5", "bart", "pegasus", "marian", "led"],
    "vision": ["vit", "deit", "beit", "swin", "convnext", "segformer"],
    "speech": ["whisper", "wav2vec2", "hubert"],
    "multimodal": ["clip", "siglip", "llava"],
}
KIND = {n: k for k, names in KINDS.items() for n in names}
assert sorted(KIND) == sorted(FAMILIES), set(KIND) ^ set(FAMILIES)

# Where a stage fails, or a family needs a choice, because of PyTorch, transformers or PEFT (the
# base model, without capaboost_fx, fails the same way): the stage, the cause, and the upstream
# threads that explain it. Rendered in the table's Notes column and in the JSON (`upstream`).
UPSTREAM: dict[str, dict] = {
    "led": {
        "stage": "onnx",
        "cause": "plain `torch.onnx.export` of the base LED fails the same way: torch.export "
                 "cannot trace LED's data-dependent code (`_chunk`'s view on a data-dependent "
                 "size; with `config.onnx_export=True`, `if is_global_attn:` on an `.item()`); "
                 "the TorchScript exporter, which needs no torch.export and which `export_onnx` "
                 "tries by itself, writes a graph that fails verification (max abs diff "
                 "5.3e-4 at the example, 2026-12-06), so no file is written and the error "
                 "points at `_chunk`'s line, not at another option",
        "links": ["https://github.com/huggingface/transformers/pull/33694",
                  "https://github.com/huggingface/transformers/pull/46169"],
    },
    "mamba": {
        "stage": "peft",
        "cause": "PEFT refuses LoRA on Mamba's `out_proj` and `conv1d` (its fused CUDA kernel "
                 "reads those weights directly), so both sides target `in_proj` and `x_proj`",
        "links": ["https://github.com/huggingface/peft/issues/2556",
                  "https://github.com/huggingface/peft/pull/2562"],
    },
}

# Why a family takes the eager path (capture="auto" falls back when torch.export cannot trace
# the model's own code; plain torch.export of the base model fails the same way), with the
# upstream threads about it.
EAGER_WHY = {
    "led": ("torch.export cannot trace LED's data-dependent code: `_chunk`'s view on a "
            "data-dependent size, and `if is_global_attn:` on an `.item()` of its mask",
            ["https://github.com/huggingface/transformers/pull/33694"]),
    "wav2vec2": ("SpecAugment's numpy masking (`_compute_mask_indices`) and random LayerDrop "
                 "in train mode", ["https://github.com/huggingface/transformers/issues/22849",
                                   "https://github.com/huggingface/transformers/issues/10459"]),
    "hubert": ("SpecAugment's numpy masking (`_compute_mask_indices`) and random LayerDrop in "
               "train mode", ["https://github.com/huggingface/transformers/issues/22849"]),
}


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)  # torch.onnx's colors


def _first(err: BaseException) -> str:
    lines = [ln.strip() for ln in _plain(str(err)).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:160]


def _out(o):
    return o.logits if hasattr(o, "logits") else o[0]


def _loss(o) -> torch.Tensor:
    loss = getattr(o, "loss", None)
    return loss if loss is not None else _out(o).float().pow(2).mean()


def _base_check(stage: str, model, example: dict) -> str:
    """The same stage on the base model without capaboost_fx: plain torch.export (transform)
    or plain torch.onnx.export (onnx). Says whether a failure is upstream's."""
    try:
        with tempfile.TemporaryDirectory() as d:
            if stage == "onnx":
                torch.onnx.export(model.eval(), (), str(Path(d) / "base.onnx"), kwargs=example,
                                  dynamo=True, verbose=False)
            else:
                torch.export.export(model, (), example, strict=False)
        return "base model ok"
    except Exception as e:  # noqa: BLE001
        return f"base model fails too: {_first(e)}"


def run_family(name: str) -> dict:
    import transformers

    model_cls, config_cls, cfg, targets, inputs, other = FAMILIES[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**cfg)).eval()
    example, call = inputs(2, 8), inputs(*other)
    row: dict = {"family": name, "kind": KIND[name], "model": model_cls, "targets": targets}
    spec = cbx.Spec(targets=targets, rank=4, num_masks=2, density=0.5)
    serve = {k: v for k, v in example.items() if k != "labels"}  # the serving call
    stage = "transform"
    try:
        t0 = time.perf_counter()
        tm = cbx.transform(model, spec, example_kwargs=example)
        row["transform"] = f"ok ({tm.capture_info.capture}, {time.perf_counter() - t0:.1f}s)"
        if tm.capture_info.eager_reason:
            row["eager_reason"] = str(tm.capture_info.eager_reason)[:300]
        stage = "train"
        tm.train()
        _loss(tm(**call)).backward()
        row["train"] = "ok" if any(a.A.grad is not None for a in cbx.adapters(tm).values()) \
            else "no gradient"
        stage = "fold"
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for a in cbx.adapters(tm).values():
                a.B.copy_(torch.randn(a.B.shape, generator=g) * 0.1)
        tm.eval()
        folded = cbx.fold(tm, example_kwargs=serve)
        with torch.no_grad():
            diff = (_out(folded(**serve)) - _out(tm(**serve))).abs().max().item()
            acting = (_out(tm(**serve)) - _out(model(**serve))).abs().max().item()
        row["fold"] = f"ok ({diff:.1e})" if diff < 1e-4 and acting > 1e-5 else \
            f"differs ({diff:.1e}, adapters act {acting:.1e})"
        stage = "onnx"
        with tempfile.TemporaryDirectory() as d:
            report = cbx.export_onnx(folded, Path(d) / "m.onnx", example_kwargs=serve)
        # Verified at two sizes (batch and sequence changed where dynamic); a dim the file
        # fixes though the model runs at other sizes is said as such (issue 31).
        sizes = len(report.verified_shapes)
        row["onnx"] = (f"fixed sizes ({report.fixed_dims}; {report.max_abs_diff:.1e})"
                       if report.fixed_dims else
                       f"ok ({report.max_abs_diff:.1e}, {sizes} sizes, {report.optimize})"
                       if sizes > 1 else
                       f"one size ({report.max_abs_diff:.1e}: {report.verify_notes[-1][:80]})")
        row["onnx_kind"] = report.optimize
    except Exception as e:  # noqa: BLE001 - the table reports every failure
        row[stage] = _first(e)
        row.setdefault("trace", traceback.format_exc(limit=3)[-800:])
        if stage in ("transform", "onnx"):
            row["base"] = _base_check(stage, model, serve if stage == "onnx" else example)
    try:
        from peft import LoraConfig, get_peft_model

        names = sorted(n for n, _ in model.named_modules()  # the same modules, by full name
                       if any(cbx.spec.pattern_matches(p, n) for p in targets))
        lora = get_peft_model(getattr(transformers, model_cls)(
            getattr(transformers, config_cls)(**cfg)), LoraConfig(r=4, target_modules=names))
        lora.train()
        _loss(lora(**call)).backward()
        row["peft"] = "ok"
    except Exception as e:  # noqa: BLE001
        row["peft"] = _first(e)
    if name in UPSTREAM:
        row["upstream"] = UPSTREAM[name]
    return row


STAGES = ["transform", "train", "fold", "onnx", "peft"]
COMMAND = "python benchmarks/families.py"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated family names (a subset: printed, "
                   "nothing written)")
    p.add_argument("--out", default=str(RESULTS / "families.json"))
    p.add_argument("--render", action="store_true", help="rewrite docs/compatibility.md from "
                   "the JSON already measured (notes refreshed from UPSTREAM), run nothing")
    a = p.parse_args(argv)
    if a.render:
        data = json.loads(Path(a.out).read_text())
        for r in data["rows"]:
            r.pop("upstream", None)
            if r["family"] in UPSTREAM:
                r["upstream"] = UPSTREAM[r["family"]]
        write_json(a.out, data)
        DOC.write_text(render(data["rows"], data["passed"], data), encoding="utf-8")
        print(f"wrote {a.out} and {DOC}")
        return data
    warnings.simplefilter("ignore")
    torch.set_num_threads(THREADS)
    names = [n for n in a.only.split(",") if n] or [n for ns in KINDS.values() for n in ns]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        p.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    info = machine()
    t_start = time.perf_counter()
    rows = []
    for n in names:
        t0 = time.perf_counter()
        rows.append(run_family(n))
        rows[-1]["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "trace"}), flush=True)
    print(table(["family", *STAGES], [[r["family"], *(r.get(s, "—") for s in STAGES)]
                                      for r in rows]))
    ok = {s: sum(str(r.get(s, "")).startswith("ok") for r in rows) for s in STAGES}
    print(" | ".join(f"{s}: {ok[s]}/{len(rows)}" for s in STAGES))
    data = {"command": COMMAND, "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "seconds": round(time.perf_counter() - t_start), "families": len(rows),
            "passed": ok, "machine": info, "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "rows": rows}
    if not a.only:
        write_json(a.out, data)
        DOC.write_text(render(rows, ok, data), encoding="utf-8")
        print(f"wrote {a.out} and {DOC}")
    return data


DOC = Path(__file__).resolve().parents[1] / "docs" / "compatibility.md"
STAGE_TITLES = {
    "transform": "transform (`capture=\"auto\"`: the path taken)",
    "train": "train (one step at another batch/sequence where the model allows)",
    "fold": "fold (folded == training module in eval, adapters acting)",
    "onnx": "ONNX export of the folded model (default options), verified in onnxruntime at "
            "two sizes; \"fixed sizes\": a batch/sequence dim the file fixes though the model "
            "runs at other sizes",
    "peft": "PEFT LoRA on the same modules (forward + backward): the reference",
}


def _links(urls: list[str]) -> str:
    """[owner/repo#N](url), ...: the upstream threads, by their GitHub names."""
    out = []
    for u in urls:
        owner, repo, _, num = u.rstrip("/").split("/")[-4:]
        out.append(f"[{repo}#{num}]({u})")
    return ", ".join(out)


def _notes(r: dict) -> str:
    notes = []
    if r.get("eager_reason"):
        why, links = EAGER_WHY.get(r["family"], (r["eager_reason"], []))
        notes.append(f"eager path: {why}" + (f" ({_links(links)})" if links else ""))
    if r.get("base"):
        notes.append(_plain(r["base"]).split(". ")[0])
    up = r.get("upstream")
    if up:
        links = _links(up.get("links", []))
        notes.append(f"{up['stage']}: {up['cause']}" + (f" ({links})" if links else ""))
    return "; ".join(notes).replace("|", "\\|")


def _kinds() -> str:
    return ", ".join(f"{len(v)} {k}{'s' if k.endswith(('coder', 'encoder')) else ''}"
                     for k, v in KINDS.items())


def render(rows: list[dict], ok: dict, data: dict) -> str:
    """docs/compatibility.md: the table as measured, with the command that made it."""
    m = data["machine"]
    cpu = m.get("lscpu Model name", m.get("platform", "?"))
    n = len(rows)
    lines = [
        "# Compatibility: model families",
        "",
        f"{n} Hugging Face families ({_kinds()}), "
        "each built from a small config (hidden size 32 or so, 2 layers, random weights; no "
        "download) and taken through the stages a user runs, beside PEFT LoRA on the same "
        "modules. A failed stage shows its error's first line; the Notes column says why, and "
        "where the cause is in PyTorch, transformers or PEFT (the base model fails the same "
        "way without capaboost_fx) it links the upstream thread.",
        "",
        f"- **Command**: `{data['command']}` (all families, about {data['seconds'] // 60 + 1} "
        "minutes here; `--only bert,t5` prints a subset and writes nothing). It writes this page "
        "and `benchmarks/results/families.json` (every row, with tracebacks of failures).",
        f"- **Date**: {data['date']}.",
        f"- **Conditions**: torch {data['torch']}, transformers {data['transformers']}, PEFT "
        f"{m.get('peft')}, onnxruntime {m.get('onnxruntime')}, onnx {m.get('onnx')}, "
        f"onnxscript {m.get('onnxscript')}; Python {m.get('python')}; {cpu}, "
        f"{m.get('nproc')} cores, {THREADS} torch threads, load average "
        f"{(m.get('loadavg_at_start') or ['?'])[0]} at the start (a machine shared with other "
        "jobs: seconds are indicative only).",
        "- **Spec**: rank 4, 2 masks, density 0.5; the adapters' B set to N(0, 0.1²) before "
        "fold so that they act. Example batch 2 × 8 tokens (images 16 × 16, audio 800 "
        "samples); the training step runs at another batch and sequence (e.g. 5 × 11).",
        "",
        "| stage | capaboost_fx | PEFT (reference) |",
        "| --- | ---: | ---: |",
    ]
    for s in STAGES[:-1]:
        ref = f"{ok['peft']} / {n}" if s == "train" else "—"
        lines.append(f"| {STAGE_TITLES[s]} | {ok[s]} / {n} | {ref} |")
    fixed = [r["family"] for r in rows if str(r.get("onnx", "")).startswith("fixed sizes")]
    failed = [r["family"] for r in rows
              if not str(r.get("onnx", "")).startswith(("ok", "fixed sizes", "one size"))]
    lines += [
        "",
        f"ONNX: {ok['onnx']} of {n} files verified at two sizes with their batch and sequence "
        f"dims dynamic; fixed sizes ({len(fixed)}): {', '.join(fixed) or 'none'} (the file "
        "fixes a dim the PyTorch model runs at other sizes of, and says so: `export_onnx` "
        "warns and `open_session` refuses other sizes with that message); no file "
        f"({len(failed)}): {', '.join(failed) or 'none'}. The file's exporter is in the cell "
        "(`torchscript`, `torchscript+ort`: the TorchScript exporter's graph, plain or "
        "optimized by onnxruntime; `ort`/`none`: the dynamo exporter's, fused or plain).",
    ]
    lines += [
        "",
        "PEFT's column is the bar: one LoRA training step (forward + backward) at the same "
        "batch/sequence as capaboost_fx's training step. PEFT has no fold-and-export stage of "
        "its own to compare with (its `merge_and_unload` gives back the eager model).",
        "",
        "| kind | family | model | transform | train | fold | ONNX | PEFT | Notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = [re.sub(r"/tmp/\S+/", "", str(r.get(s, "—"))).replace("|", "\\|")
                 for s in STAGES]
        lines.append(f"| {r['kind']} | {r['family']} | `{r['model']}` | " + " | ".join(cells)
                     + f" | {_notes(r)} |")
    lines += [
        "",
        "Numbers in a passed cell: transform's path and seconds; fold's largest difference "
        "between the folded model and the training module (eval); ONNX's largest difference "
        "between onnxruntime and PyTorch on the folded model.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
