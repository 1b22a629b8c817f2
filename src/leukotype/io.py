"""Atomic writers and provenance records shared by every stage."""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

#: Packages whose versions are recorded with every result.
RECORDED_PACKAGES = (
    "leukotype",
    "torch",
    "torchvision",
    "scikit-learn",
    "numpy",
    "pandas",
    "pillow",
    "snakemake",
    "skops",
    "efficientnet-lite-pytorch",
)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place only if the block succeeds.

    Readers (and Snakemake's incomplete-output detection) never see a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give results the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[Any]:
    """Open a temporary file for writing that replaces ``path`` atomically on success."""
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as handle:
        yield handle


def write_tsv(df: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_write(path, newline="") as handle:
        df.to_csv(handle, sep="\t", index=False)


def read_tsv(path: str | os.PathLike, **kwargs: Any) -> pd.DataFrame:
    kwargs.setdefault("keep_default_na", False)
    kwargs.setdefault("dtype", {"image_id": str, "group": str, "fold": str})
    return pd.read_csv(path, sep="\t", **kwargs)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(obj: Any, path: str | os.PathLike) -> None:
    with atomic_write(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=False, default=_json_default)
        handle.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def package_versions(names: tuple[str, ...] = RECORDED_PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance(config: Any = None, seed: int | None = None) -> dict[str, Any]:
    """What produced a result: config, seed, package versions, interpreter and machine."""
    return {
        "config": config,
        "seed": seed,
        "versions": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
