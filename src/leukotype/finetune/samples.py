"""(image, transform) samples with optional labels, and the digest that identifies data."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from torch.utils.data import Dataset

from leukotype.errors import LeukotypeError


def digest(obj: Any) -> str:
    """sha256 of ``obj``'s canonical JSON (keys sorted; anything else as ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Samples:
    """(image, transform) samples with optional integer labels, in a fixed order."""

    image_ids: tuple[str, ...]
    abspaths: tuple[str, ...]
    transforms: tuple[str, ...]
    labels: tuple[int, ...] | None = None
    #: a preprocessing variant's ``(image, abspath, transform) -> image``
    #: (``leukotype.preprocessing.ImagePreparer``); None: the images as they are
    prepare: Callable[[Any, str, str], Any] | None = None

    def __post_init__(self) -> None:
        lengths = {len(self.image_ids), len(self.abspaths), len(self.transforms)}
        if self.labels is not None:
            lengths.add(len(self.labels))
        if len(lengths) != 1:
            raise LeukotypeError(
                "Samples: image_ids, abspaths, transforms and labels differ in length"
            )

    @classmethod
    def from_frame(
        cls,
        df: pd.DataFrame,
        classes: Sequence[str] | None = None,
        label_column: str = "label",
        prepare: Callable[[Any, str, str], Any] | None = None,
    ) -> Samples:
        """From a table with ``image_id, abspath, transform`` (and ``label_column`` if classes).

        Labels are mapped to their index in ``classes``; an unknown label is an error.
        """
        missing = [c for c in ("image_id", "abspath", "transform") if c not in df.columns]
        if missing:
            raise LeukotypeError(f"sample table lacks column(s) {missing}; has {list(df.columns)}")
        labels = None
        if classes is not None:
            if label_column not in df.columns:
                raise LeukotypeError(f"sample table lacks label column {label_column!r}")
            lookup = {name: i for i, name in enumerate(classes)}
            unknown = sorted(set(df[label_column].astype(str)) - set(lookup))
            if unknown:
                raise LeukotypeError(f"labels {unknown} are not among the classes {list(classes)}")
            labels = tuple(lookup[v] for v in df[label_column].astype(str))
        return cls(
            image_ids=tuple(df["image_id"].astype(str)),
            abspaths=tuple(df["abspath"].astype(str)),
            transforms=tuple(df["transform"].astype(str)),
            labels=labels,
            prepare=prepare,
        )

    @classmethod
    def concat(cls, parts: Sequence[Samples]) -> Samples:
        """The parts' samples one after the other (labels kept only when every part has them)."""
        labelled = all(part.labels is not None for part in parts)
        prepares = {id(part.prepare): part.prepare for part in parts}
        if len(prepares) > 1:
            raise LeukotypeError("Samples.concat: the parts are prepared differently")
        return cls(
            image_ids=tuple(v for part in parts for v in part.image_ids),
            abspaths=tuple(v for part in parts for v in part.abspaths),
            transforms=tuple(v for part in parts for v in part.transforms),
            labels=tuple(v for part in parts for v in part.labels) if labelled else None,
            prepare=next(iter(prepares.values()), None),
        )

    def __len__(self) -> int:
        return len(self.image_ids)

    def take(self, rows: Sequence[int]) -> Samples:
        """The samples at ``rows``, in that order."""
        return Samples(
            image_ids=tuple(self.image_ids[i] for i in rows),
            abspaths=tuple(self.abspaths[i] for i in rows),
            transforms=tuple(self.transforms[i] for i in rows),
            labels=tuple(self.labels[i] for i in rows) if self.labels is not None else None,
            prepare=self.prepare,
        )

    def key(self) -> str:
        """Digest of the sample identities (paths and transforms, not labels)."""
        return digest({"paths": list(self.abspaths), "transforms": list(self.transforms)})

    def index_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"image_id": list(self.image_ids), "transform": list(self.transforms)})

    def dataset(self, preprocess: Callable[[Any], Any]) -> Dataset:
        """A ``runtime.SampleDataset`` yielding ``(tensor, index)``."""
        from leukotype.runtime import SampleDataset

        return SampleDataset(list(self.abspaths), list(self.transforms), preprocess, self.prepare)


@dataclass(frozen=True)
class FoldSamples:
    """The samples one fine-tuning job uses: training, validation (may be None) and test."""

    train: Samples
    val: Samples | None
    test: Samples

    def parts(self) -> dict[str, Samples]:
        """``train``, ``val`` (when there is one) and ``test``, in that order."""
        named = {"train": self.train, "val": self.val, "test": self.test}
        return {name: part for name, part in named.items() if part is not None}

    def all(self) -> Samples:
        """Every sample of the job, train then val then test (the fine-tuned features' rows)."""
        return Samples.concat(list(self.parts().values()))
