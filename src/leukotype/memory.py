"""Out-of-memory as a message: a job's computed memory need checked against its ``mem_mb``.

A job killed by the kernel's OOM killer (or by SLURM at its ``--mem``) leaves a log that ends
mid-line. Where the need can be computed before the expensive part (the feature matrices of an
SVM job, the weights and batch activations of an extraction job), :func:`require_memory`
compares it with the job's ``mem_mb`` resource and stops at once with how much is needed and
which config or profile key to raise.

The estimates count what the job itself holds: the process as it is when checking (Python,
torch, pandas already imported), plus the parts named per job. They are deliberately not
padded: a false stop costs more than a late one, which the retry with more memory covers.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

from leukotype.errors import LeukotypeError

log = logging.getLogger("leukotype")

MIB = 1 << 20

#: Where a rule's memory comes from: the config key (a profile's ``set-resources`` overrides it).
MEMORY_KEYS = {
    "train_svm": "compute.mem_mb_svm",
    "extract_features": "compute.mem_mb_extract",
    "finetune": "compute.mem_mb_finetune",
}


def process_rss_bytes() -> int:
    """Resident memory of this process now (Linux ``/proc``; else the peak from getrusage)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


def require_memory(
    rule: str, parts: Mapping[str, float], mem_mb: float | None, hint: str = ""
) -> float:
    """Raise LeukotypeError when ``parts`` (bytes, by what needs them) exceed ``mem_mb``.

    Returns the need in MiB. ``mem_mb`` None or 0 (no limit known) only returns the need.
    The message names the need, its parts, the job's ``mem_mb``, the config key of
    :data:`MEMORY_KEYS` and the profile override, plus ``hint`` (e.g. a smaller batch).
    """
    need_mb = sum(parts.values()) / MIB
    if not mem_mb or need_mb <= float(mem_mb):
        return need_mb
    breakdown = ", ".join(f"{name} {value / MIB:,.0f} MB" for name, value in parts.items())
    key = MEMORY_KEYS.get(rule, "the rule's mem_mb")
    suggested = int(math.ceil(need_mb * 1.25 / 1000.0) * 1000)
    raise LeukotypeError(
        f"{rule} needs about {need_mb:,.0f} MB of memory ({breakdown}) but the job has "
        f"mem_mb={float(mem_mb):,.0f}; it would be killed for lack of memory. Raise {key} in "
        f"the config (e.g. to {suggested}), or `set-resources: {rule}: mem_mb: {suggested}` in "
        f"your Snakemake profile (which overrides the config){'; ' + hint if hint else ''}."
    )


# --------------------------------------------------------------------------------------------
# per job kind


def svm_memory_parts(n_train: int, n_test: int, dim: int, kernel_budget_mb: float = 0.0) -> dict[str, float]:
    """Bytes a train_svm job holds: float32 features of both parts, the standardised copy of the
    training part made by the pipeline's scaler, and the kernel matrices it may keep (at most
    the budget the solver is given; above it the solver changes, not the memory)."""
    return {
        "process": float(process_rss_bytes()),
        f"features {n_train + n_test}x{dim} float32": float((n_train + n_test) * dim * 4),
        "standardised training copy": float(n_train * dim * 4),
        "kernel matrices": float(min(2 * n_train * n_train * 8, kernel_budget_mb * MIB)),
    }


def extraction_memory_parts(
    backbone: str, batch_size: int, num_workers: int = 0, precision: str = "fp32"
) -> dict[str, float]:
    """Bytes an extract_features job holds: the weights (twice: the optimised copy folds
    BatchNorm into new convolutions), one batch's largest layer input and output, and the
    decoded input batches queued by the data loader. Shapes come from a forward pass on the
    ``meta`` device (no memory, no arithmetic)."""
    import torch

    from leukotype.backbones import FeatureExtractor, get_spec

    spec = get_spec(backbone)
    itemsize = 2 if precision == "bf16" else 4
    try:
        with torch.device("meta"):
            model = spec.builder(0).eval()
    except Exception as error:  # noqa: BLE001 - a builder that needs real tensors: no estimate
        log.warning("no memory estimate for %s (meta build failed: %s)", backbone, error)
        return {"process": float(process_rss_bytes())}
    params = sum(t.numel() for t in [*model.parameters(), *model.buffers()]) * 4
    largest = 0

    def watch(_module: Any, _inputs: Any, output: Any) -> None:
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel())

    hooks = [m.register_forward_hook(watch) for m in model.modules() if not list(m.children())]
    try:
        extractor = FeatureExtractor(spec, model, [spec.default_layer]).eval()
        with torch.inference_mode():
            extractor(torch.empty(1, 3, spec.input_size, spec.input_size, device="meta"))
    except Exception as error:  # noqa: BLE001 - an op without a meta kernel: estimate without
        log.warning("memory estimate of %s without activations (meta forward failed: %s)", backbone, error)
        largest = 0
    finally:
        for hook in hooks:
            hook.remove()
    input_bytes = 3 * spec.input_size * spec.input_size * 4
    queued = batch_size * input_bytes * (1 + 2 * num_workers)  # DataLoader prefetch_factor 2
    return {
        "process": float(process_rss_bytes()),
        "weights": float(2 * params),
        f"activations of a batch of {batch_size}": float(2 * largest * itemsize * batch_size),
        "queued input batches": float(queued),
    }
