#!/usr/bin/env bash
# The main job: set up (idempotent), then fine-tune the pretrained MiniLM-L6 on SST-2 with
# LoRA and CapaBoost side by side, fold, export to ONNX, serve with onnxruntime, write a report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/capaboost-fx demo "$@"
