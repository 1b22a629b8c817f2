"""Glue for workflow scripts: per-job logging. Scripts stay thin adapters over `stages`."""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from leukotype.errors import LeukotypeError


@contextlib.contextmanager
def logged(snakemake: Any) -> Iterator[logging.Logger]:
    """Send the job's stdout/stderr and logging to its `log:` file.

    A LeukotypeError is also echoed to the real stderr, so the user sees the actionable message
    in Snakemake's own output and not only in the log file.
    """
    log_path = Path(snakemake.log[0]) if snakemake.log else None
    real_stderr = sys.stderr
    if log_path:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log_path, "w", encoding="utf-8", buffering=1) if log_path else real_stderr
    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = handle
    logging.basicConfig(
        stream=handle, level=logging.INFO, force=True, format="%(asctime)s %(levelname)s %(message)s"
    )
    logger = logging.getLogger("leukotype")
    try:
        yield logger
    except LeukotypeError as err:
        print(f"ERROR: {err}", file=handle)
        print(f"leukotype error in rule {getattr(snakemake, 'rule', '?')}: {err}", file=real_stderr)
        raise
    except BaseException:
        traceback.print_exc(file=handle)
        raise
    finally:
        sys.stdout, sys.stderr = old_out, old_err
        if handle is not real_stderr:
            handle.close()


def run_meta(wildcards: Any) -> dict[str, Any]:
    """A run's identity from its job's wildcards: ``prep`` as the variant's name (``none``) and,
    for a variant, a ``model`` id that tells it apart (``efficientnet_lite0-pool@cropstain``)."""
    from leukotype import paths
    from leukotype.metrics import model_id

    meta = dict(wildcards)
    meta["prep"] = paths.prep_name(str(meta.get("prep", "")))
    if "svm_strategy" in meta and "strategy" not in meta:
        meta["strategy"] = meta.pop("svm_strategy")
    if "backbone" in meta and meta["prep"] != paths.NO_PREP:
        meta["model"] = model_id(meta["backbone"], meta.get("layer")) + paths.prep_suffix(meta["prep"])
    return meta
