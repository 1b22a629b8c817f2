"""The whole paper grid, run for real by Snakemake on this machine, timed job by job.

``configs/paper.yaml`` as published -- five ImageNet backbones and the paper CNN, three
strategies, three tasks, the 75/25 hold-out, rotations 90/180/270, 20 epochs -- with two
changes for a timing run:

- the images are ``--images`` real PBC cells (default 633, the paper's count) from ``--data``,
  listed in a manifest whose ``element``/``subtype`` columns are *stand-in labels* mapped from
  the PBC class (the paper's bone-marrow images are not public). Every task uses every image,
  an upper bound on the paper's cost;
- ``weights: none`` for every backbone (the same FLOPs as ImageNet weights, nothing to stage),
  so the accuracies of this run mean nothing and are not reported.

The run is ``snakemake --cores <cores>`` from scratch in a temporary folder (``--keep DIR`` keeps
it). Rows written to ``bench/results/paper_grid_<precision>.csv``: the wall time of the whole
run, and per rule the number of jobs and the sum / max of their wall times (from the Snakemake log's start
and finish stamps, 1 s resolution). The 5-fold figure is extrapolated from these per-job times:
extraction is shared by all folds (features of every sample are extracted once), every other
job runs once per fold, on 80 % instead of 75 % of the images (fine-tuning cost linear in the
training samples, SVM cost ~ n^2), and the wall time keeps the hold-out run's ratio of wall time
to summed job time (the parallelism Snakemake achieved on ``--cores``).

    python bench/paper_grid.py                    # fp32: about 50 min on 2 cores
    python bench/paper_grid.py --precision bf16   # bf16 extraction (AMX): about 25 min
    python bench/paper_grid.py --quick            # 48 images, AlexNet + paper CNN, 1 epoch
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "paper_grid"
#: Stand-in labels (timing only): each PBC class plays one of the paper's labels.
STAND_IN_SUBTYPE = {
    "basophil": "L1", "eosinophil": "L1", "erythroblast": "L2", "ig": "M2",
    "lymphocyte": "L2", "monocyte": "M5", "neutrophil": "M3", "platelet": "M2",
}
STAND_IN_ELEMENT = {
    "basophil": "nucleus", "eosinophil": "cellula", "erythroblast": "nucleus", "ig": "cellula",
    "lymphocyte": "nucleus", "monocyte": "cellula", "neutrophil": "cellula", "platelet": "nucleus",
}
#: Rules whose cost does not grow with the number of folds.
ONCE_PER_STUDY = {"validate_images", "extract_features", "fetch_weights"}
STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]")


def manifest(data: Path, n_images: int, out: Path, seed: int = 0) -> Path:
    """``n_images`` PBC images, balanced over classes, with stand-in element/subtype labels."""
    table = common.pbc_table(data)
    if table is None:
        raise SystemExit(f"{data} has no manifest.csv: this benchmark needs the real PBC images")
    per_class = -(-n_images // table["label"].nunique())
    per_class = min(per_class, int(table["label"].value_counts().min()))
    picked = (
        table.groupby("label").sample(n=per_class, random_state=seed)
        .sample(frac=1.0, random_state=seed)
        .head(n_images)
    )
    if len(picked) < n_images:
        raise SystemExit(f"{data} has only {len(picked)} images for a balanced pick of {n_images}")
    frame = pd.DataFrame(
        {
            "path": picked["abspath"],
            "element": picked["label"].map(STAND_IN_ELEMENT),
            "subtype": picked["label"].map(STAND_IN_SUBTYPE),
        }
    )
    frame.to_csv(out, index=False)
    return out


def timing_config(manifest_path: Path, out: Path, quick: bool, precision: str = "fp32") -> Path:
    cfg = yaml.safe_load((common.REPO_ROOT / "configs" / "paper.yaml").read_text())
    cfg["results"] = "results"
    cfg["dataset"] = {"source": str(manifest_path), "name": "timing run: PBC cells, stand-in labels"}
    # the manifest lists the PBC images where they lie, outside the scratch folder it is in
    cfg["validation"] = {**cfg.get("validation", {}), "allow_outside_paths": True}
    # bf16 for the ImageNet networks only; fine-tuning takes the features' precision so that the
    # head still trains on the extracted features. The paper CNN trains in fp32 either way.
    cfg.setdefault("features", {})["precision"] = precision
    cfg["finetune"]["precision"] = precision
    for model in cfg["models"]:
        if model["backbone"] != "paper_cnn":
            model["weights"] = "none"
        else:
            model["finetune"] = {**model.get("finetune", {}), "precision": "fp32"}
    if quick:
        cfg["models"] = [m for m in cfg["models"] if m["backbone"] in ("alexnet", "paper_cnn")]
        cfg["finetune"]["epochs"] = 1
        cfg["evaluation"] = {"n_bootstrap": 50}
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def job_times(log: str) -> pd.DataFrame:
    """(rule, jobid, seconds) of every finished job, from the log's time stamps."""
    stamp, started, rule_of, rows = None, {}, {}, []
    current_rule = None
    for line in log.splitlines():
        match = STAMP.match(line)
        if match:
            stamp = datetime.strptime(match.group(1), "%a %b %d %H:%M:%S %Y")
            continue
        text = line.strip()
        if text.startswith(("rule ", "localrule ")) and text.endswith(":"):
            current_rule = text.split()[1].rstrip(":")
        elif text.startswith("jobid:") and current_rule is not None:
            jobid = int(text.split()[1])
            started[jobid], rule_of[jobid] = stamp, current_rule
            current_rule = None
        elif text.startswith("Finished jobid:"):
            jobid = int(re.search(r"Finished jobid: (\d+)", text).group(1))
            if jobid in started and stamp is not None:
                rows.append({"rule": rule_of[jobid], "jobid": jobid,
                             "seconds": (stamp - started[jobid]).total_seconds()})
    return pd.DataFrame(rows, columns=["rule", "jobid", "seconds"])


def kfold_extrapolation(per_rule: pd.DataFrame, wall: float, k: int = 5) -> dict[str, float]:
    """Summed job seconds and wall seconds of the same grid with k-fold CV (see module doc)."""
    scale_train = (1 - 1 / k) / 0.75
    summed_holdout = float(per_rule["seconds_sum"].sum())
    summed = 0.0
    for rule, row in per_rule.iterrows():
        seconds = float(row["seconds_sum"])
        if rule in ONCE_PER_STUDY:
            summed += seconds
        elif rule == "train_svm":
            summed += k * seconds * scale_train**2
        elif rule == "finetune":
            summed += k * seconds * scale_train
        else:
            summed += k * seconds
    parallelism = summed_holdout / wall if wall > 0 else 1.0
    return {"seconds_summed": summed, "seconds_wall": summed / max(parallelism, 1.0),
            "parallelism": parallelism}


def _commit() -> str:
    """The code measured (git commit of the checkout the benchmark runs from, if any)."""
    done = subprocess.run(["git", "-C", str(common.REPO_ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False)
    return done.stdout.strip() or os.environ.get("LEUKOTYPE_BENCH_COMMIT", "")


def main(argv: list[str] | None = None) -> Path:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=633)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="extraction (and head fine-tuning) precision")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run's folder here")
    parser.add_argument("--tag", default="",
                        help="results go to paper_grid_<precision><tag>.csv (e.g. _epyc: one "
                             "file per machine, so another machine's rows stay as they are)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images = 48
    with common.workdir(args.keep) as scratch:
        config = timing_config(manifest(args.data, args.images, scratch / "manifest.csv"),
                               scratch / "paper_timing.yaml", args.quick, args.precision)
        cmd = [sys.executable, "-m", "snakemake", "-s", str(common.REPO_ROOT / "Snakefile"),
               "--directory", str(scratch), "--configfile", str(config),
               "--cores", str(args.cores), "--config", f"torch_home={scratch / 'torch'}"]
        load_before = common.load_avg()
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=scratch, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        log = done.stdout + done.stderr
        (scratch / "snakemake.log").write_text(log)
        if done.returncode != 0:
            raise SystemExit(f"snakemake failed ({done.returncode}):\n{log[-4000:]}")
    jobs = job_times(log)
    per_rule = jobs.groupby("rule")["seconds"].agg(jobs="count", seconds_sum="sum", seconds_max="max")
    common_cols = {"benchmark": NAME, "images": args.images, "cores": args.cores,
                   "commit": _commit(),
                   "precision": args.precision,
                   "weights": "none", "data": f"{args.data.name} (stand-in labels)",
                   "load_avg_before": load_before, "load_avg_1m": common.load_avg()}
    rows = [{**common_cols, "measurement": "rule", "scheme": "holdout", "rule": rule, **row}
            for rule, row in per_rule.reset_index().set_index("rule").to_dict("index").items()]
    rows.append({**common_cols, "measurement": "total", "scheme": "holdout", "jobs": len(jobs),
                 "seconds_sum": float(jobs["seconds"].sum()), "seconds_wall": wall,
                 "minutes_wall": wall / 60})
    kfold = kfold_extrapolation(per_rule, wall)
    rows.append({**common_cols, "measurement": "extrapolated", "scheme": "kfold5",
                 "seconds_sum": kfold["seconds_summed"], "seconds_wall": kfold["seconds_wall"],
                 "minutes_wall": kfold["seconds_wall"] / 60, "parallelism": kfold["parallelism"]})
    path = common.write_results(rows, f"{NAME}_{args.precision}{args.tag}", args.out)
    common.print_table(rows, ["measurement", "scheme", "rule", "jobs", "seconds_sum",
                              "seconds_max", "minutes_wall"])
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
