"""What the machine a job runs on can do: native bf16, the precision a job really uses.

bf16 is only worth running where the hardware computes it natively: on a CPU without bf16
instructions (AVX2-only x86, as many cluster nodes are) PyTorch emulates it, and a ResNet
extraction then runs about 6x *slower* than fp32 (a bf16 matrix product at 0.3 GFLOP/s against
125 in fp32). The one behaviour chosen here: **bf16 requested without native support runs in
fp32, and the substitution is recorded** (requested and effective precision and the reason) in
the features' ``meta.json``, the run's ``metrics.json`` and the ``Precision`` column of the
tables. fp32 is the reference that bf16 approximates, so the results stay valid; stopping
instead would throw away a cluster job's queue wait for a speed setting.

Detection (no benchmark, no torch import for the CPU part):

- CPU: the kernel's CPU flags (``/proc/cpuinfo``): ``avx512_bf16`` or ``amx_bf16`` on x86,
  ``bf16`` on Arm. Where the flags cannot be read the answer is "not native" (fp32 is safe).
- CUDA: ``torch.cuda.is_bf16_supported(including_emulation=False)`` for the job's device
  (Ampere and newer).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("leukotype")

#: CPU flags (``/proc/cpuinfo``) that mean bf16 arithmetic in hardware.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``); empty when unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return frozenset()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return frozenset(flags)


@functools.cache
def _this_cpu_flags() -> frozenset[str]:
    return cpu_flags()


def native_bf16(device: Any = "cpu") -> tuple[bool, str]:
    """Whether ``device`` (a ``torch.device`` or its name) computes bf16 natively, and why."""
    kind = str(getattr(device, "type", device)).split(":")[0]
    if kind == "cuda":
        import torch

        index = getattr(device, "index", None)
        with torch.cuda.device(index if index is not None else torch.cuda.current_device()):
            supported = bool(torch.cuda.is_bf16_supported(including_emulation=False))
            name = torch.cuda.get_device_name()
        if supported:
            return True, f"{name} supports bf16"
        return False, f"GPU {name} has no native bf16 (needs compute capability 8.0 or newer)"
    if kind == "cpu":
        found = sorted(set(CPU_BF16_FLAGS) & _this_cpu_flags())
        if found:
            return True, f"CPU flags {', '.join(found)}"
        return False, (
            "this CPU has no native bf16 instructions (none of the flags "
            f"{', '.join(CPU_BF16_FLAGS)}); bf16 would be emulated, several times slower than fp32"
        )
    return False, f"bf16 support of device type {kind!r} is unknown"


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a job was asked for, the one it runs in, and why they differ (if they do)."""

    requested: str
    effective: str
    reason: str = ""

    @property
    def substituted(self) -> bool:
        return self.requested != self.effective

    def meta(self) -> dict[str, str]:
        """The fields recorded in ``meta.json`` / ``metrics.json``."""
        return {
            "precision": self.effective,
            "precision_requested": self.requested,
            "precision_reason": self.reason,
        }


def resolve_precision(requested: str, device: Any = "cpu") -> PrecisionChoice:
    """``requested`` where ``device`` runs it natively; bf16 without native support -> fp32.

    The substitution is logged as a warning naming the reason and what to set instead.
    """
    if requested != "bf16":
        return PrecisionChoice(requested, requested)
    native, why = native_bf16(device)
    if native:
        return PrecisionChoice(requested, requested)
    reason = f"bf16 requested but {why}: ran fp32"
    log.warning(
        "%s. Results are valid (fp32 is the reference); set precision: fp32 to silence this, "
        "or run on a node with native bf16 (x86 avx512_bf16/amx_bf16, Arm bf16, GPU sm80+)",
        reason,
    )
    return PrecisionChoice(requested, "fp32", reason)


def precision_label(meta: dict[str, Any]) -> str:
    """How a table names the precision of a ``meta`` record: ``fp32``, or ``fp32 (bf16 requested)``."""
    effective = str(meta.get("precision") or "")
    requested = str(meta.get("precision_requested") or effective)
    if requested and requested != effective:
        return f"{effective} ({requested} requested)"
    return effective


def run_precision(feature_dirs: Any) -> str:
    """Precision label of a run from the ``meta.json`` of the feature folders it used
    (the first substitution wins; empty when no folder records one)."""
    import json

    labels = []
    for folder in feature_dirs:
        path = Path(folder) / "meta.json"
        if path.is_file():
            labels.append(precision_label(json.loads(path.read_text(encoding="utf-8"))))
    substituted = [label for label in labels if "requested" in label]
    return (substituted or labels or [""])[0]
