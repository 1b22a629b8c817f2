"""Markdown tables from bench/results/*.csv (what bench/README.md shows).

    python bench/report.py            # prints the tables
    python bench/report.py --readme   # the tables of README.md's Performance section
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _md(frame: pd.DataFrame) -> str:
    def fmt(value) -> str:
        if isinstance(value, float):
            if pd.isna(value):
                return ""
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def extraction(results: Path) -> str:
    frame = pd.read_csv(results / "extraction_ceiling.csv")
    speed = frame[frame["measurement"] != "svm_accuracy"]
    out = []
    for backbone, rows in speed.groupby("backbone", sort=False):
        by = rows.set_index("measurement")
        # a measurement or column a run did not take (e.g. --quick has no 1-thread row) is blank
        get = lambda m, c: by[c].get(m, float("nan")) if c in by else float("nan")  # noqa: E731
        out.append({
            "backbone": backbone,
            "GFLOPs/img": get("ceiling", "gflops_per_image"),
            "matmul GFLOP/s": get("ceiling", "matmul_gflops"),
            "ceiling img/s": get("ceiling", "images_per_s"),
            "model-only img/s": get("model_only", "images_per_s"),
            "extraction img/s": get("extraction", "images_per_s"),
            "extraction / ceiling": get("extraction", "fraction_of_ceiling"),
            "extraction / model-only": get("extraction", "ratio"),
            "naive img/s": get("naive", "images_per_s"),
            "extraction / naive": get("extraction", "speedup_vs_naive"),
            "bf16 / fp32": get("extraction_bf16", "ratio"),
            "2 thr / 1 thr": get("extraction", "ratio_vs_threads1"),
            "load": get("extraction", "load_avg_1m"),
        })
    text = _md(pd.DataFrame(out))
    acc = frame[frame["measurement"] == "svm_accuracy"]
    separate = results / "extraction_bf16_accuracy.csv"  # the accuracy part run on its own
    if not len(acc) and separate.is_file():
        acc = pd.read_csv(separate)
    if len(acc):
        text += "\n\n" + _md(acc[["backbone", "precision", "n_images", "n_test", "images_per_s",
                                  "accuracy", "accuracy_diff_points"]])
    return text


def memory(results: Path) -> str:
    frame = pd.read_csv(results / "extraction_memory.csv")
    return _md(frame[["backbone", "measurement", "n_samples", "peak_rss_mib", "ratio",
                      "growth_pct"]])


def finetune(results: Path) -> str:
    frame = pd.read_csv(results / "finetune_fastpath.csv")
    return _md(frame[["backbone", "policy", "measurement", "n_train_samples", "epochs", "seconds",
                      "cache_seconds", "accuracy", "ratio", "accuracy_diff_points"]])


def finetune_job(results: Path) -> str:
    frame = pd.read_csv(results / "finetune_fastpath_job.csv")
    runs = frame[frame["measurement"].isin(["two_pass", "one_pass"])]
    stored = frame[frame["measurement"] == "store_last_block_input"]
    return "\n\n".join([
        _md(runs[["backbone", "policy", "measurement", "n_images", "n_job_samples", "epochs",
                  "seconds", "cache_seconds", "frozen_samples", "ratio", "bit_identical",
                  "load_avg_1m"]]),
        _md(stored[["backbone", "bytes_per_sample", "penultimate_bytes_per_sample",
                    "gb_full_pbc_rotations", "seconds_saved_per_sample_per_job"]]),
    ])


def workflow(results: Path) -> str:
    frame = pd.read_csv(results / "workflow_overhead.csv")
    cols = ["measurement", "config", "split", "seconds", "seconds_median", "jobs_total",
            "extract_features_jobs", "finetune_jobs", "train_svm_jobs", "nothing_to_be_done",
            "load_avg_1m"]
    return _md(frame[[c for c in cols if c in frame.columns]])


def grid(results: Path) -> str:
    frame = pd.read_csv(results / "grid_estimate.csv")
    units = frame[frame["measurement"] == "unit"][["unit", "seconds_per_sample", "seconds",
                                                   "exponent"]]
    jobs = frame[(frame["measurement"] == "grid_job") & (frame["images"] == frame["images"].min())]
    jobs = jobs[["scheme", "job", "count", "samples_per_job", "seconds_per_job", "seconds_total"]]
    totals = frame[frame["measurement"] == "grid_total"][["images", "scheme", "variant",
                                                          "hours_total"]]
    return "\n\n".join([_md(units), _md(jobs), _md(totals)])


def _paper_grid_frame(results: Path) -> pd.DataFrame:
    """Every paper_grid_<precision>[<tag>].csv, one file per machine and precision."""
    files = sorted(results.glob("paper_grid_*.csv"))
    if not files:
        raise FileNotFoundError(2, "no paper_grid_<precision>.csv", str(results / "paper_grid_*.csv"))
    return pd.concat([pd.read_csv(f).assign(file=f"bench/results/{f.name}") for f in files],
                     ignore_index=True)


def paper_grid(results: Path) -> str:
    frame = _paper_grid_frame(results)
    rules = frame[frame["measurement"] == "rule"][["cpu", "precision", "rule", "jobs",
                                                    "seconds_sum", "seconds_max", "file"]]
    return "\n\n".join([_md(rules), paper_grid_totals(results)])


def paper_grid_totals(results: Path) -> str:
    """The grid's wall time per machine and precision (target 8: <= 30 min on 2 cores), with
    the summed job seconds of the four heavy rules."""
    frame = _paper_grid_frame(results)
    out = []
    for (file, scheme), rows in frame[frame["measurement"] != "rule"].groupby(
            ["file", "scheme"], sort=False):
        total = rows.iloc[0]
        rule = frame[(frame["file"] == file) & (frame["measurement"] == "rule")]
        rule = rule.set_index("rule")["seconds_sum"]
        out.append({
            "cpu": total["cpu"], "precision": total["precision"], "scheme": scheme,
            "measurement": total["measurement"], "images": total["images"],
            "cores": total["cores"], "jobs": total.get("jobs"),
            "minutes_wall": total["minutes_wall"],
            **{f"{r} s": rule.get(r, float("nan")) if scheme == "holdout" else float("nan")
               for r in ("extract_features", "finetune", "train_svm", "evaluate")},
            "autogroup": total.get("autogroup", ""), "load_avg_1m": total["load_avg_1m"],
            "file": file,
        })
    return _md(pd.DataFrame(out))


def _scaling_frame(results: Path) -> pd.DataFrame:
    files = sorted(f for f in results.glob("svm_scaling*.csv") if "partial" not in f.name)
    if not files:
        raise FileNotFoundError(2, "no svm_scaling*.csv", str(results / "svm_scaling.csv"))
    frames = [pd.read_csv(f).assign(file=f"bench/results/{f.name}") for f in files]
    return pd.concat(frames, ignore_index=True)


def _pick(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    return frame[[c for c in columns if c in frame.columns]]


def svm_accuracy(results: Path) -> str:
    frame = _scaling_frame(results)
    acc = frame[frame["measurement"] == "accuracy_real"]
    return _md(_pick(acc, ["solver", "kernels", "n_train_rows", "n_test", "accuracy",
                           "accuracy_diff_points", "diff_ci_lo_points", "diff_ci_hi_points",
                           "n_predictions_differ", "fit_seconds", "fit_cpu_seconds",
                           "peak_rss_mib", "selected", "load_avg_1m", "file"]))


def svm_sizes(results: Path) -> str:
    frame = _scaling_frame(results)
    size = frame[frame["measurement"] == "size"].sort_values(["n_train_rows", "solver"])
    return _md(_pick(size, ["n_train_rows", "solver", "grid", "process_seconds", "fit_seconds",
                            "peak_rss_mib", "rss_with_data_mib", "accuracy", "kernel", "C",
                            "load_avg_1m", "file"]))


def svm_estimate(results: Path) -> str:
    frame = _scaling_frame(results)
    parts = []
    est = frame[frame["measurement"] == "estimate_8000_images"]
    if len(est):
        parts.append(_md(_pick(est, ["n_images", "n_train_rows", "validate_seconds",
                                     "extract_seconds", "svm_seconds", "svm_solver",
                                     "total_minutes", "file"])))
    val = frame[frame["measurement"] == "validation_rate"]
    if len(val):
        parts.append(_md(_pick(val, ["n_images", "threads", "images_per_s", "load_avg_1m",
                                     "file"])))
    store = frame[frame["measurement"] == "feature_store"]
    if len(store):
        parts.append(_md(_pick(store, ["backbone", "layers", "n_rows",
                                       "bytes_per_sample_matrix", "bytes_per_sample_index",
                                       "gib_total", "source", "file"])))
    return "\n\n".join(parts)


def svm_scaling(results: Path) -> str:
    return "\n\n".join([svm_accuracy(results), svm_sizes(results), svm_estimate(results)])


def systime(results: Path) -> str:
    files = [results / "extraction_systime.csv"]
    files += sorted(f for f in results.glob("extraction_systime_*.csv"))  # later re-runs
    frame = pd.concat([pd.read_csv(f).assign(file=f"bench/results/{f.name}") for f in files],
                      ignore_index=True)
    return _md(_pick(frame, ["setting", "n_samples", "samples_per_s", "user_s", "sys_s",
                             "sys_share", "faults_per_sample", "involuntary_switches",
                             "load_avg_1m", "date", "file"]))


def full_path(results: Path) -> str:
    """The whole features_svm path at dataset size (bench/full_path.py): one row per run, then
    the run's rules."""
    frame = pd.read_csv(results / "full_path.csv")
    totals = frame[frame["measurement"] == "total"].sort_values("images")
    rules = frame[frame["measurement"] == "rule"].sort_values(["images", "seconds"],
                                                              ascending=[True, False])
    return "\n\n".join([
        _md(_pick(totals, ["images", "tag", "n_train_rows", "n_used_samples", "n_extracted_samples", "jobs",
                           "minutes_wall", "cpu_seconds", "peak_rss_mib_largest_process",
                           "svm_seconds", "svm_cpu_seconds", "svm_n_jobs", "svm_solver", "svm_candidates",
                           "svm_selected", "accuracy", "accuracy_ci_lo", "accuracy_ci_hi",
                           "nice", "load_avg_before_1m", "load_avg_after_1m"])),
        _md(_pick(rules, ["images", "tag", "rule", "jobs", "seconds", "cpu_seconds",
                          "max_rss_mib", "source"])),
    ]) + "\n\nSource: `bench/results/full_path.csv`"


def slurm_allocator(results: Path) -> str:
    """The allocator fix through SLURM (bench/slurm_allocator.py): the extraction sbatch job's
    own numbers, glibc's defaults against the package's settings."""
    frame = pd.read_csv(results / "slurm_allocator.csv")
    return _md(_pick(frame, ["setting", "keep_freed_memory_applied", "images", "samples", "user_s",
                             "sys_s", "sys_share", "faults_per_sample", "extract_wall_s",
                             "extract_max_rss_mib", "workflow_wall_s", "accuracy",
                             "load_avg_1m", "autogroup"])) + "\n\nSource: `bench/results/slurm_allocator.csv`"


def ceiling_targets(results: Path) -> str:
    """Targets 1-4 against the run's own best-GEMM ceiling (README's Performance table)."""
    frame = pd.read_csv(results / "extraction_ceiling.csv")
    speed = frame[frame["measurement"] != "svm_accuracy"]
    out = []
    for backbone, rows in speed.groupby("backbone", sort=False):
        by = rows.set_index("measurement")
        get = lambda m, c: by[c].get(m, float("nan")) if c in by.columns else float("nan")  # noqa: E731
        out.append({
            "backbone": backbone,
            "fp32 ceiling GFLOP/s (max)": get("ceiling", "matmul_gflops"),
            "bf16 ceiling GFLOP/s (max)": get("ceiling", "ceiling_bf16_gflops"),
            "1: extraction / fp32 ceiling": get("extraction", "fraction_of_ceiling"),
            "model-only / fp32 ceiling": get("model_only", "fraction_of_ceiling"),
            "2: extraction / naive": get("extraction", "speedup_vs_naive"),
            "3: bf16 / fp32": get("extraction_bf16", "ratio"),
            "bf16 / bf16 ceiling": get("extraction_bf16", "fraction_of_ceiling"),
            "4: extraction / model-only": get("extraction", "ratio"),
            "load": get("extraction", "load_avg_1m"),
        })
    return _md(pd.DataFrame(out)) + "\n\nSource: `bench/results/extraction_ceiling.csv`"


#: The tables of README.md's Performance section, in order, each with the file it comes from.
README_TABLES = [
    ("The features_svm path at dataset size, run", full_path),
    ("Targets 1-4 against the measured ceiling", ceiling_targets),
    ("Scalable vs exact SVM on real features", svm_accuracy),
    ("SVM stage by training rows", svm_sizes),
    ("8,000 images, composed estimate; feature store", svm_estimate),
    ("The paper grid, run (target 8)", paper_grid_totals),
    ("Extraction user vs sys CPU", systime),
]


def readme(results: Path) -> None:
    for title, fn in README_TABLES:
        try:
            print(f"**{title}**\n\n{fn(results)}\n")
        except FileNotFoundError as err:
            print(f"**{title}**\n\n(missing: {err.filename})\n")


def gpu_check(results: Path) -> str:
    frame = pd.read_csv(results / "gpu_check.csv")
    cols = ["measurement", "backbone", "device", "precision", "max_rel_diff", "images_per_s",
            "ratio", "ok", "train_loss_abs_diff", "accuracy", "cpu_accuracy", "gpu_name",
            "nvidia_smi_used_mib", "dry_run"]
    return _md(frame[[c for c in cols if c in frame.columns]])


def main() -> None:
    results = common.RESULTS_DIR
    if "--readme" in sys.argv[1:]:  # the tables of README.md's Performance section
        readme(results)
        return
    for title, fn in [("Extraction", extraction), ("Memory", memory), ("Fine-tuning", finetune),
                      ("Fine-tuning job", finetune_job),
                      ("Workflow", workflow), ("Paper grid, run", paper_grid),
                      ("Grid estimate", grid), ("Full path at size", full_path),
                      ("SVM scaling", svm_scaling),
                      ("Extraction sys time", systime),
                      ("Allocator fix through SLURM", slurm_allocator), ("GPU check", gpu_check)]:
        try:
            print(f"### {title}\n\n{fn(results)}\n")
        except FileNotFoundError as err:
            print(f"### {title}\n\n(missing: {err.filename})\n")


if __name__ == "__main__":
    main()
