"""Run exported ONNX models with onnxruntime, on the GPU when one is really there, and time them.

`open_session` wraps `onnxruntime.InferenceSession` and makes the execution provider an explicit,
recorded choice:

- ``providers="auto"`` takes ``CUDAExecutionProvider`` when the installed onnxruntime has it and
  a GPU is present, the CPU otherwise (quietly: that is what "auto" means), and logs which one
  it took.
- ``providers="cuda"`` (or a list naming ``CUDAExecutionProvider``) where CUDA cannot run falls
  back to the CPU *with a warning*, and so does "auto" when a GPU is there but onnxruntime
  cannot start CUDA on it (missing CUDA/cuDNN libraries). onnxruntime itself falls back
  silently, so a "GPU benchmark" can quietly measure the CPU; we compare what was asked for
  with what the session reports.

`Session.providers` is what the session actually runs on; reports quote it.

`capaboost_fx.onnx.timing.measure_latency` (which imports this module, not the other way round)
is the one way this project times onnxruntime (compare_onnx, the demo, the
benchmarks, examples/serve_onnx.py): several models run in interleaved rounds, the order rotated
every round, so that drift and other load hit them alike; `LatencyStats` summarises the rounds
with `statistics.quantiles`.

Installing: the CPU wheel is ``onnxruntime`` (``pip install capaboost-fx[onnx]``), the CUDA wheel
is ``onnxruntime-gpu`` (``pip install capaboost-fx[gpu]``). The two wheels install the same
``onnxruntime`` package and must not be installed together: whichever was installed last wins
file by file and the result can silently lack CUDA. Uninstall both, then install one.

Example::

    from capaboost_fx.onnx import open_session, measure_latency
    sess = open_session("model.onnx")                     # CUDA if usable, else CPU
    out = sess.run({"input_ids": ids, "attention_mask": mask})   # numpy or torch in
    out["logits"]                                          # numpy out, by output name
    measure_latency(sess, {"input_ids": ids, "attention_mask": mask}, runs=20).median_ms
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from capaboost_fx.errors import (
    ExportError,
    InputError,
    MissingDependencyError,
    OnnxFileNotFoundError,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CPU",
    "CUDA",
    "FIXED_DIMS_KEY",
    "Session",
    "cuda_usable",
    "open_session",
    "resolve_providers",
    "synthesize_inputs",
]

CPU = "CPUExecutionProvider"
# The ONNX metadata key under which export_onnx records dims it could not keep dynamic.
FIXED_DIMS_KEY = "capaboost_fx.fixed_dims"
CUDA = "CUDAExecutionProvider"

# Short names accepted for `providers`, besides full onnxruntime provider names.
_ALIASES = {
    "cpu": [CPU],
    "cuda": [CUDA, CPU],
    "gpu": [CUDA, CPU],
    "tensorrt": ["TensorrtExecutionProvider", CUDA, CPU],
}

_OPT_LEVELS = ("all", "extended", "basic", "disable")

# onnxruntime type strings -> numpy dtypes, for synthesising inputs and checking feeds.
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _ort():
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            "onnxruntime is not installed: pip install capaboost-fx[onnx] "
            "(or capaboost-fx[gpu] for onnxruntime-gpu; never both)"
        ) from e
    return onnxruntime


def cuda_usable() -> bool:
    """True when the installed onnxruntime has the CUDA provider and a CUDA GPU is visible.

    `onnxruntime-gpu` lists ``CUDAExecutionProvider`` even on machines without a GPU, so the
    provider list alone is not enough; we also ask torch (always installed with this library).

    Example::

        >>> isinstance(cuda_usable(), bool)
        True
    """
    if CUDA not in _ort().get_available_providers():
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # a broken CUDA torch must not stop CPU inference
        return False


def resolve_providers(providers: str | Sequence[str] = "auto") -> list[str]:
    """The provider list to request for `providers` ("auto", an alias, a name or a list).

    Example::

        >>> resolve_providers("cpu")
        ['CPUExecutionProvider']
    """
    if isinstance(providers, str):
        key = providers.lower()
        if key == "auto":
            return [CUDA, CPU] if cuda_usable() else [CPU]
        if key in _ALIASES:
            return list(_ALIASES[key])
        providers = [providers]
    requested = list(providers)
    if not requested:
        raise InputError("providers is empty; use 'auto', 'cpu', 'cuda' or provider names")
    known = _ort().get_all_providers()
    unknown = [p for p in requested if p not in known]
    if unknown:
        raise InputError(
            f"unknown onnxruntime provider(s) {unknown}; use 'auto', {sorted(_ALIASES)} or "
            f"names such as {[CUDA, CPU]}"
        )
    # A CPU fallback keeps ops that the GPU provider lacks runnable, as onnxruntime intends.
    if CPU not in requested:
        requested.append(CPU)
    return requested


@dataclass
class Session:
    """An onnxruntime session that takes inputs by name and returns outputs by name.

    `providers` is what onnxruntime actually uses (not what was asked for);
    `requested_providers` is what was asked for.
    """

    path: str
    inner: Any = field(repr=False)
    providers: list[str]
    requested_providers: list[str]
    input_names: list[str]
    output_names: list[str]

    graph_optimization_level: str = "all"

    @property
    def on_gpu(self) -> bool:
        """True when the session's first provider is not the CPU one."""
        return self.providers[0] != CPU

    def input_specs(self) -> list[tuple[str, str, list[int | str | None]]]:
        """(name, onnxruntime type string, shape with symbolic dims as str/None) per input."""
        return [(i.name, i.type, list(i.shape)) for i in self.inner.get_inputs()]

    def fixed_dims(self) -> dict[str, Any]:
        """What `export_onnx` wrote into the file about dims it fixes though the model runs at
        other sizes: ``{"dims": {input: {dim: size}}, "message": ...}``, or {}."""
        meta = self.inner.get_modelmeta().custom_metadata_map or {}
        text = meta.get(FIXED_DIMS_KEY)
        if not text:
            return {}
        try:
            return json.loads(text)
        except ValueError:
            return {}

    def check_feeds(self, feeds: Mapping[str, Any]) -> None:
        """Raise `InputError` when a feed's rank or a size the file fixes does not fit, naming
        the input and the dim (and, for a file `export_onnx` wrote, why the size is fixed and
        what to do) instead of onnxruntime's INVALID_ARGUMENT."""
        for name, _, shape in self.input_specs():
            value = feeds.get(name)
            got = getattr(value, "shape", None)
            if got is None:
                continue
            if len(got) != len(shape):
                raise InputError(f"{self.path}: input {name!r} has shape {list(got)}, the "
                                 f"file takes rank {len(shape)} {shape}")
            wrong = [(d, want, int(g)) for d, (want, g) in enumerate(zip(shape, got, strict=True))
                     if isinstance(want, int) and want >= 0 and int(g) != want]
            if wrong:
                d, want, g = wrong[0]
                why = self.fixed_dims().get("message") or (
                    "the file fixes this size; export the model at the size you serve, pad "
                    "requests to it, or export one file per size")
                raise InputError(f"{self.path}: input {name!r} dim {d} is {g}, but the file "
                                 f"accepts only {want} there (shape {shape}). {why}")

    def run(
        self, inputs: Mapping[str, Any] | Sequence[Any], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run once. `inputs`: dict by input name, or a list in input order; numpy or torch.

        Example::

            out = sess.run({"input_ids": np.ones((2, 8), np.int64)})
            out["logits"].shape
        """
        if isinstance(inputs, Mapping):
            missing = [n for n in self.input_names if n not in inputs]
            extra = [n for n in inputs if n not in self.input_names]
            if missing or extra:
                raise InputError(
                    f"{self.path}: inputs do not fit the model; missing {missing}, "
                    f"unexpected {extra}; the model takes {self.input_names}"
                )
            feeds = {n: _to_numpy(inputs[n], n) for n in self.input_names}
        else:
            values = list(inputs)
            if len(values) != len(self.input_names):
                raise InputError(
                    f"{self.path}: got {len(values)} positional inputs, the model takes "
                    f"{len(self.input_names)}: {self.input_names}"
                )
            feeds = {n: _to_numpy(v, n) for n, v in zip(self.input_names, values, strict=True)}
        self.check_feeds(feeds)
        names = list(output_names) if output_names is not None else self.output_names
        results = self.inner.run(names, feeds)
        return dict(zip(names, results, strict=True))


def _to_numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
            raise InputError(f"input {name!r} is bfloat16, which numpy cannot hold; cast it first")
        return value.detach().cpu().numpy()
    if np.isscalar(value):
        return np.asarray(value)
    raise InputError(f"input {name!r} is a {type(value).__name__}; pass a numpy array or tensor")


def _session_options(ort: Any, level: str, optimized_model_path: Any, intra: int | None,
                     inter: int | None, sequential: bool,
                     config: Mapping[str, str] | None) -> Any:
    """``onnxruntime.SessionOptions`` for `open_session`'s arguments."""
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[level]
    if optimized_model_path is not None:
        options.optimized_model_filepath = os.fspath(optimized_model_path)
    if intra is not None:
        options.intra_op_num_threads = int(intra)
    if inter is not None:
        options.inter_op_num_threads = int(inter)
    if sequential:
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    for key, value in (config or {}).items():
        options.add_session_config_entry(str(key), str(value))
    return options


def open_session(
    path: str | os.PathLike,
    providers: str | Sequence[str] = "auto",
    graph_optimization_level: str = "all",
    optimized_model_path: str | os.PathLike | None = None,
    intra_op_num_threads: int | None = None,
    *,
    inter_op_num_threads: int | None = None,
    sequential: bool = False,
    session_config: Mapping[str, str] | None = None,
) -> Session:
    """Open `path` in onnxruntime on the best usable provider and record which one it took.

    Args:
        path: the .onnx file (external data files next to it are found by onnxruntime).
        providers: "auto" (CUDA when usable, else CPU), "cpu", "cuda", "tensorrt", a provider
            name or a list of names. Asking for CUDA where it cannot run warns and uses the CPU.
        graph_optimization_level: "all", "extended", "basic" or "disable".
        optimized_model_path: where onnxruntime writes the graph after its optimisations.
        intra_op_num_threads: threads per operator (None: onnxruntime's default).
        inter_op_num_threads: threads across operators (None: onnxruntime's default).
        sequential: run operators one after another (``ORT_SEQUENTIAL``), the steadiest timing.
        session_config: extra ``SessionOptions.add_session_config_entry`` pairs, e.g.
            ``{"session.intra_op.allow_spinning": "0"}`` when sessions take turns on few cores.

    Example::

        sess = open_session("model.onnx", providers="cpu", graph_optimization_level="basic")
        sess.providers   # ['CPUExecutionProvider']
    """
    ort = _ort()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise OnnxFileNotFoundError(
            f"ONNX file not found: {path}; check the path (export it first with capaboost_fx.export_onnx)."
        )
    if graph_optimization_level not in _OPT_LEVELS:
        raise InputError(
            f"graph_optimization_level={graph_optimization_level!r}; use one of {_OPT_LEVELS}"
        )
    requested = resolve_providers(providers)
    available = ort.get_available_providers()
    # Filter ourselves: onnxruntime would drop unknown providers with only a log line.
    usable = [p for p in requested if p in available and (p != CUDA or cuda_usable())]
    if CPU not in usable:
        usable.append(CPU)

    options = _session_options(ort, graph_optimization_level, optimized_model_path,
                               intra_op_num_threads, inter_op_num_threads, sequential,
                               session_config)
    # Keep onnxruntime's own provider warnings out of the user's log: we report fallbacks.
    options.log_severity_level = 3
    try:
        with warnings.catch_warnings():
            # onnxruntime's own "provider not available" warning; ours below says more.
            warnings.filterwarnings(
                "ignore", message=".*Specified provider.*", category=UserWarning
            )
            inner = ort.InferenceSession(path, sess_options=options, providers=usable)
    except Exception as e:
        raise ExportError(f"onnxruntime cannot load {path}: {e}") from e

    taken = list(inner.get_providers())
    # Checked after loading too: onnxruntime can still drop a provider it listed (missing
    # CUDA/cuDNN libraries), and says nothing about it.
    lost = [p for p in requested if p != CPU and p not in taken]
    if lost:
        message = (
            f"{path}: asked for {lost} but {_why_unavailable(lost, available)}; running on {taken}"
        )
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    logger.info("onnxruntime session for %s runs on %s (asked for %s)", path, taken, requested)
    return Session(
        path=path,
        inner=inner,
        providers=taken,
        requested_providers=requested,
        input_names=[i.name for i in inner.get_inputs()],
        output_names=[o.name for o in inner.get_outputs()],
        graph_optimization_level=graph_optimization_level,
    )


def _why_unavailable(lost: list[str], available: list[str]) -> str:
    if CUDA in lost and CUDA not in available:
        return (
            "the installed onnxruntime has no CUDA provider "
            "(install onnxruntime-gpu in place of onnxruntime)"
        )
    if CUDA in lost and not cuda_usable():
        return "no CUDA GPU is visible"
    return f"onnxruntime could not start them (available: {available})"


def synthesize_inputs(
    session: Session, batch_size: int = 1, seq_len: int = 128, seed: int = 0
) -> dict[str, np.ndarray]:
    """Inputs that fit `session`'s graph: symbolic dim 0 -> batch_size, other symbolic -> seq_len.

    Integer inputs are ones (a valid token id, attention mask and token type in every
    vocabulary), booleans True, floats seeded standard normal. Good for timing, not for accuracy.

    Example::

        feeds = synthesize_inputs(sess, batch_size=8, seq_len=128)
        sess.run(feeds)
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, type_str, shape in session.input_specs():
        dims = [
            d if isinstance(d, int) and d >= 0 else (batch_size if i == 0 else seq_len)
            for i, d in enumerate(shape)
        ]
        dtype = _ORT_TYPES.get(type_str)
        if dtype is None:
            raise InputError(f"{session.path}: cannot synthesise input {name!r} of type {type_str}")
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(dims).astype(dtype)
        elif dtype is np.bool_:
            feeds[name] = np.ones(dims, dtype=bool)
        else:
            feeds[name] = np.ones(dims, dtype=dtype)
    return feeds

