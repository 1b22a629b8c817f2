"""configs/pbc.yaml's external rows through the real workflow, checked against the bench scripts.

Runs the workflow (``snakemake``, the repository's Snakefile) with ``configs/pbc.yaml`` and an
overlay that puts it in the protocol of ``bench/external_recipes.py`` and
``bench/external_adaptation.py`` (the task restricted to PBC's five white-cell classes, no
rotations, EfficientNet-Lite0 features -> SVM; the config's preprocessing variants ``none`` and
``crop15_wb_grey`` and its external set JTSC as shipped; BatchNorm adaptation on), then reads
the workflow's own metrics records (``runs/.../metrics.json`` and
``runs/.../external/<set>/<adapt>/metrics.json``, the numbers behind
``tables/<task>_external.*``) and writes one row per (variant, adaptation) to
``bench/results/pbc_dag_external.csv``: internal accuracy (all five classes, and on the four
shared with JTSC), external accuracy and balanced accuracy with the workflow's bootstrap CIs,
and the bench scripts' numbers for the same setting with the difference in points.

    .venv/bin/python bench/pbc_dag_external.py --run            # ~10-20 min on 2 busy cores
    .venv/bin/python bench/pbc_dag_external.py                  # re-read a finished run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, RESULTS_DIR, machine_info  # noqa: E402

#: The overlay on configs/pbc.yaml: the bench scripts' protocol (what differs from the shipped config).
OVERLAY = """\
tasks:
  - name: cell_type
    column: label
    classes: [basophil, eosinophil, lymphocyte, monocyte, neutrophil]
augmentation: {rotations: []}
models:
  - {backbone: efficientnet_lite0, weights: imagenet, strategies: [features_svm]}
evaluation:
  adapt_batchnorm: true
"""


def run_workflow(run_dir: Path, cores: int) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    overlay = run_dir / "overlay.yaml"
    overlay.write_text(f"results: {run_dir / 'results'}\n{OVERLAY}")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO_ROOT / "Snakefile"),
           "--configfile", str(REPO_ROOT / "configs" / "pbc.yaml"), str(overlay),
           "--cores", str(cores)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    start = time.perf_counter()
    # from the repository root: configs/pbc.yaml names its data relative to it (../shared/data)
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    (run_dir / "snakemake.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise SystemExit(f"snakemake failed ({done.returncode}); see {run_dir / 'snakemake.log'}")
    return {"wall_s": round(time.perf_counter() - start, 1), "cores": cores}


def bench_numbers(recipe: str, adapt: str) -> dict[str, Any]:
    """The bench scripts' row for the same setting (external_recipes.csv for no adaptation,
    external_adaptation.csv for BatchNorm adaptation)."""
    if adapt == "none":
        table = pd.read_csv(RESULTS_DIR / "external_recipes.csv")
        rows, source = table[table["recipe"] == recipe], "external_recipes.csv"
    else:
        table = pd.read_csv(RESULTS_DIR / "external_adaptation.csv")
        rows = table[(table["experiment"] == f"svm:{recipe}:efficientnet_lite0") & (table["adaptation"] == adapt)]
        source = "external_adaptation.csv"
    if rows.empty:
        return {"bench_source": source}
    row = rows.iloc[0]
    return {"bench_source": source, "bench_internal_accuracy": row["internal_accuracy"],
            "bench_external_accuracy": row["external_accuracy"]}


def summarise(results: Path) -> pd.DataFrame:
    rows = []
    for path in sorted(results.glob("runs/*/*/*/*/*/external/*/*/metrics.json")):
        record = json.loads(path.read_text())
        run_dir = path.parents[3]
        internal = json.loads((run_dir / "metrics.json").read_text())
        backbone_folder = path.parents[6].name
        prep = backbone_folder.split("@", 1)[1] if "@" in backbone_folder else "none"
        ext_m, ext_ci = record["external_metrics"], record["external_ci"]
        row = {
            "task": record["task"], "strategy": record["strategy"], "backbone": record["backbone"],
            "layer": record["layer"], "fold": record["fold"], "preprocessing": prep, "adapt": record["adapt"],
            "external": record["external"], "shared_classes": " ".join(record["shared_classes"]),
            "n_internal_test": internal["n_test"], "n_internal_shared": record["n_internal"],
            "n_external": record["n_external"],
            "internal_accuracy": internal["metrics"]["accuracy"],
            "internal_shared_accuracy": record["internal_metrics"]["accuracy"],
            "external_accuracy": ext_m["accuracy"],
            "external_accuracy_ci_low": ext_ci["accuracy"][0], "external_accuracy_ci_high": ext_ci["accuracy"][1],
            "external_balanced_accuracy": ext_m["balanced_accuracy"],
            "external_balanced_accuracy_ci_low": ext_ci["balanced_accuracy"][0],
            "external_balanced_accuracy_ci_high": ext_ci["balanced_accuracy"][1],
            "drop_points": 100 * (internal["metrics"]["accuracy"] - ext_m["accuracy"]),
            **bench_numbers(prep, record["adapt"]),
        }
        for part in ("internal", "external"):
            if f"bench_{part}_accuracy" in row:
                row[f"{part}_minus_bench_points"] = 100 * (row[f"{part}_accuracy"] - row[f"bench_{part}_accuracy"])
        row["config_preprocessing"] = json.dumps(record["provenance"].get("config", {}).get("preprocessing"))
        rows.append(row)
    if not rows:
        raise SystemExit(f"no external metrics under {results}/runs")
    return pd.DataFrame(rows).sort_values(["preprocessing", "adapt"]).reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("/tmp/leukotype-pbc-dag-external"),
                        help="the workflow's working folder (results/ inside)")
    parser.add_argument("--run", action="store_true", help="run the workflow first (else re-read a finished run)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "pbc_dag_external.csv")
    args = parser.parse_args(argv)
    info = run_workflow(args.run_dir, args.cores) if args.run else {}
    if not info and (args.run_dir / "run_info.json").exists():
        info = json.loads((args.run_dir / "run_info.json").read_text())
    elif info:
        (args.run_dir / "run_info.json").write_text(json.dumps(info))
    table = summarise(args.run_dir / "results")
    table["overlay"] = OVERLAY.replace("\n", " ").strip()
    for key, value in {**info, **machine_info()}.items():
        table[key] = value
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".csv.tmp")
    table.to_csv(tmp, index=False)
    tmp.replace(args.out)
    print(table[["preprocessing", "adapt", "internal_accuracy", "external_accuracy", "external_balanced_accuracy",
                 "bench_external_accuracy"]].to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
