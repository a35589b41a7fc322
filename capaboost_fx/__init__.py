"""capaboost_fx: CapaBoost (masked shared low-rank adapters) as torch.fx compiler passes.

    import capaboost_fx as cbx
    spec = cbx.Spec(targets=["*.query", "*.value"], rank=8, num_masks=2, density=0.5)
    train_model = cbx.transform(model, spec, example_inputs=(input_ids,))
    ...train...
    deploy_model = cbx.fold(train_model)   # original architecture, merged weights
"""

from __future__ import annotations

from ._version import __version__
from .adapter import AdapterSite, CapaBoostAdapter
from .analysis import rank_report
from .api import InspectReport, inspect, load_adapter, save_adapter, transform
from .errors import (
    AdapterFileError,
    AdapterFileNotFoundError,
    AdapterMismatchError,
    AlreadyTransformedError,
    CapaBoostError,
    CapaBoostWarning,
    CaptureError,
    CollectiveError,
    ExportError,
    FileWriteError,
    FoldError,
    ForwardError,
    ForwardInputError,
    ForwardLookupError,
    ForwardTypeError,
    ForwardValueError,
    InputError,
    MissingDependencyError,
    NotTransformedError,
    OnnxFileNotFoundError,
    SpecError,
    SpecTypeError,
    TargetError,
    TargetNotFoundError,
    UncapturableError,
    VerificationError,
)
from .executors import FoldPlan
from .fold import adapters, delta_weights, fold, merged_state_dict
from .io import read_header
from .masks import mask_kinds, mask_scope, register_mask
from .model import CapaBoostModel, CaptureInfo, FoldedModel
from .onnx import (
    CompareReport,
    ExportOptions,
    ExportReport,
    compare_onnx,
    export_onnx,
    verify_onnx,
)
from .onnx.multi_lora import (
    MultiLoraReport,
    MultiLoraSession,
    load_onnx_adapter,
    lora_slots,
    onnx_adapter_tensors,
    read_onnx_adapter,
    save_onnx_adapter,
)
from .peft_export import to_peft_lora
from .spec import Spec
from .weights import load_base_weights

__all__ = [
    "Spec",
    "transform",
    "inspect",
    "adapters",
    "delta_weights",
    "fold",
    "load_base_weights",
    "merged_state_dict",
    "save_adapter",
    "load_adapter",
    "read_header",
    "register_mask",
    "mask_scope",
    "rank_report",
    "to_peft_lora",
    "save_onnx_adapter",
    "load_onnx_adapter",
    "read_onnx_adapter",
    "onnx_adapter_tensors",
    "lora_slots",
    "MultiLoraSession",
    "MultiLoraReport",
    "export_onnx",
    "verify_onnx",
    "compare_onnx",
    "ExportOptions",
    "ExportReport",
    "CompareReport",
    "mask_kinds",
    "CapaBoostModel",
    "CaptureInfo",
    "FoldPlan",
    "FoldedModel",
    "AdapterSite",
    "CapaBoostAdapter",
    "InspectReport",
    "CapaBoostError",
    "CapaBoostWarning",
    "CollectiveError",
    "SpecError",
    "SpecTypeError",
    "TargetNotFoundError",
    "TargetError",
    "CaptureError",
    "UncapturableError",
    "InputError",
    "ForwardError",
    "ForwardInputError",
    "ForwardValueError",
    "ForwardTypeError",
    "ForwardLookupError",
    "MissingDependencyError",
    "NotTransformedError",
    "OnnxFileNotFoundError",
    "AlreadyTransformedError",
    "FoldError",
    "AdapterFileError",
    "AdapterFileNotFoundError",
    "AdapterMismatchError",
    "ExportError",
    "FileWriteError",
    "VerificationError",
    "__version__",
]

