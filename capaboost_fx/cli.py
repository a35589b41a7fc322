"""Command line: ``capaboost-fx <command> ...`` (also ``python -m capaboost_fx.cli``).

Commands:

- ``export --model MODEL --out FILE.onnx``: export and verify a model. MODEL is
  ``package.module:factory`` or ``path/to/file.py:factory`` (a callable returning
  ``(model, example_inputs)`` or ``(model, example_inputs, example_kwargs)``; a dict as second
  item is taken as keyword inputs), or a Hugging Face model directory (loaded offline, fed
  random token ids or pixels). ``--optimize auto|ort|none|fastest|torchscript|torchscript+ort``
  (default auto: the TorchScript exporter's graph where it verifies, the dynamo exporter's
  fused graph for generative models or as the fallback; ort: onnxruntime fusions on the
  dynamo graph; fastest: every exporter
  path verified and timed, the fastest written),
  ``--quantize int8`` (dynamic int8).
- ``onnx-adapter --model MODEL --adapter ADAPTER --out FILE.onnx_adapter [--base BASE.onnx]``:
  a fine-tune as an onnxruntime adapter file for a multi-LoRA base (``export --multi-lora``).
- ``compare BASE FOLDED``: node counts, operators, initializers, size and onnxruntime latency of
  two ONNX files as a Markdown table; ``--json`` writes the full report.

Exit codes: 0 success, 1 a failure the library reports (printed as ``error: <message>``, no
traceback), 2 bad command line (argparse).

Adding a command: write ``_add_<name>_args(parser)`` and ``_cmd_<name>(args) -> int`` and add one
entry to `COMMANDS`; `_build_parser` picks it up.

Example::

    capaboost-fx export --model my_project.models:folded_bert --out folded.onnx
    capaboost-fx export --model path/to/hf_dir --out model.int8.onnx --quantize int8
    capaboost-fx compare base.onnx folded.onnx --runs 50 --json compare.json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from capaboost_fx.errors import CapaBoostError, ExportError, InputError


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, how it adds its arguments, and what it runs."""

    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------- export


def _load_factory(spec: str) -> Callable[[], Any]:
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        if os.path.isfile(spec):
            raise InputError(
                f"--model {spec!r} is a file; give a Hugging Face model directory, or "
                f"{spec}:FACTORY naming a function in it that returns (model, example_inputs)"
            )
        raise InputError(
            f"--model {spec!r}: no such directory (relative to {os.getcwd()}); expected "
            "module:factory, file.py:factory, or a Hugging Face model directory (loaded "
            "offline: save a hub model with save_pretrained first)"
        )
    try:
        if module_part.endswith(".py") or os.sep in module_part:
            if not os.path.isfile(module_part):
                raise InputError(f"--model {spec!r}: file {module_part} not found")
            name = f"_capaboost_cli_{os.path.splitext(os.path.basename(module_part))[0]}"
            loader_spec = importlib.util.spec_from_file_location(name, module_part)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            # A console script does not have the working directory on sys.path; `python -m` does.
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_part)
    except CapaBoostError:
        raise
    except Exception as e:
        raise InputError(
            f"--model {spec!r}: cannot import {module_part}: {type(e).__name__}: {e}"
        ) from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InputError(f"--model {spec!r}: {module_part} has no callable {attr!r}")
    return factory


def _from_factory(spec: str) -> tuple[Any, tuple, dict]:
    made = _load_factory(spec)()
    if not isinstance(made, tuple) or len(made) not in (2, 3):
        raise InputError(
            f"--model {spec!r}: the factory must return (model, example_inputs) or "
            f"(model, example_inputs, example_kwargs), got {type(made).__name__}"
        )
    model, inputs = made[0], made[1]
    kwargs = dict(made[2]) if len(made) == 3 and made[2] else {}
    if isinstance(inputs, dict):
        inputs, kwargs = (), {**inputs, **kwargs}
    elif not isinstance(inputs, tuple):
        inputs = (inputs,)
    return model, inputs, kwargs


def _from_hf_dir(path: str, batch_size: int, seq_len: int) -> tuple[Any, tuple, dict]:
    import torch

    try:
        import transformers
    except ImportError as e:
        raise InputError(f"--model {path}: loading a model directory needs transformers") from e
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        if hasattr(config, "use_cache"):
            config.use_cache = False  # a KV cache object is no ONNX output we can name
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        cls = cls or transformers.AutoModel
        model = cls.from_pretrained(path, config=config, local_files_only=True).eval()
    except Exception as e:
        raise InputError(f"--model {path}: cannot load a Hugging Face model: {e}") from e
    gen = torch.Generator().manual_seed(0)
    if hasattr(config, "image_size") and hasattr(config, "num_channels"):
        size = config.image_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        pixels = torch.randn(batch_size, config.num_channels, *size, generator=gen)
        return model, (), {"pixel_values": pixels}
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        raise InputError(f"--model {path}: cannot tell which inputs a {arch or 'model'} takes")
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
    return model, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="module:factory, file.py:factory, or a HF model directory"
    )
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime vs PyTorch check")
    p.add_argument(
        "--optimize",
        choices=("auto", "ort", "none", "fastest", "torchscript", "torchscript+ort"),
        default="auto",
        help="auto (default): the TorchScript exporter's plain graph where it makes one that "
        "verifies (not for generative models), else the dynamo exporter's fused graph "
        "(measured fastest: docs/deploy.md); "
        "ort: onnxruntime's transformer fusions on the dynamo exporter's graph (Attention, "
        "SkipLayerNormalization, BiasGelu, ...); none: the exporter's plain graph; fastest: make "
        "the dynamo and "
        "TorchScript exporters' graphs (plain and fused), verify and time each at the example "
        "batch, write the fastest; torchscript / torchscript+ort: pin one of those",
    )
    p.add_argument(
        "--quantize",
        choices=("int8",),
        default=None,
        help="int8: dynamic int8 quantization (onnxruntime quantize_dynamic); verification then "
        "reports max diff and argmax agreement instead of demanding 1e-4",
    )
    p.add_argument(
        "--batch-size", type=int, default=2, help="example batch for a model directory (>= 2)"
    )
    p.add_argument(
        "--seq-len", type=int, default=16, help="example sequence length for a model directory"
    )
    p.add_argument(
        "--json", default=None, metavar="FILE", help="also write the export report as JSON"
    )
    p.add_argument(
        "--multi-lora", action="store_true",
        help="write a multi-LoRA base: the unmerged model with each target's adapter as "
        "overridable initializers (--model a training module, or a base model with --adapter); "
        "serve fine-tunes on it with onnx-adapter files",
    )
    p.add_argument("--adapter", default=None,
                   help="with --multi-lora: the fine-tune whose adapters are the defaults "
                   "(a save_adapter file or save_pretrained directory)")


def _cmd_export(args: argparse.Namespace) -> int:
    from capaboost_fx.onnx import export_onnx

    if os.path.isdir(args.model):
        model, inputs, kwargs = _from_hf_dir(args.model, args.batch_size, args.seq_len)
    else:
        model, inputs, kwargs = _from_factory(args.model)
    if args.multi_lora:
        import capaboost_fx as cbx

        if args.adapter is not None:
            model = cbx.load_adapter(model, args.adapter, inputs, kwargs)
        ml = export_onnx(model, args.out, example_inputs=inputs, example_kwargs=kwargs,
                         opset=args.opset, optimize=args.optimize, multi_lora=True)
        print(f"wrote {ml.path}: multi-LoRA base, {len(ml.targets)} targets, "
              f"{len(ml.slots)} adapter slots; run without an adapter it matches the training "
              f"module within {ml.max_abs_diff:.3g}; fusions "
              + (", ".join(f"{k} {v}" for k, v in ml.export.fusions.items()) or "none"))
        if args.json:
            _write_json(args.json, ml.to_dict())
        return 0
    report = export_onnx(
        model,
        args.out,
        example_inputs=inputs,
        example_kwargs=kwargs,
        opset=args.opset,
        verify=not args.no_verify,
        optimize=args.optimize,
        quantize=args.quantize,
    )
    print(f"wrote {report.path} ({report.file_bytes:,} bytes, opset {report.opset})")
    print(
        f"  {report.node_count} nodes, {report.initializer_count} initializers "
        f"({report.initializer_bytes:,} bytes), export {report.export_seconds:.1f} s"
    )
    fused = ", ".join(f"{k} {v}" for k, v in report.fusions.items()) or "none applied"
    print(
        f"  optimize {report.optimize} (fusions: {fused})"
        + (f", quantize {report.quantize}" if report.quantize else "")
        + "; inputs "
        + ", ".join(f"{n}{list(s)}" for n, s in report.input_shapes.items())
    )
    for note in report.verify_notes:
        print(f"  note: {note}")
    if report.verified:
        shapes = "; ".join(str(s) for s in report.verified_shapes)
        print(
            f"  verified on {','.join(report.providers)} (graph optimizations "
            f"{'/'.join(report.verified_levels)}): max abs diff {report.max_abs_diff:.3g} at "
            f"input shapes {shapes}"
        )
        if report.quantize:
            agree = ", ".join(f"{k} {v:.1%}" for k, v in report.argmax_agreement.items())
            print(f"  argmax agreement with PyTorch: {agree or 'n/a'}")
    if args.json:
        _write_json(args.json, report.to_dict())
    return 0


# --------------------------------------------------------------------------- compare


def _add_compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="the base model's .onnx")
    p.add_argument("folded", help="the folded (or other) model's .onnx")
    p.add_argument("--json", default=None, metavar="FILE", help="write the full report as JSON")
    p.add_argument("--runs", type=_positive_int, default=30, help="timed runs per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per model first")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="batch for latency inputs")
    p.add_argument(
        "--seq-len", type=_positive_int, default=128, help="sequence length for latency inputs"
    )
    p.add_argument("--no-latency", action="store_true", help="compare structure only")
    p.add_argument("--providers", default="auto", help="auto, cpu, cuda, or a provider name")


def _cmd_compare(args: argparse.Namespace) -> int:
    from capaboost_fx.onnx import compare_onnx

    report = compare_onnx(
        args.base,
        args.folded,
        latency=not args.no_latency,
        runs=args.runs,
        warmup=args.warmup,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        providers=args.providers,
    )
    print(report.to_markdown("base", "folded"), end="")
    if args.json:
        _write_json(args.json, report.to_dict())
    return 0


# --------------------------------------------------------------------------- inspect


#: Spec fields the inspect command sets from options (also on top of --spec FILE).
_SPEC_OPTIONS = ("targets", "exclude", "rank", "num_masks", "density", "alpha", "mask", "seed",
                 "trainable")


def _add_inspect_args(p: argparse.ArgumentParser) -> None:
    from capaboost_fx.spec import Spec

    default = Spec(targets=["_"])
    helps = Spec.fields_help()

    def doc(name: str) -> str:  # the Spec field's help, then its default
        value = getattr(default, name)
        shown = "none" if value == [] else value
        return f"{helps[name]} (default: {shown})".replace("%", "%%")

    p.add_argument(
        "--model", required=True,
        help="a Hugging Face model directory (loaded offline), or module:factory / "
             "file.py:factory, a callable returning (model, example_inputs[, example_kwargs])",
    )
    p.add_argument("--spec", metavar="FILE",
                   help="a JSON file of Spec fields (Spec.to_dict()); the options below, when "
                        "given, override its fields")
    p.add_argument("--targets", nargs="*", default=None, metavar="PATTERN",
                   help=helps["targets"] + " (default: none, which lists every linear op and "
                        "adapts nothing)")
    p.add_argument("--exclude", nargs="*", default=None, metavar="PATTERN", help=doc("exclude"))
    p.add_argument("--rank", type=_positive_int, default=None, help=doc("rank"))
    p.add_argument("--num-masks", type=_positive_int, default=None, help=doc("num_masks"))
    p.add_argument("--density", type=float, default=None, help=doc("density"))
    p.add_argument("--alpha", type=float, default=None, help=doc("alpha"))
    p.add_argument("--mask", default=None, help=doc("mask"))
    p.add_argument("--seed", type=int, default=None, help=doc("seed"))
    p.add_argument("--trainable", nargs="*", default=None, metavar="NAME",
                   help=doc("trainable"))
    p.add_argument("--batch-size", type=_positive_int, default=2,
                   help="example batch for a model directory (default: %(default)s)")
    p.add_argument("--seq-len", type=_positive_int, default=16,
                   help="example sequence length for a model directory (default: %(default)s)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON here")


def _spec_from_args(args: argparse.Namespace) -> Any:
    """The Spec the inspect options describe: --spec FILE, then explicit options on top; None
    (list every linear op) when there are no targets at all."""
    from capaboost_fx.spec import Spec

    data: dict[str, Any] = {}
    if args.spec:
        try:
            with open(args.spec, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise InputError(f"--spec {args.spec}: cannot read a JSON spec: {e}") from e
        if not isinstance(data, dict):
            raise InputError(f"--spec {args.spec}: expected a JSON object of Spec fields, got "
                             f"{type(data).__name__}")
    given = {k: getattr(args, k) for k in _SPEC_OPTIONS if getattr(args, k) is not None}
    data.update(given)
    if not data.get("targets"):
        if args.spec or set(given) - {"targets"}:
            raise InputError("no targets: give --targets PATTERN... (or targets in --spec) for "
                             f"the options {sorted(set(given) - {'targets'})} to apply; without "
                             "targets inspect only lists the linear ops")
        return None
    return Spec.from_dict(data)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from capaboost_fx.api import inspect as inspect_model

    spec = _spec_from_args(args)  # before loading the model: a bad spec fails fast
    if os.path.isdir(args.model):
        model, inputs, kwargs = _from_hf_dir(args.model, args.batch_size, args.seq_len)
    else:
        model, inputs, kwargs = _from_factory(args.model)
    report = inspect_model(model, spec, inputs, kwargs)
    print(report.to_markdown())
    if args.json:
        _write_json(args.json, report.to_dict())
    if report.unmatched_patterns:
        print(f"error: target pattern(s) {report.unmatched_patterns} matched no linear op; "
              "see the names above", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- demo


def _add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("demo_args", nargs=argparse.REMAINDER,
                   help="options of the demo (see: capaboost-fx demo --help)")


def _cmd_demo(args: argparse.Namespace) -> int:
    import inspect

    from capaboost_fx import demo

    argv, prog = list(args.demo_args), "capaboost-fx demo"  # usage lines name this command
    if "prog" in inspect.signature(demo.main).parameters:
        return demo.main(argv, prog=prog)
    # Older single-module demo (main(argv) only): name its parser through build_parser.
    build = demo.build_parser

    def build_named(*a: Any, **k: Any) -> argparse.ArgumentParser:
        parser = build(*a, **k)
        parser.prog = prog
        return parser

    demo.build_parser = build_named
    try:
        return demo.main(argv)
    finally:
        demo.build_parser = build


# --------------------------------------------------------------------------- onnx-adapter


def _add_onnx_adapter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="the base model (as for export): module:factory, file.py:factory or a "
                   "Hugging Face model directory; a factory may also return a training module")
    p.add_argument("--adapter", default=None,
                   help="the fine-tune: a save_adapter .safetensors file or save_pretrained "
                   "directory (not needed when --model returns a training module)")
    p.add_argument("--out", required=True, help="the .onnx_adapter file to write")
    p.add_argument("--base", default=None, metavar="BASE.onnx",
                   help="the multi-LoRA base (export --multi-lora): refuse a fine-tune that "
                   "does not fit it (other targets, other rank)")
    p.add_argument("--batch-size", type=int, default=2, help="example batch (model directory)")
    p.add_argument("--seq-len", type=int, default=16, help="example length (model directory)")


def _cmd_onnx_adapter(args: argparse.Namespace) -> int:
    import capaboost_fx as cbx

    if os.path.isdir(args.model):
        model, inputs, kwargs = _from_hf_dir(args.model, args.batch_size, args.seq_len)
    else:
        model, inputs, kwargs = _from_factory(args.model)
    if not isinstance(model, cbx.CapaBoostModel):
        if args.adapter is None:
            raise InputError("--model gave a plain model: name the fine-tune with --adapter "
                             "(a save_adapter file or save_pretrained directory)")
        model = cbx.load_adapter(model, args.adapter, inputs, kwargs)
    path = cbx.save_onnx_adapter(model, args.out, base=args.base)
    slots = cbx.onnx_adapter_tensors(model)
    print(f"wrote {path} ({os.path.getsize(path):,} bytes, {len(slots) // 2} targets"
          + (f", fits {args.base}" if args.base else "") + ")")
    return 0


# --------------------------------------------------------------------------- plumbing


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _write_json(path: str, data: dict[str, Any]) -> None:
    from pathlib import Path

    from capaboost_fx.adapter_file import atomic_write

    try:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror or e}") from e


COMMANDS: dict[str, Command] = {
    "inspect": Command("show what a spec would rewrite, and every other linear op",
                       _add_inspect_args, _cmd_inspect),
    "demo": Command("fine-tune MiniLM-L6 on SST-2: LoRA vs CapaBoost, fold, ONNX, report",
                    _add_demo_args, _cmd_demo),
    "export": Command("export a model to ONNX and verify it", _add_export_args, _cmd_export),
    "compare": Command(
        "compare two ONNX files (graph, size, latency)", _add_compare_args, _cmd_compare
    ),
    "onnx-adapter": Command(
        "write a fine-tune as an onnxruntime .onnx_adapter for a multi-LoRA base",
        _add_onnx_adapter_args, _cmd_onnx_adapter,
    ),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capaboost-fx",
        description="CapaBoost adapters as torch.fx passes: inspect, demo, export, compare.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.add_args(p)
        p.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 failure, 2 usage).

    Example::

        >>> main(["compare", "--help"])  # doctest: +SKIP
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # the demo parses its own options (and its own --help)
        try:
            return int(_cmd_demo(argparse.Namespace(demo_args=argv[1:])))
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 2
        except CapaBoostError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits for --help (0) and for usage errors (2)
        return e.code if isinstance(e.code, int) else 2
    try:
        return int(args._run(args))
    except CapaBoostError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
