"""Peak memory of an extraction job for N and 4N samples (does it stay flat?).

Each extraction runs in its own child process (this script with ``--child``); the parent reads
the child's peak resident set size (``ru_maxrss`` from ``os.wait4``), so neither the parent's
imports nor an earlier run count. A third child that only imports and builds the model gives
the fixed floor. Samples are images x {identity, rot90, rot180, rot270}, as the workflow
extracts them.

    python bench/extraction_memory.py             # efficientnet_lite0, N=64 vs 4N=256
    python bench/extraction_memory.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "extraction_memory"
TRANSFORMS = ("identity", "rot90", "rot180", "rot270")


def run_child(args: list[str]) -> tuple[float, float]:
    """Run this script as a child with ``args``; return (peak RSS MiB, wall seconds)."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, __file__, "--child", *args])
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"child {args} failed with exit code {process.returncode}")
    return usage.ru_maxrss / 1024.0, wall  # Linux: ru_maxrss is in KiB


def child(spec_json: str) -> None:
    """Extraction (or, with n == 0, only the imports and the model) inside the child."""
    import pandas as pd

    from leukotype.backbones import build_model, get_spec
    from leukotype.features import extract_features

    spec = json.loads(spec_json)
    if spec["n"] == 0:
        build_model(get_spec(spec["backbone"]), None, seed=0)
        return
    samples = pd.read_csv(spec["samples"], sep="\t", dtype=str).head(spec["n"])
    extract_features(
        samples, spec["backbone"], None, [get_spec(spec["backbone"]).default_layer],
        spec["out"], batch_size=spec["batch_size"], num_workers=spec["num_workers"],
        threads=spec["threads"], progress=False,
    )


def main(argv: list[str] | None = None) -> Path:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--n", type=int, default=64, help="samples of the small run (4N too)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return Path()
    if args.quick:
        args.backbone, args.n, args.batch_size, args.num_workers = "paper_cnn", 4, 2, 0

    rows = []
    with common.workdir() as scratch:
        images, source = common.image_table(args.data, -(-4 * args.n // len(TRANSFORMS)), scratch)
        samples = common.sample_table(images, TRANSFORMS).head(4 * args.n)
        table = scratch / "samples.tsv"
        samples.to_csv(table, sep="\t", index=False)
        base = {"backbone": args.backbone, "samples": str(table), "batch_size": args.batch_size,
                "num_workers": args.num_workers, "threads": args.threads}
        results = {}
        # The floor child (imports + model only) is skipped in --quick to keep the smoke run short.
        runs = ([] if args.quick else [("floor", 0)]) + [("N", args.n), ("4N", 4 * args.n)]
        for label, n in runs:
            spec = {**base, "n": n, "out": str(scratch / f"out_{label}")}
            peak, wall = run_child([json.dumps(spec)])
            results[label] = peak
            rows.append({
                "benchmark": NAME, "backbone": args.backbone, "measurement": f"peak_rss_{label}",
                "n_samples": n, "peak_rss_mib": round(peak, 1), "seconds": wall,
                "threads": args.threads, "batch_size": args.batch_size,
                "num_workers": args.num_workers, "weights": "none", "data": source,
                "load_avg_1m": common.load_avg(),
            })
    growth = results["4N"] / results["N"] - 1.0
    rows.append({
        "benchmark": NAME, "backbone": args.backbone, "measurement": "growth_4N_vs_N",
        "n_samples": 4 * args.n, "ratio": results["4N"] / results["N"], "growth_pct": 100 * growth,
        "above_floor_N_mib": results["N"] - results.get("floor", float("nan")),
        "above_floor_4N_mib": results["4N"] - results.get("floor", float("nan")),
        "threads": args.threads, "batch_size": args.batch_size, "num_workers": args.num_workers,
        "weights": "none",
    })
    path = common.write_results(rows, NAME, args.out)
    common.print_table(rows, ["measurement", "n_samples", "peak_rss_mib", "seconds", "ratio",
                              "growth_pct"])
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
