"""Errors raised by capaboost_fx.

Every error derives from :class:`CapaBoostError` and also from the builtin exception it
stands for, so ``except ValueError`` keeps working for callers who do not know this library.
Messages say what was wrong, where (field, target, node, file) and what to do about it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CapaBoostError(Exception):
    """Base class of every error capaboost_fx raises on purpose."""


class SpecError(CapaBoostError, ValueError):
    """A `Spec` field holds a value outside what is allowed."""


class SpecTypeError(CapaBoostError, TypeError):
    """A `Spec` field holds a value of the wrong type."""


class TargetNotFoundError(CapaBoostError, ValueError):
    """A `targets`/`trainable` entry matched nothing, or `exclude` removed every target."""


class TargetError(CapaBoostError, ValueError):
    """A matched target cannot be adapted (rank too large, tied weight, mixed layouts...)."""


class CaptureError(CapaBoostError, RuntimeError):
    """`torch.export` could not capture the model with the given inputs."""


class UncapturableError(CaptureError):
    """torch.export itself failed on the model (not on capaboost_fx's checks): what makes
    ``transform(capture="auto")`` train the model eagerly instead."""


class InputError(CapaBoostError, ValueError):
    """Example inputs, or inputs at run time, do not fit what was captured."""


class ForwardError(CapaBoostError, RuntimeError):
    """Calling a module capaboost_fx returned failed inside the model's computation: its own
    code (eager path) or an op of a captured graph. The message says where; the original
    exception is the ``__cause__``. Subclasses keep the original's builtin family, so
    ``except ValueError`` still catches a ValueError the model raised."""


class ForwardValueError(ForwardError, ValueError):
    """`ForwardError` of a ValueError."""


class ForwardTypeError(ForwardError, TypeError):
    """`ForwardError` of a TypeError."""


class ForwardLookupError(ForwardError, IndexError, KeyError):
    """`ForwardError` of an IndexError or KeyError."""

    __str__ = Exception.__str__  # KeyError's would quote the message


class ForwardInputError(ForwardError, InputError):
    """A call failed because of one argument (its rank, dtype, a size outside the captured
    range or the model's limits, ids outside the vocabulary); the message names it."""


def forward_error(err: BaseException, message: str, blame: bool = False) -> ForwardError:
    """A `ForwardError` of `err`'s builtin family carrying `message` (raise it ``from err``):
    `ForwardInputError` when an argument is to blame for a RuntimeError or a failed guard."""
    if blame and isinstance(err, (RuntimeError, InputError)):
        return ForwardInputError(message)
    for base, cls in ((ValueError, ForwardValueError), (TypeError, ForwardTypeError),
                      (LookupError, ForwardLookupError)):
        if isinstance(err, base):
            return cls(message)
    return ForwardError(message)


class NotTransformedError(CapaBoostError, TypeError):
    """A function that needs a `transform`-ed module got something else."""


class AlreadyTransformedError(CapaBoostError, TypeError):
    """`transform` was given a module that `transform` already returned."""


class FoldError(CapaBoostError, ValueError):
    """The fold cannot produce a faithful deploy module (e.g. NaN/Inf in a delta)."""


class AdapterFileError(CapaBoostError, ValueError):
    """An adapter file is damaged, of an unknown version, or does not fit the base model."""


class AdapterMismatchError(AdapterFileError):
    """An adapter does not fit the base it is served on (a multi-LoRA ONNX base): other
    targets, other ranks or shapes. The message names the targets and the sizes."""


class AdapterFileNotFoundError(CapaBoostError, FileNotFoundError):
    """An adapter file does not exist."""


class FileWriteError(CapaBoostError, OSError):
    """A file could not be written (missing directory, no permission, disk full)."""


class ExportError(CapaBoostError, RuntimeError):
    """ONNX export failed, or its output is not what was asked for."""


class MissingDependencyError(CapaBoostError, ImportError):
    """An optional dependency a feature needs is not installed; the message names the extra."""


class OnnxFileNotFoundError(CapaBoostError, FileNotFoundError):
    """An ONNX file to read (compare, serve, optimise) does not exist."""


class VerificationError(CapaBoostError, AssertionError):
    """An exported model's outputs differ from PyTorch's beyond the tolerance."""


class CapaBoostWarning(UserWarning):
    """Something works but may not be what you meant (e.g. an adapter file loaded onto base
    weights that differ from those it was trained on). Filter with
    ``warnings.simplefilter("error", capaboost_fx.CapaBoostWarning)`` to make it fatal."""


def close_names(word: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidates closest to `word` (for "did you mean" hints), best first."""
    candidates = list(dict.fromkeys(candidates))
    # Globs like "*.query" compare badly with full names; compare their literal parts too.
    probe = word.replace("re:", "").replace("*", "").replace("?", "").strip(".")
    scored = {c: max(difflib.SequenceMatcher(None, probe, c).ratio(),
                     difflib.SequenceMatcher(None, probe, c.rsplit(".", 1)[-1]).ratio())
              for c in candidates}
    return sorted(scored, key=lambda c: -scored[c])[:n]


class CollectiveError(CapaBoostError, RuntimeError):
    """A call that gathers sharded tensors (after FSDP2) was not made on every rank."""
