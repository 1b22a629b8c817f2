"""The whole ``features_svm`` path at dataset size, run for real by Snakemake and timed.

A new user's run, at the sizes of issue 12: ``snakemake --cores 2`` with the default config
except for the data and the study:

- data: ``--images`` distinct images derived from the 800 real PBC images
  (``bench/derived_images.py``: seeded crops, translations, reflections, mild colour and JPEG
  changes, the originals' size), in a folder outside the repository, with a manifest whose
  ``group`` is each image's source image, so the group-aware split keeps every source image
  on one side;
- task ``cell_type`` over the 8 PBC classes; EfficientNet-Lite0 with its ImageNet weights
  (shipped in a pip package: offline); strategy ``features_svm`` only; the paper's rotations
  (90/180/270, training part only), 75/25 hold-out: 8,000 images -> 24,000 training rows.

Everything else is the schema's default (``compute.threads`` 2 per extraction job,
``compute.threads_svm`` 2, ``compute.mem_mb_svm`` 8000, ``svm.solver: auto``, the default grid
linear+rbf x C 0.1/1/10, 3 grouped inner folds), and the default target: validate -> split
-> augment -> extract -> train_svm -> evaluate -> tables, comparisons, feature map, model
bundle and reliability figure, in a fresh results folder.

Rows appended to ``bench/results/full_path.csv`` (a row of the same ``--images`` and
``--tag`` is replaced): per rule (jobs, wall seconds summed, CPU seconds and peak RSS from
Snakemake's benchmark files where the rule has one, else wall from the log's stamps), and
the whole run: wall, CPU seconds of the whole process tree (user + sys of every waited-for
descendant, ``RUSAGE_CHILDREN``), peak RSS of its largest process, load average before and
after, the process's niceness, training rows, the SVM's solver, reason and grid, accuracy
with its CI, and the machine (``bench/common.py``).

    python bench/full_path.py --images 8000                       # ~20-25 min on 2 idle cores
    python bench/full_path.py --images 17092 --class-counts pbc   # the full PBC size
    python bench/full_path.py --images 8000 --rerun train_svm    # only the SVM job again
    python bench/full_path.py --images 800 --tag _smoke --out SCRATCH   # smoke run
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import derived_images  # noqa: E402
from paper_grid import job_times  # noqa: E402

NAME = "full_path"
TASK = "cell_type"
BACKBONE = "efficientnet_lite0"
LAYER = "pool"
CLASSES = sorted(derived_images.PBC_CLASS_COUNTS)
#: Columns of a Snakemake benchmark file that are summed / maxed per rule.
BENCH_SUM = ("s", "cpu_time")
BENCH_MAX = ("max_rss",)


def run_config(manifest: Path, results: Path, out: Path, name: str | None = None) -> Path:
    """The study: default config except data, task, model and strategy (module doc)."""
    cfg = {
        "results": str(results),
        "dataset": {"source": str(manifest), "name": name or f"PBC-derived ({manifest.parent.name})"},
        "tasks": [{"name": TASK, "column": "label", "classes": CLASSES}],
        "models": [{"backbone": BACKBONE, "weights": "imagenet", "layers": [LAYER],
                    "strategies": ["features_svm"]}],
    }
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def benchmark_rows(results: Path) -> pd.DataFrame:
    """One row per Snakemake benchmark file: ``rule, file, s, cpu_time, max_rss``."""
    rows = []
    root = Path(results) / "benchmarks"
    for path in sorted(root.rglob("*.tsv")):
        rule = path.relative_to(root).parts[0].removesuffix(".tsv")
        frame = pd.read_csv(path, sep="\t")
        record = {"rule": rule, "file": str(path.relative_to(root))}
        for column in (*BENCH_SUM, *BENCH_MAX):
            value = pd.to_numeric(frame.get(column), errors="coerce")
            record[column] = float(value.iloc[-1]) if value is not None and len(value) else None
        rows.append(record)
    return pd.DataFrame(rows, columns=["rule", "file", *BENCH_SUM, *BENCH_MAX])


def per_rule(log: str, results: Path) -> pd.DataFrame:
    """``rule, jobs, seconds (wall, summed), cpu_seconds, max_rss_mib, source`` per rule:
    Snakemake's benchmark files where the rule writes one, else the log's stamps (1 s)."""
    jobs = job_times(log)
    from_log = jobs.groupby("rule")["seconds"].agg(jobs="count", seconds="sum")
    bench = benchmark_rows(results)
    rows = []
    for rule in sorted(set(from_log.index) | set(bench["rule"])):
        mine = bench[bench["rule"] == rule]
        if len(mine):
            rows.append({"rule": rule, "jobs": len(mine), "seconds": mine["s"].sum(),
                         "cpu_seconds": mine["cpu_time"].sum(),
                         "max_rss_mib": mine["max_rss"].max(), "source": "benchmark file"})
        else:
            rows.append({"rule": rule, "jobs": int(from_log.loc[rule, "jobs"]),
                         "seconds": float(from_log.loc[rule, "seconds"]),
                         "source": "log stamps"})
    return pd.DataFrame(rows)


def svm_facts(results: Path, fold: str = "holdout", from_predictions: bool = False) -> dict:
    """The SVM's solver, reason and searched grid, and the run's accuracy, from its files
    (``from_predictions``: from predictions.tsv, when train_svm ran again without evaluate)."""
    run = Path(results) / "runs" / TASK / "features_svm" / BACKBONE / LAYER / fold
    cv = pd.read_csv(run / "cv_results.tsv", sep="\t")
    best = cv[cv["selected"].astype(str) == "True"].iloc[0]
    grid = ";".join(f"{k}/C={c:g}" for k, c in zip(cv["kernel"], cv["C"]))
    if from_predictions:
        table = pd.read_csv(run / "predictions.tsv", sep="\t", dtype=str)
        table = table[table["transform"] == "identity"]
        correct = float((table["pred"] == table["true"]).mean())
        metrics = {"metrics": {"accuracy": correct}, "ci": {}}
    else:
        metrics = json.loads((run / "metrics.json").read_text())
    ci = metrics.get("ci", {}).get("accuracy") or [None, None]
    return {"svm_solver": best["solver"], "svm_reason": best["solver_reason"],
            "svm_grid": grid, "svm_candidates": len(cv),
            "svm_inner_folds": int(best.get("n_splits", 0)),
            "svm_selected": f"{best['kernel']}/C={best['C']:g}",
            # processes the grid search ran in (cv_results' n_jobs; absent before it was recorded)
            "svm_n_jobs": int(best["n_jobs"]) if "n_jobs" in cv else None,
            "svm_cv_score": float(best.get("mean_test_score", float("nan"))),
            # where the search's time went: each setting's mean seconds per inner fold
            "svm_fit_seconds_per_fold": ";".join(
                f"{k}/C={c:g}:{t:.1f}" for k, c, t in zip(cv["kernel"], cv["C"], cv["mean_fit_time"])),
            "accuracy": float(metrics["metrics"]["accuracy"]),
            "accuracy_ci_lo": ci[0], "accuracy_ci_hi": ci[1],
            "balanced_accuracy": float(metrics["metrics"].get("balanced_accuracy", float("nan")))}


def sample_counts(results: Path) -> dict:
    """Images that passed validation, training rows and test rows of the hold-out."""
    samples = pd.read_csv(Path(results) / "data" / "samples" / f"{TASK}.tsv", sep="\t", dtype=str)
    holdout = samples[samples["fold"] == "holdout"] if "fold" in samples else samples
    return {"n_images": int(holdout["image_id"].nunique()),
            "n_train_rows": int((holdout["part"] == "train").sum()),
            "n_test_rows": int((holdout["part"] == "test").sum()),
            # what the split uses vs what extraction computed (every image x every transform,
            # so that re-splitting never re-extracts: test images' rotations included)
            "n_used_samples": int(samples[["image_id", "transform"]].drop_duplicates().shape[0]),
            "n_extracted_samples": _index_rows(Path(results) / "features" / BACKBONE)}


def _index_rows(folder: Path) -> int | None:
    index = folder / "index.tsv"
    return len(pd.read_csv(index, sep="\t")) if index.is_file() else None


def append_rows(rows: list[dict], path: Path, images: int, tag: str) -> Path:
    """Replace the rows of the same (images, tag) in ``path`` and write it (machine columns)."""
    previous: list[dict] = []
    if path.is_file():
        old = pd.read_csv(path, dtype={"tag": str})
        keep = ~((old["images"] == images) & (old["tag"].fillna("").astype(str) == tag))
        previous = old[keep].to_dict("records")
    fresh = [{**common.machine_info(), **row} for row in rows]
    frame = pd.DataFrame(previous + fresh)
    from leukotype.io import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--class-counts", choices=["balanced", "pbc"], default="balanced")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--images-dir", type=Path, default=None,
                        help="derived images (default $TMPDIR/leukotype_bench/derived_N)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="fresh working folder (default $TMPDIR/leukotype_bench/full_path_N)")
    parser.add_argument("--tag", default="", help="kept in the row; same images+tag replaces")
    parser.add_argument("--from-run", action="store_true",
                        help="only summarise the finished run folder again (no run)")
    parser.add_argument("--rerun", default=None, metavar="RULE",
                        help="in the finished run folder, run only RULE's jobs again (forced) "
                             "and record them with the tag _rerun_RULE (e.g. train_svm after a "
                             "change to the SVM)")
    parser.add_argument("--config", nargs="+", default=[], metavar="KEY=VALUE",
                        help="passed to snakemake --config (e.g. 'svm={kernel: [linear]}' with "
                             "--rerun train_svm and a --tag: a non-default setting, recorded)")
    args = parser.parse_args(argv)
    if args.rerun and not args.tag:
        args.tag = f"_rerun_{args.rerun}"
    images_dir = args.images_dir or derived_images.default_out(args.images)
    manifest = derived_images.write_derived(args.data, args.images, images_dir,
                                            args.class_counts, workers=args.cores)
    run_dir = args.run_dir or images_dir.parent / (
        f"full_path_{args.images}{'' if args.rerun else args.tag}")
    if args.from_run:
        return summarise(run_dir, manifest, args)
    if args.rerun:  # the finished run's folder, only RULE forced
        if not (run_dir / "run_info.json").is_file():
            raise SystemExit(f"--rerun needs a finished run in {run_dir}")
        config = run_dir / "config.yaml"
        # mtime only: a code change elsewhere (e.g. after a rebase) must not re-extract
        extra = ["--forcerun", args.rerun, "--until", args.rerun, "--rerun-triggers", "mtime"]
    else:
        if run_dir.exists():  # a fresh results folder every time
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        config = run_config(manifest, run_dir / "results", run_dir / "config.yaml")
        extra = []
    cmd = [sys.executable, "-m", "snakemake", "-s", str(common.REPO_ROOT / "Snakefile"),
           "--directory", str(run_dir), "--configfile", str(config), "--cores", str(args.cores),
           *extra, *(["--config", *args.config] if args.config else [])]
    env = {**os.environ, "PYTHONPATH": str(common.REPO_ROOT / "src")}
    load_before = os.getloadavg()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=run_dir, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_after = os.getloadavg()
    log = done.stdout + done.stderr
    (run_dir / f"snakemake{args.tag}.log").write_text(log)
    # what only this process saw, kept next to the run (--from-run re-reads it)
    info = {"wall": wall, "user": after.ru_utime - before.ru_utime,
            "system": after.ru_stime - before.ru_stime, "maxrss_kib": after.ru_maxrss,
            "load_before": load_before, "load_after": load_after, "nice": os.nice(0),
            "autogroup": common.autogroup(),
            # the allocator switch the jobs inherit (0: glibc's defaults; see leukotype.allocator)
            "keep_freed_memory": os.environ.get("LEUKOTYPE_KEEP_FREED_MEMORY", "1"),
            "returncode": done.returncode, "started_utc": started_at,
            "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (run_dir / f"run_info{args.tag}.json").write_text(json.dumps(info, indent=1))
    if done.returncode != 0:
        raise SystemExit(f"snakemake failed ({done.returncode}), log in {run_dir}:\n{log[-4000:]}")
    return summarise(run_dir, manifest, args)


def summarise(run_dir: Path, manifest: Path, args) -> Path:
    """The rows of one finished run folder (its log, files and ``run_info.json``)."""
    results = run_dir / "results"
    # a run writes snakemake<tag>.log / run_info<tag>.json; runs from before the tag was part of
    # the names (untagged first runs) have them without
    suffix = args.tag if (run_dir / f"run_info{args.tag}.json").is_file() else ""
    log = (run_dir / f"snakemake{suffix}.log").read_text()
    info = json.loads((run_dir / f"run_info{suffix}.json").read_text())
    wall, load_before, load_after = info["wall"], info["load_before"], info["load_after"]
    user, system = info["user"], info["system"]
    base = {"benchmark": NAME, "images": args.images, "tag": args.tag,
            "config_override": " ".join(args.config),
            "class_counts": args.class_counts, "cores": args.cores, "nice": info["nice"],
            "autogroup": info.get("autogroup", ""),
            "keep_freed_memory": info.get("keep_freed_memory", ""),
            "data": f"derived from {Path(args.data).name} ({derived_images.summary(manifest)['n_sources']} real images)",
            "backbone": BACKBONE, "strategy": "features_svm"}
    total = {**base, "measurement": "total", **sample_counts(results),
             **svm_facts(results, from_predictions=bool(args.rerun)),
             "started_utc": info.get("started_utc"), "finished_utc": info.get("finished_utc"),
             "seconds_wall": wall, "minutes_wall": wall / 60,
             "cpu_seconds": user + system, "user_seconds": user, "sys_seconds": system,
             "peak_rss_mib_largest_process": info["maxrss_kib"] / 1024,
             "load_avg_before_1m": round(load_before[0], 2),
             "load_avg_before_5m": round(load_before[1], 2),
             "load_avg_after_1m": round(load_after[0], 2),
             "load_avg_after_5m": round(load_after[1], 2),
             "load_avg_1m": round(load_after[0], 2),
             "jobs": int(len(job_times(log)))}
    rules = per_rule(log, results)
    if args.rerun:  # the other rules' benchmark files are the first run's
        rules = rules[rules["rule"] == args.rerun]
        total["rerun"] = args.rerun
    rows = [{**base, "measurement": "rule", **row} for row in rules.to_dict("records")]
    svm = rules[rules["rule"] == "train_svm"]
    if len(svm):
        total["svm_seconds"] = float(svm["seconds"].iloc[0])
        total["svm_cpu_seconds"] = float(svm["cpu_seconds"].iloc[0])
    path = append_rows([total, *rows], Path(args.out) / f"{NAME}.csv", args.images, args.tag)
    common.print_table([total, *rows], ["measurement", "rule", "jobs", "seconds", "cpu_seconds",
                                        "max_rss_mib", "minutes_wall", "accuracy"])
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
