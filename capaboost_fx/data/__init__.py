"""A small SST-2 sample (GLUE) shipped inside the package, for the demo and its tests.

``sst2_train.tsv`` holds 4,000 training rows and ``sst2_dev.tsv`` 2,000 held-out sentences;
see ``README.md`` next to this file for where they come from and what to cite
(Socher et al., EMNLP 2013; Wang et al., GLUE, 2018).

    >>> from capaboost_fx.data import load_sst2
    >>> dev = load_sst2("dev")
    >>> len(dev), sorted(set(dev.labels))
    (2000, [0, 1])
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = ["SPLITS", "SST2Split", "load_sst2", "read_sst2_tsv", "sst2_path"]

#: Split name -> file name inside this package.
SPLITS = {"train": "sst2_train.tsv", "dev": "sst2_dev.tsv"}

_HEADER = ("sentence", "label")


@dataclass(frozen=True)
class SST2Split:
    """One split: parallel lists of sentences and labels (1 = positive, 0 = negative)."""

    name: str
    sentences: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> SST2Split:
        """The first `n` examples (all of them when `n` is None or larger than the split)."""
        if n is None or n >= len(self):
            return self
        if n < 0:
            raise ValueError(f"head(n) needs n >= 0, got {n}")
        return SST2Split(self.name, self.sentences[:n], self.labels[:n])


def sst2_path(split: str) -> Path:
    """Path of the shipped TSV file of `split` ("train" or "dev")."""
    if split not in SPLITS:
        raise ValueError(f"unknown SST-2 split {split!r}; choose one of {sorted(SPLITS)}")
    return Path(str(resources.files(__name__).joinpath(SPLITS[split])))


def read_sst2_tsv(path: str | Path, name: str | None = None) -> SST2Split:
    """Read a ``sentence<TAB>label`` file with that header line (GLUE SST-2 format).

    The label is the text after the last tab, so a sentence may hold anything but a newline.
    Raises ValueError naming the file and line for a bad header, row or label.
    """
    path = Path(path)
    sentences: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8", newline="") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        if tuple(header) != _HEADER:
            raise ValueError(
                f"{path}: line 1 must be the header 'sentence<TAB>label', got {header!r}"
            )
        for lineno, line in enumerate(f, start=2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            sentence, sep, label = line.rpartition("\t")
            if not sep or not sentence.strip():
                raise ValueError(f"{path}: line {lineno} is not 'sentence<TAB>label': {line!r}")
            if label not in ("0", "1"):
                raise ValueError(f"{path}: line {lineno} has label {label!r}; expected 0 or 1")
            sentences.append(sentence)
            labels.append(int(label))
    return SST2Split(name or path.stem, sentences, labels)


def load_sst2(split: str, limit: int | None = None) -> SST2Split:
    """The shipped sample of `split` ("train": 4,000 rows, "dev": 2,000), first `limit` rows."""
    return read_sst2_tsv(sst2_path(split), name=split).head(limit)
