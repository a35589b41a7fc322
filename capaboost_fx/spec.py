"""`Spec`: the one config object that drives capture, rewrite and fold.

A spec names which linear ops to adapt (``targets``/``exclude``: globs such as ``"*.query"``
or regexes with a ``re:`` prefix, matched against target names) and how: LoRA rank ``r``,
``num_masks`` (d) static random masks per factor with ``density``, scaling ``alpha / rank``
(``scaling="paper"``) or ``alpha / (rank · d · density²)`` (``scaling="normalized"``), and the
initialisation of A (``init``). ``num_masks=1, density=1.0`` is plain LoRA.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import inspect
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import SpecError, SpecTypeError, TargetNotFoundError, close_names
from .masks import is_known_kind, mask_kinds, nm_density

METHODS = ("lora", "padapter", "sadapter")
# Activation name -> module class (the one list; adapter.py builds its modules from it).
ACTIVATIONS = {"identity": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh,
               "silu": nn.SiLU}
#: Initialisations of A (B starts at zero in both): "standard" is loralib/PEFT's kaiming-uniform
#: over A's input dimension, U(±1/√in); "official" is the official CapaBoost code's, U(±1/√r).
INITS = ("standard", "official")
#: Scaling rules: "paper" s = alpha/r; "normalized" s = alpha/(r·d·density²).
SCALINGS = ("paper", "normalized")

#: Fields that `Spec.overrides` may set per target.
OVERRIDABLE = ("rank", "num_masks", "density", "alpha", "mask", "dropout", "init", "scaling")


def scaling_factor(alpha: float, rank: int, num_masks: int, density: float,
                   rule: str = "paper") -> float:
    """The adapter's scale s under `rule`.

    "paper": s = alpha / r (the paper and the official code). "normalized": s = alpha /
    (r · d · density²): each of the d masked copies keeps a fraction density² of every product
    term B_jk A_kl in expectation over the masks, so the summed update is d·density² times
    LoRA's; dividing by it gives the same expected ΔW as LoRA at equal alpha (and the same s as
    "paper" for plain LoRA, d = 1 and density = 1).

    >>> scaling_factor(16.0, 8, 2, 0.5), scaling_factor(16.0, 8, 2, 0.5, "normalized")
    (2.0, 4.0)
    """
    if rule == "paper":
        return alpha / rank
    if rule == "normalized":
        return alpha / (rank * num_masks * density**2)
    raise ValueError(f"unknown scaling rule {rule!r}; allowed: {list(SCALINGS)}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _pattern_list(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise SpecTypeError(
            f"Spec.{name} must be a list of strings (globs like '*.query' or 're:<regex>'), "
            f"got {value!r} of type {type(value).__name__}."
        )
    out = []
    for v in value:
        if not v:
            raise SpecError(f"Spec.{name} contains an empty pattern; remove it.")
        if v.startswith("re:"):
            try:
                re.compile(v[3:])
            except re.error as e:
                raise SpecError(f"Spec.{name} entry {v!r} is not a valid regex: {e}.") from None
        out.append(v)
    return out


def pattern_matches(pattern: str, name: str) -> bool:
    """True if `name` matches `pattern`: ``re:<regex>`` (full match) or a glob.

    >>> pattern_matches("*.query", "bert.encoder.layer.0.attention.self.query")
    True
    >>> pattern_matches("re:.*layer\\.(0|1)\\..*value$", "encoder.layer.3.value")
    False
    """
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


#: Names people bring from the paper or from PEFT, and the Spec field each means.
_ALIASES = {"r": "rank", "lora_r": "rank", "d": "num_masks", "masks": "num_masks",
            "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
            "modules_to_save": "trainable", "exclude_modules": "exclude"}


def _suggest(name: str, known: list[str]) -> str:
    """`` did you mean 'x'?`` for a misspelt field name, or the list of fields."""
    guess = _ALIASES.get(name) if _ALIASES.get(name) in known else None
    if guess is None:
        prefixed = [k for k in known if k.startswith(name)]
        guess = prefixed[0] if len(prefixed) == 1 else None
    if guess is None:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        guess = close[0] if close else None
    if guess is not None:
        return f"did you mean {guess!r}?"
    return f"the fields are {known}."


def _friendly_init(cls: type) -> type:
    """Wrap the dataclass ``__init__`` so a wrong keyword is a `SpecTypeError` (still a
    TypeError) that names the closest field, instead of Python's bare TypeError."""
    generated = cls.__init__
    signature = inspect.signature(generated)

    @functools.wraps(generated)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        known = [f.name for f in dataclasses.fields(cls) if f.init]
        for key in kwargs:
            if key not in known:
                raise SpecTypeError(f"Spec: unknown field {key!r}; {_suggest(key, known)}")
        try:
            signature.bind(self, *args, **kwargs)
        except TypeError as e:
            raise SpecTypeError(f"Spec: {e}; pass fields by name, e.g. "
                                "Spec(targets=['*.query'], rank=8).") from None
        generated(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@_friendly_init
@dataclass
class Spec:
    """What to adapt and how.

    Example:
        >>> spec = Spec(targets=["*.query", "*.value"], rank=8, num_masks=2, density=0.5)
        >>> spec.scale, Spec(targets=["*.query"], scaling="normalized").scale
        (2.0, 4.0)
        >>> Spec.from_dict(spec.to_dict()) == spec
        True
    """

    targets: list[str] = field(
        default_factory=list,
        metadata={"help": "Target names to adapt: globs ('*.query') or 're:<regex>'. Each entry "
                          "must match at least one linear op."},
    )
    exclude: list[str] = field(
        default_factory=list,
        metadata={"help": "Patterns removed from the matched targets (exclude wins)."},
    )
    rank: int = field(default=8, metadata={"help": "LoRA rank r of the shared pair (A, B)."})
    num_masks: int = field(
        default=2, metadata={"help": "d: masked copies of (A, B) summed; rank(ΔW) <= d*r."}
    )
    density: float = field(
        default=0.5, metadata={"help": "Fraction of entries each mask keeps, in (0, 1]."}
    )
    alpha: float = field(
        default=16.0,
        metadata={"help": "Scale of the update: s = alpha / rank (scaling='paper') or "
                          "alpha / (rank·num_masks·density²) (scaling='normalized')."},
    )
    dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the adapter input, in [0, 1)."}
    )
    mask: str = field(
        default="random",
        metadata={"help": "Mask kind. 'random': exactly floor(numel*density) entries kept per "
                          "mask, chosen uniformly (as in the paper); 'bernoulli'; 'N:M' such as "
                          "'2:4' (density must be N/M); or a kind added with register_mask."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of masks and A's init (stable hash)."})
    trainable: list[str] = field(
        default_factory=list,
        metadata={"help": "Modules or parameters (names or patterns) that stay trainable besides "
                          "the adapters, e.g. ['classifier']."},
    )
    method: str = field(
        default="lora",
        metadata={"help": "'lora': ΔW = s·B_cat A_cat beside each target op; 'padapter': a "
                          "parallel adapter s·up(act(down x)) with CapaBoost-masked down/up; "
                          "'sadapter': a sequential (Pfeiffer) bottleneck after the op's "
                          "output y: y + s·Σᵢ[(B⊙Nᵢ) act((A⊙Mᵢ) y + b_d) + b_u] (rank = "
                          "bottleneck width; biases never masked, each copy adds b_u)."},
    )
    activation: str = field(
        default="identity",
        metadata={"help": "Activation between the factors: 'identity' (LoRA; folds into W0), "
                          "or for method='padapter' also 'relu', 'gelu', 'tanh', 'silu' (folds "
                          "into one dense width-d·r adapter)."},
    )
    init: str = field(
        default="standard",
        metadata={"help": "Initialisation of A (B starts at zero): 'standard' kaiming-uniform "
                          "U(±1/√in) as loralib/PEFT; 'official' U(±1/√rank), as the official "
                          "CapaBoost code (LoRA only)."},
    )
    scaling: str = field(
        default="paper",
        metadata={"help": "'paper': s = alpha/rank; 'normalized': s = alpha/(rank·num_masks·"
                          "density²), the same expected update as LoRA at equal alpha."},
    )
    overrides: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={"help": "Per-target settings: {pattern: {field: value}} for rank, num_masks, "
                          "density, alpha, mask, dropout, init, scaling. Every pattern that matches a target "
                          "applies, in order: a later entry overrides an earlier one, so list "
                          "general patterns first and specific ones last."},
    )

    def __post_init__(self) -> None:
        self.targets = _pattern_list("targets", self.targets)
        if not self.targets:
            raise SpecError(
                "Spec.targets is empty: name the linear ops to adapt, e.g. "
                "targets=['*.query', '*.value']; capaboost_fx.inspect(model, ...) lists them."
            )
        self.exclude = _pattern_list("exclude", self.exclude)
        self.trainable = _pattern_list("trainable", self.trainable)
        self._check_numbers()
        self._check_kinds()
        self._check_overrides()

    def _check_numbers(self) -> None:
        """rank, num_masks, seed: ints in range; density, alpha, dropout: finite, in range."""
        for name in ("rank", "num_masks", "seed"):
            v = getattr(self, name)
            if not _is_int(v):
                raise SpecTypeError(f"Spec.{name} must be an int, got {v!r} ({type(v).__name__}).")
        if self.rank < 1:
            raise SpecError(f"Spec.rank must be >= 1, got {self.rank}.")
        if self.num_masks < 1:
            raise SpecError(
                f"Spec.num_masks must be >= 1, got {self.num_masks} (1 with density=1.0 is "
                "plain LoRA; the paper uses 2)."
            )
        if self.seed < 0:
            raise SpecError(f"Spec.seed must be >= 0, got {self.seed}.")
        for name in ("density", "alpha", "dropout"):
            v = getattr(self, name)
            if not _is_number(v) or not math.isfinite(v):
                raise SpecTypeError(
                    f"Spec.{name} must be a finite number, got {v!r} ({type(v).__name__})."
                )
            setattr(self, name, float(v))
        if not 0.0 < self.density <= 1.0:
            raise SpecError(
                f"Spec.density must be in (0, 1], got {self.density} (the paper uses 0.5)."
            )
        if self.alpha <= 0.0:
            raise SpecError(f"Spec.alpha must be > 0, got {self.alpha}.")
        if not 0.0 <= self.dropout < 1.0:
            raise SpecError(f"Spec.dropout must be in [0, 1), got {self.dropout}.")

    def _check_kinds(self) -> None:
        """mask, method, activation, init, scaling: known names that fit together."""
        if not isinstance(self.mask, str):
            raise SpecTypeError(f"Spec.mask must be a string, got {self.mask!r}.")
        if not is_known_kind(self.mask):
            raise SpecError(
                f"Spec.mask {self.mask!r} is unknown; allowed: {mask_kinds()} or 'N:M' with "
                "0 < N <= M (e.g. '2:4'), or register one with capaboost_fx.register_mask."
            )
        nm = nm_density(self.mask)
        if nm is not None and abs(nm - self.density) > 1e-9:
            raise SpecError(
                f"Spec.mask {self.mask!r} keeps {nm:g} of the entries, but Spec.density is "
                f"{self.density:g}; set density={nm:g}."
            )
        if self.method not in METHODS:
            raise SpecError(f"Spec.method {self.method!r} is unknown; allowed: {list(METHODS)}.")
        if self.activation not in ACTIVATIONS:
            raise SpecError(
                f"Spec.activation {self.activation!r} is unknown; allowed: {sorted(ACTIVATIONS)}."
            )
        if self.method == "lora" and self.activation != "identity":
            raise SpecError(
                f"Spec.activation={self.activation!r} needs method='padapter' or 'sadapter'; "
                "LoRA has none."
            )
        for name, allowed in (("init", INITS), ("scaling", SCALINGS)):
            if getattr(self, name) not in allowed:
                raise SpecError(
                    f"Spec.{name} {getattr(self, name)!r} is unknown; allowed: {list(allowed)}."
                )
        if self.init == "official" and self.method == "padapter":
            raise SpecError("Spec.init='official' is the official code's LoRA or sequential "
                            "adapter init; method='padapter' takes init='standard'.")

    def _check_overrides(self) -> None:
        if not isinstance(self.overrides, Mapping):
            raise SpecTypeError(
                f"Spec.overrides must be a dict {{pattern: {{field: value}}}}, got "
                f"{type(self.overrides).__name__}."
            )
        self.overrides = dict(self.overrides)
        for pattern, values in self.overrides.items():
            _pattern_list("overrides", [pattern])
            if not isinstance(values, Mapping):
                raise SpecTypeError(
                    f"Spec.overrides[{pattern!r}] must be a dict of field values, got "
                    f"{type(values).__name__}."
                )
            bad = sorted(str(k) for k in values if k not in OVERRIDABLE)
            if bad:
                raise SpecError(
                    f"Spec.overrides[{pattern!r}] sets {bad}; only {list(OVERRIDABLE)} can vary "
                    "per target."
                )
            self.overrides[pattern] = dict(values)
            try:  # validate the values as they would be resolved on their own
                dataclasses.replace(self, overrides={}, **values)
            except (SpecError, SpecTypeError) as e:
                raise type(e)(f"Spec.overrides[{pattern!r}]: {e}") from None

    @property
    def scale(self) -> float:
        """The scale s of this spec's own settings (overrides not applied), per `scaling`."""
        return scaling_factor(self.alpha, self.rank, self.num_masks, self.density, self.scaling)

    def for_target(self, name: str) -> Spec:
        """The settings that apply to target `name`: this spec with every matching override
        applied in order (later entries win)."""
        values: dict[str, Any] = {}
        for pattern, override in self.overrides.items():
            if pattern_matches(pattern, name):
                values.update(override)
        return dataclasses.replace(self, overrides={}, **values) if values else self

    def check_patterns(self, candidates: list[str], targets: list[str],
                       skipped: Mapping[str, Any] | None = None) -> None:
        """Raise `TargetNotFoundError` for an ``exclude`` entry that names none of the
        `candidates`, or an ``overrides`` pattern that names none of the chosen `targets` (its
        settings would never apply), with the closest names. `skipped`: why each candidate
        that is not a target was left alone."""
        for p in self.exclude:
            if not any(pattern_matches(p, n) for n in candidates):
                raise TargetNotFoundError(
                    f"Spec.exclude entry {p!r} matched none of the {len(candidates)} candidate "
                    f"target names, so it excludes nothing. Closest names: "
                    f"{close_names(p, candidates)}.")
        for p, values in self.overrides.items():
            if any(pattern_matches(p, n) for n in targets):
                continue
            others = [n for n in candidates if pattern_matches(p, n)]
            why = (f" It matches {others[0]!r}, which is not a target"
                   f" ({(skipped or {}).get(others[0], 'not matched by targets')})."
                   if others else "")
            raise TargetNotFoundError(
                f"Spec.overrides pattern {p!r} matched none of the {len(targets)} targets, so "
                f"its settings {values} would never apply.{why} Closest target names: "
                f"{close_names(p, targets)}.")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict; `Spec.from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Spec:
        """Build a spec from `to_dict` output; unknown keys are an error (no silent typos)."""
        if not isinstance(data, Mapping):
            raise SpecTypeError(f"Spec.from_dict needs a mapping, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            hints = "; ".join(f"{k!r}: {_suggest(k, sorted(known))}" for k in unknown)
            raise SpecError(
                f"Spec.from_dict got unknown key(s) {unknown} ({hints}); allowed keys: "
                f"{sorted(known)}."
            )
        return cls(**dict(data))

    @classmethod
    def fields_help(cls) -> dict[str, str]:
        """Field name -> help text (for CLIs and docs)."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


