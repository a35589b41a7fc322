"""ONNX deployment: export, verify, optimize, compare and serve (onnxruntime).

| module | what |
| --- | --- |
| `export` | `export_onnx`, `ExportOptions`: make → check → choose → commit |
| `options`, `candidates`, `exporters` | the example call, the candidate graphs (dynamo, TorchScript), their checks |
| `failure` | a failed export as a short `ExportError`: the op, the module, the model's line |
| `verify` | `verify_onnx`: onnxruntime vs PyTorch at two shapes and two optimization levels |
| `stats` | `onnx_stats`, `compare_onnx`: one implementation of ONNX file statistics |
| `runtime` | `open_session` (honest provider choice), `measure_latency` (the one latency timer) |
| `optimize` | `fuse_for_ort`, `quantize_int8` |
| `shapes` | `auto_dynamic_shapes`, `axis_names` (``batch``, ``sequence``) |
| `genai` | `export_genai`: decoder LLMs via onnxruntime-genai (optional; import it directly) |
| `multi_lora` | `export_onnx(train_model, path, multi_lora=True)`: one base, fine-tunes as `.onnx_adapter` files switched per run (`save_onnx_adapter`, `load_onnx_adapter`, `MultiLoraSession`) |
| `genai_multi_lora` | `export_genai_multi_lora`: the same slots in an onnxruntime-genai folder, adapters per generator |

Example::

    from capaboost_fx.onnx import export_onnx, open_session, measure_latency
    rep = export_onnx(deploy, "model.onnx", example_kwargs=batch)       # fused, verified
    sess = open_session("model.onnx", intra_op_num_threads=2)
    measure_latency(sess, batch, runs=20).median_ms
"""

from __future__ import annotations

from capaboost_fx.onnx.export import (
    EXTERNAL_DATA_THRESHOLD,
    ExportOptions,
    ExportReport,
    export_onnx,
)
from capaboost_fx.onnx.optimize import fuse_for_ort, quantize_int8
from capaboost_fx.onnx.runtime import (
    Session,
    cuda_usable,
    open_session,
    resolve_providers,
    synthesize_inputs,
)
from capaboost_fx.onnx.shapes import auto_dynamic_shapes, axis_names
from capaboost_fx.onnx.stats import CompareReport, OnnxStats, compare_onnx, onnx_stats
from capaboost_fx.onnx.timing import LatencyStats, measure_latency
from capaboost_fx.onnx.verify import VerifyResult, verify_onnx

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "CompareReport",
    "ExportOptions",
    "ExportReport",
    "LatencyStats",
    "OnnxStats",
    "Session",
    "VerifyResult",
    "auto_dynamic_shapes",
    "axis_names",
    "compare_onnx",
    "cuda_usable",
    "export_onnx",
    "fuse_for_ort",
    "measure_latency",
    "onnx_stats",
    "open_session",
    "quantize_int8",
    "resolve_providers",
    "synthesize_inputs",
    "verify_onnx",
]
