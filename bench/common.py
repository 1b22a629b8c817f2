"""Shared helpers for the benchmark scripts in ``bench/``.

Every benchmark measures *ratios against a baseline run in the same process*, because the
machines these run on are noisy and shared: an absolute images/s means little, a ratio to a
matmul or to another code path measured a few seconds earlier means a lot more.

Results go to ``bench/results/<name>.csv``: one row per measurement, each row carrying the
machine description (CPU model, cores, bf16/AMX flags), torch version, thread count and date, so
a CSV read on its own says where its numbers came from.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "pbc"


# ------------------------------------------------------------------------------ machine info


def cpu_flags() -> set[str]:
    """CPU feature flags from /proc/cpuinfo (empty set where unavailable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: The CPU flags that decide matrix-product speed (recorded in every result row).
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
              "amx_bf16", "amx_tile")


def native_bf16(flags: set[str] | None = None) -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512-BF16 or AMX); without it bf16 GEMMs are
    emulated and no bf16 ceiling is measured."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def autogroup() -> str:
    """``/autogroup-N nice K`` of this process. With the kernel's autogroup scheduling on
    (``/proc/sys/kernel/sched_autogroup_enabled``), CPU is shared between sessions first and
    a process's own nice value only counts inside its session, so the group's nice is what
    decides a run's share against other sessions' (niced) jobs. Empty where unavailable."""
    try:
        enabled = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip()
        group = Path("/proc/self/autogroup").read_text().strip()
    except OSError:
        return ""
    return f"{group} (autogroup scheduling {'on' if enabled == '1' else 'off'})"


def machine_info() -> dict[str, Any]:
    """Columns every result row carries (where and with what it was measured)."""
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "cpu_flags": " ".join(f for f in SIMD_FLAGS if f in flags),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "autogroup": autogroup(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------------- timing


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Set torch intra-op threads for a block, restoring the previous value afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest of ``repeats`` calls (the least disturbed by other processes on a shared box)."""
    return min(timed(fn) for _ in range(max(1, repeats)))


def matmul_gflops(threads: int, size: int = 1024, seconds: float = 1.0, dtype=torch.float32) -> float:
    """Sustained square-matmul GFLOP/s (2 n^3 flops per product) at ``threads`` threads.

    Best of several short bursts, so a neighbour's burst of activity does not sink it.
    """
    with torch_threads(threads):
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        for _ in range(2):
            a @ b  # warm-up (oneDNN/MKL initialisation, page faults)
        flops = 2.0 * size**3
        one = timed(lambda: a @ b)
        per_burst = max(1, int(0.2 / max(one, 1e-6)))
        bursts = max(3, int(seconds / max(one * per_burst, 1e-6)))

        def burst() -> None:
            for _ in range(per_burst):
                a @ b

        return flops * per_burst / best_of(burst, bursts) / 1e9


def model_gflops(module: torch.nn.Module, example: torch.Tensor) -> float:
    """GFLOPs of one forward of ``module`` on ``example`` (FlopCounterMode: 2 flops per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        module(example)
    return counter.get_total_flops() / 1e9


# ----------------------------------------------------------------------------------- data


def pbc_table(data: Path) -> pd.DataFrame | None:
    """``path, abspath, label`` of the class-folder data set at ``data`` (None when absent)."""
    manifest = data / "manifest.csv"
    if not manifest.is_file():
        return None
    table = pd.read_csv(manifest, dtype=str)[["path", "label"]]
    table["abspath"] = [str((data / p).resolve()) for p in table["path"]]
    return table.sort_values("path", kind="stable").reset_index(drop=True)


def demo_table(out_dir: Path, n_images: int, seed: int = 0) -> pd.DataFrame:
    """Synthetic stand-in (leukotype.demo) with at least ``n_images`` images, 96 px."""
    from leukotype.demo import make_demo_dataset

    per_patient = 6
    patients = max(1, -(-n_images // (5 * per_patient)))
    manifest = make_demo_dataset(
        out_dir, n_patients_per_subtype=patients, cells_per_patient=per_patient, seed=seed
    )
    table = pd.read_csv(manifest, dtype=str)
    table["abspath"] = [str((manifest.parent / p).resolve()) for p in table["path"]]
    table["label"] = table["subtype"]
    return table[["path", "abspath", "label"]]


def image_table(data: Path, n_images: int, workdir: Path, seed: int = 0) -> tuple[pd.DataFrame, str]:
    """``n_images`` images (class-balanced, seeded) from ``data``, or synthetic ones when absent.

    Returns (table[image_id, path, abspath, label], source description).
    """
    table = pbc_table(Path(data))
    source = f"pbc ({Path(data).name})"  # no machine-specific path in the results
    if table is None:
        table = demo_table(workdir / "demo", n_images, seed)
        source = "synthetic (leukotype.demo)"
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(table))
    # Round-robin over classes so small samples still hold every class.
    by_class: dict[str, list[int]] = {}
    for i in order:
        by_class.setdefault(table["label"].iat[i], []).append(int(i))
    picked: list[int] = []
    while len(picked) < min(n_images, len(table)):
        for members in by_class.values():
            if members and len(picked) < n_images:
                picked.append(members.pop())
    chosen = table.iloc[sorted(picked)].reset_index(drop=True)
    chosen.insert(0, "image_id", [f"img{i:06d}" for i in range(len(chosen))])
    return chosen, source


def sample_table(images: pd.DataFrame, transforms: Sequence[str] = ("identity",)) -> pd.DataFrame:
    """images x transforms as ``image_id, transform, abspath, label`` (the extraction input)."""
    rows = images[["image_id", "abspath", "label"]].merge(
        pd.DataFrame({"transform": list(transforms)}), how="cross"
    )
    return rows[["image_id", "transform", "abspath", "label"]]


@contextlib.contextmanager
def workdir(keep: Path | None = None) -> Iterator[Path]:
    """A scratch folder (deleted afterwards unless ``keep`` is given)."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="leukotype-bench-") as tmp:
        yield Path(tmp)


# -------------------------------------------------------------------------------- results


def write_results(rows: Sequence[Mapping[str, Any]], name: str, out_dir: Path | None = None) -> Path:
    """Write ``rows`` (plus machine columns) to ``<out_dir>/<name>.csv`` atomically."""
    from leukotype.io import atomic_path

    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    # A row's own values (e.g. the load average at its measurement) win over the defaults.
    frame = pd.DataFrame([{**info, **row} for row in rows])
    path = out_dir / f"{name}.csv"
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def base_parser(description: str) -> argparse.ArgumentParser:
    """Arguments every benchmark takes: --quick, --data, --threads, --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="class-folder image set with manifest.csv (synthetic images when absent)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="folder for <name>.csv (bench/results)"
    )
    return parser


def load_avg() -> float:
    """1-minute load average now (rows record it: > cores means neighbours were busy)."""
    return round(os.getloadavg()[0], 2)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Print selected columns as a plain table (stdout; the CSV holds everything)."""
    frame = pd.DataFrame(list(rows))
    present = [c for c in columns if c in frame.columns]
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(frame[present].to_string(index=False, float_format=lambda v: f"{v:.3g}"))


# ------------------------------------------------------------------- conv-shaped GEMM rate

#: A GEMM with the shape of a typical convolution of the big CNNs at batch 32: ResNet-101's
#: layer3 3x3 conv (23 of its 33 blocks run at 14x14 px, 256 channels) as an im2col GEMM,
#: M = 32 * 14 * 14 output pixels, K = 256 * 3 * 3, N = 256 output channels. A square
#: 1024^3 product is smaller than most conv GEMMs and fits in cache differently.
CONV_GEMM_SHAPE = (6272, 2304, 256)


def gemm_gflops(
    threads: int,
    shape: tuple[int, int, int] = CONV_GEMM_SHAPE,
    seconds: float = 0.6,
    dtype=torch.float32,
) -> float:
    """GFLOP/s of an (M, K) x (K, N) product (2 M K N flops), best of short bursts."""
    m, k, n = shape
    with torch_threads(threads), torch.inference_mode():
        a = torch.randn(m, k).to(dtype)
        b = torch.randn(k, n).to(dtype)
        a @ b  # warm-up
        one = timed(lambda: a @ b)
        repeats = max(2, int(seconds / max(one, 1e-6)))
        return 2.0 * m * k * n / best_of(lambda: a @ b, repeats) / 1e9


#: GEMM shapes the hardware ceiling is the best of: two square products, the conv-shaped one
#: above, and a wide one (many output channels, as in VGG's late convs and FC layers at a
#: larger batch). Different shapes reach the peak on different cache/blocking regimes.
CEILING_SHAPES = ((1024, 1024, 1024), (2048, 2048, 2048), CONV_GEMM_SHAPE, (1568, 4608, 512))


def ceiling_gflops(
    threads: int,
    dtype=torch.float32,
    shapes: Sequence[tuple[int, int, int]] = CEILING_SHAPES,
    repeats: int = 3,
    seconds: float = 0.3,
) -> tuple[float, dict[str, float]]:
    """The machine's matrix-product ceiling: the MAXIMUM GFLOP/s over ``shapes`` and
    ``repeats`` (each itself the best of short bursts), with the best rate per shape.

    A ceiling is what the hardware did at its best; a neighbour's load can only lower a sample,
    so the maximum (not a median) is the honest estimate. A measured rate above 100 % of it
    means the ceiling was taken too low, and shows as such in the results.
    """
    per_shape: dict[str, float] = {}
    for shape in shapes:
        best = max(gemm_gflops(threads, shape, seconds, dtype) for _ in range(max(1, repeats)))
        per_shape["x".join(map(str, shape))] = best
    return max(per_shape.values()), per_shape


class RateMonitor:
    """Samples a reference rate (e.g. :func:`ceiling_gflops`) between measurements.

    Call :meth:`sample` before and after each measured run; :attr:`value` is the MAXIMUM of
    the samples: the best rate the machine reached in the same minutes as the runs compared
    to it (load from neighbours only lowers samples, so a median would understate the ceiling).
    """

    def __init__(self, measure: Callable[[], float]) -> None:
        self.measure = measure
        self.samples: list[float] = []

    def sample(self) -> float:
        value = float(self.measure())
        self.samples.append(value)
        return value

    @property
    def value(self) -> float:
        return max(self.samples)

    def describe(self) -> str:
        return ";".join(f"{v:.1f}" for v in self.samples)
