"""Smoke runs of the benchmark scripts in bench/ at their --quick sizes.

Each script runs as a subprocess (as a user runs it) writing into a temporary folder; the test
checks the CSV's columns and that the numbers are sane (positive rates, ratios, accuracies in
[0, 1], the expected job counts) -- never timings against a threshold: the machine is shared.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
MACHINE_COLUMNS = {"cpu", "cpus", "torch", "date", "threads", "load_avg_1m", "amx_bf16"}


def run_quick(script: str, tmp_path: Path, shared_data: Path | None = None) -> pd.DataFrame:
    args = [sys.executable, str(BENCH / f"{script}.py"), "--quick", "--threads", "1",
            "--out", str(tmp_path)]
    if shared_data is not None:
        args += ["--data", str(shared_data)]
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    frame = pd.read_csv(tmp_path / f"{script}.csv")
    assert MACHINE_COLUMNS <= set(frame.columns)
    assert (frame["benchmark"] == script).all()
    return frame


@pytest.fixture
def pbc(shared_data: Path) -> Path:
    return shared_data / "pbc"


def test_extraction_ceiling_quick(tmp_path: Path, pbc: Path) -> None:
    frame = run_quick("extraction_ceiling", tmp_path, pbc)
    speed = frame[frame["measurement"].isin(
        ["ceiling", "model_only", "extraction", "naive", "extraction_bf16"])]
    assert set(speed["measurement"]) == {"ceiling", "model_only", "extraction", "naive", "extraction_bf16"}
    assert (speed["images_per_s"] > 0).all()
    assert (speed["gflops_per_image"] > 0).all() and (speed["matmul_gflops"] > 0).all()
    extraction = speed[speed["measurement"] == "extraction"].iloc[0]
    assert extraction["baseline"] == "model_only" and extraction["ratio"] > 0
    assert np.isclose(extraction["fraction_of_ceiling"],
                      extraction["images_per_s"] / extraction["ceiling_images_per_s"])
    # one-off steps (seconds only) are no throughput: no images/s, no fraction of a ceiling
    one_off = frame[frame["measurement"].isin(["model_build", "model_optimize"])]
    assert len(one_off) == 2 and one_off["fraction_of_ceiling"].isna().all()
    accuracy = frame[frame["measurement"] == "svm_accuracy"].set_index("precision")
    assert set(accuracy.index) == {"fp32", "bf16"}
    assert accuracy["accuracy"].between(0, 1).all()
    assert np.isclose(accuracy.loc["bf16", "accuracy_diff_points"],
                      100 * (accuracy.loc["bf16", "accuracy"] - accuracy.loc["fp32", "accuracy"]))


def test_extraction_memory_quick(tmp_path: Path, pbc: Path) -> None:
    frame = run_quick("extraction_memory", tmp_path, pbc).set_index("measurement")
    small, large = frame.loc["peak_rss_N"], frame.loc["peak_rss_4N"]
    assert large["n_samples"] == 4 * small["n_samples"]
    # A Python process with torch is at least ~100 MiB and (at these sizes) far below 8 GiB.
    assert 100 < small["peak_rss_mib"] < 8192 and 100 < large["peak_rss_mib"] < 8192
    growth = frame.loc["growth_4N_vs_N"]
    assert np.isclose(growth["ratio"], large["peak_rss_mib"] / small["peak_rss_mib"], rtol=1e-3)


def test_finetune_fastpath_quick(tmp_path: Path, pbc: Path) -> None:
    frame = run_quick("finetune_fastpath", tmp_path, pbc).set_index("measurement")
    fast, ordinary = frame.loc["fast_path"], frame.loc["ordinary"]
    assert bool(fast["fast_path_used"]) and not bool(ordinary["fast_path_used"])
    assert fast["n_train_samples"] == ordinary["n_train_samples"] > 0
    assert fast["cache_seconds"] > 0 and ordinary["cache_seconds"] == 0
    assert np.isclose(fast["ratio"], ordinary["seconds"] / fast["seconds"])
    # Same batches, same seed: both paths learn the same head up to float noise.
    assert fast["train_loss_abs_diff"] < 1e-3
    assert abs(fast["accuracy_diff_points"]) <= 100 / fast["n_test"] + 1e-9
    # the whole last_block job: the frozen layers run once per sample, same results bit for bit
    job = pd.read_csv(tmp_path / "finetune_fastpath_job.csv")
    assert MACHINE_COLUMNS <= set(job.columns)
    runs = job[job["measurement"].isin(["two_pass", "one_pass"])].set_index("measurement")
    one, two = runs.loc["one_pass"], runs.loc["two_pass"]
    n = one["n_job_samples"]
    assert n == one["n_train_samples"] + one["n_test"] > 0
    # once per sample, plus the samples of the parts' batches that are not the job's batches
    assert one["frozen_samples"] == n + one["repeated_samples"] and two["frozen_samples"] == 2 * n
    assert 0 <= one["repeated_samples"] < one["n_test"] + one["batch_size"]
    assert bool(one["bit_identical"]) and one["baseline"] == "two_pass"
    assert np.isclose(one["ratio"], two["seconds"] / one["seconds"])
    stored = job[job["measurement"] == "store_last_block_input"].set_index("backbone")
    assert stored.loc["efficientnet_lite0", "bytes_per_sample"] == 192 * 7 * 7 * 4
    assert stored.loc["resnet101", "bytes_per_sample"] == 2048 * 7 * 7 * 4
    assert stored.loc["efficientnet_lite0", "seconds_saved_per_sample_per_job"] > 0


def test_workflow_overhead_quick(tmp_path: Path) -> None:
    frame = run_quick("workflow_overhead", tmp_path).set_index("measurement")
    dry = frame.loc["dry_run"]
    assert dry["jobs_total"] > 0 and dry["extract_features_jobs"] >= 1 and dry["finetune_jobs"] >= 1
    rerun = frame.loc["no_change_rerun"]
    assert bool(rerun["nothing_to_be_done"]) and rerun["jobs_total"] == 0
    changed = frame.loc["svm_change_dry_run"]
    assert changed["train_svm_jobs"] == dry["train_svm_jobs"] > 0
    assert changed["extract_features_jobs"] == 0 and changed["finetune_jobs"] == 0


def test_grid_estimate_quick(tmp_path: Path, pbc: Path) -> None:
    frame = run_quick("grid_estimate", tmp_path, pbc)
    units = frame[frame["measurement"] == "unit"].set_index("unit")
    assert (units.loc["extract/alexnet", "seconds_per_sample"] > 0)
    for kind in ("torch", "svm", "evaluate"):
        assert units.loc[f"job_start/{kind}", "seconds"] > 0
    jobs = frame[frame["measurement"] == "grid_job"]
    holdout = jobs[(jobs["images"] == 633) & (jobs["scheme"] == "holdout")].set_index("job")
    # alexnet: every image x 4 transforms is extracted once; 3 tasks fine-tune it.
    assert holdout.loc["extract_features/alexnet", "samples_per_job"] == 633 * 4
    assert holdout.loc["extract_features/alexnet", "count"] == 1
    assert holdout.loc["finetune/alexnet (reuses features)", "count"] == 3
    kfold = jobs[(jobs["images"] == 633) & (jobs["scheme"] == "kfold5")].set_index("job")
    assert kfold.loc["finetune/alexnet (reuses features)", "count"] == 15
    totals = frame[frame["measurement"] == "grid_total"].set_index(["scheme", "variant"])
    assert totals.loc[("kfold5", "reuse"), "seconds_total"] > totals.loc[("holdout", "reuse"), "seconds_total"]
    assert totals.loc[("holdout", "trunk"), "seconds_total"] >= totals.loc[("holdout", "reuse"), "seconds_total"]


def test_paper_grid_reads_job_times_from_the_snakemake_log_and_extrapolates_folds():
    """The full paper-grid run is too long for the suite; its log parsing and arithmetic are not."""
    sys.path.insert(0, str(BENCH))
    import paper_grid

    log = """
[Thu Nov 26 13:14:31 2026]
localrule extract_features:
    input: results/data/validated.tsv
    jobid: 6
    wildcards: backbone=alexnet
[Thu Nov 26 13:14:32 2026]
rule train_svm:
    jobid: 20
    wildcards: task=subtype
[Thu Nov 26 13:15:01 2026]
Finished jobid: 6 (Rule: extract_features)
[Thu Nov 26 13:15:11 2026]
Finished jobid: 20 (Rule: train_svm)
"""
    jobs = paper_grid.job_times(log)
    assert jobs.set_index("jobid")[["rule", "seconds"]].to_dict("index") == {
        6: {"rule": "extract_features", "seconds": 30.0},
        20: {"rule": "train_svm", "seconds": 39.0},
    }
    per_rule = jobs.groupby("rule")["seconds"].agg(seconds_sum="sum")
    five = paper_grid.kfold_extrapolation(per_rule, wall=60.0)
    # extraction once; the SVM five times on 80/75 of the samples, cost ~ n^2
    assert five["seconds_summed"] == pytest.approx(30 + 5 * 39 * (0.8 / 0.75) ** 2)
    assert five["parallelism"] == pytest.approx(69 / 60)
    assert five["seconds_wall"] == pytest.approx(five["seconds_summed"] / (69 / 60))


def test_svm_search_quick(tmp_path: Path) -> None:
    frame = run_quick("svm_search", tmp_path)
    row = frame.iloc[0]
    assert row["candidates"] == 6 and row["rows"] == 200
    assert row["seconds"] > 0 and row["seconds_baseline"] > 0
    # the shared-Gram search is GridSearchCV's search: same choice, same scores, same predictions
    assert bool(row["same_choice"]) and row["max_cv_score_diff"] == 0.0
    assert row["prediction_agreement"] == 1.0


def test_job_imports_quick(tmp_path: Path) -> None:
    frame = run_quick("job_imports", tmp_path).set_index("measurement")
    assert list(frame.index) == ["classify", "classify_skops_plain", "classify_skops_torch_free"]
    # skops plainly imports torch (why the torch-free import exists); leukotype's does not, and
    # both trust the same scikit-learn types
    assert frame["torch_imported"].tolist() == [False, True, False]
    assert frame.loc["classify_skops_torch_free", "trusted_types_equal"] == True  # noqa: E712
    assert frame.loc["classify", "extra_seconds"] == 0.0


def test_svm_scaling_quick(tmp_path: Path) -> None:
    frame = run_quick("svm_scaling", tmp_path)
    accuracy = frame[frame["measurement"] == "accuracy_real"].set_index("solver")
    assert set(accuracy.index) == {"exact", "scalable"}
    assert accuracy["accuracy"].between(0, 1).all()
    assert np.isclose(accuracy.loc["scalable", "accuracy_diff_points"],
                      100 * (accuracy.loc["scalable", "accuracy"] - accuracy.loc["exact", "accuracy"]))
    size = frame[frame["measurement"] == "size"].set_index("solver")
    assert set(size.index) == {"exact", "scalable"}  # the quick size runs both solvers
    assert (size["peak_rss_mib"] >= size["rss_with_data_mib"]).all()
    assert (size["fit_seconds"] > 0).all() and size["accuracy"].between(0, 1).all()
    assert size.loc["scalable", "solver_reason"].startswith("svm.solver: scalable")


def test_extraction_systime_quick(tmp_path: Path, pbc: Path) -> None:
    frame = run_quick("extraction_systime", tmp_path, pbc)
    assert list(frame["num_workers"]) == [1, 0]
    assert (frame["user_s"] > 0).all() and (frame["sys_s"] >= 0).all()
    assert np.allclose(frame["sys_share"], frame["sys_s"] / (frame["user_s"] + frame["sys_s"]))
    assert (frame["minor_faults"] > 0).all()


def test_gpu_check_dry_run(tmp_path: Path, pbc: Path) -> None:
    """The GPU script's CPU mode: the same code paths, tiny, against the CPU itself."""
    done = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--dry-run",
                           "--threads", "1", "--out", str(tmp_path), "--data", str(pbc)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    frame = pd.read_csv(tmp_path / "gpu_check.csv")
    assert MACHINE_COLUMNS <= set(frame.columns) and frame["dry_run"].all()
    features = frame[frame["measurement"] == "features"]
    assert set(features["precision"]) == {"fp32", "bf16"} and len(features) == 4
    fp32 = features[features["precision"] == "fp32"]
    assert (fp32["max_rel_diff"] == 0).all()  # the CPU against itself: identical features
    assert (features[features["precision"] == "bf16"]["max_rel_diff"] < 0.1).all()
    resume = frame[frame["measurement"] == "finetune_resume"].iloc[0]
    assert bool(resume["ok"]) and resume["resumed_from_epoch"] == 1
    assert resume["train_loss_abs_diff"] < 1e-5  # resumed == uninterrupted on the CPU
    svm = frame[frame["measurement"] == "scalable_svm"].iloc[0]
    assert svm["solver"] == "scalable" and svm["accuracy_diff_points"] == 0
    assert (frame["measurement"] == "gpu_memory").sum() == 1


def test_report_prints_every_table_from_the_committed_results() -> None:
    """bench/report.py reads the committed bench/results/*.csv, including an extraction run that
    took no 1-thread row (that column stays blank instead of failing the whole report)."""
    ceiling = pd.read_csv(BENCH / "results" / "extraction_ceiling.csv")
    # the committed run: no figure above its ceiling (that would mean the ceiling is wrong)
    assert ceiling["fraction_of_ceiling"].dropna().between(0, 1).all()
    for flag in ([], ["--readme"]):
        out = subprocess.run([sys.executable, str(BENCH / "report.py"), *flag],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
    table = subprocess.run([sys.executable, str(BENCH / "report.py")], capture_output=True,
                           text=True, timeout=120).stdout
    speed = ceiling[ceiling["measurement"] != "svm_accuracy"]
    for backbone in speed["backbone"].unique():
        assert f"| {backbone} |" in table


def test_report_prints_the_full_path_runs_and_the_forced_rbf_comparison() -> None:
    """The README's tables of the dataset-size runs come from the committed files: every run of
    full_path.csv (its size, minutes and SVM seconds) and the forced-rbf exact vs Nystroem rows."""
    sys.path.insert(0, str(BENCH))
    import report

    results = BENCH / "results"
    full = pd.read_csv(results / "full_path.csv")
    text = report.full_path(results)
    totals = full[full["measurement"] == "total"]
    assert len(totals) >= 1
    for row in totals.itertuples():
        tag = "" if pd.isna(row.tag) else row.tag
        line = next(x for x in text.splitlines() if x.startswith(f"| {row.images} | {tag} |"))
        assert f"{row.minutes_wall:.3g}" in line and row.svm_solver in line
    rules = full[full["measurement"] == "rule"]
    assert set(rules["rule"]) >= {"validate_images", "extract_features", "train_svm"}
    assert "`bench/results/full_path.csv`" in text
    accuracy = report.svm_accuracy(results)
    rbf = pd.read_csv(results / "svm_scaling_rbf.csv")
    assert (rbf["kernels"] == "rbf").all() and "bench/results/svm_scaling_rbf.csv" in accuracy
    readme = subprocess.run([sys.executable, str(BENCH / "report.py"), "--readme"],
                            capture_output=True, text=True, timeout=120).stdout
    assert "The features_svm path at dataset size, run" in readme and "(missing" not in readme
    # target 8: every machine's paper grid file, its wall minutes and CPU, named in the table
    assert "The paper grid, run (target 8)" in readme
    totals = report.paper_grid_totals(results)
    for grid in sorted(results.glob("paper_grid_*.csv")):
        frame = pd.read_csv(grid)
        total = frame[frame["measurement"] == "total"].iloc[0]
        line = next(x for x in totals.splitlines()
                    if f"bench/results/{grid.name}" in x and "| holdout |" in x)
        assert f"{total['minutes_wall']:.3g}" in line and total["cpu"] in line


def test_morphometry_counts_lobes_and_measures_the_nuclear_share_of_a_drawn_cell():
    """bench/external_morphometry.py's measurements on cells of known geometry: a round nucleus
    (one lobe, solid) and two separate lobes, each at two scales; size-free measurements agree
    across the scales."""
    from skimage.draw import disk

    sys.path.insert(0, str(BENCH))
    import external_morphometry as em

    from leukotype.preprocessing import cell_mask

    def cell(size, lobes):
        img = np.full((size, size, 3), (238, 228, 214), dtype=np.float32)
        centre, radius = size / 2, size * 0.3
        img[disk((centre, centre), radius, shape=img.shape[:2])] = (196, 176, 214)
        for dy, dx, r in lobes:
            img[disk((centre + dy * radius, centre + dx * radius), r * radius, shape=img.shape[:2])] = (92, 48, 140)
        img += np.random.default_rng(0).normal(0, 3, img.shape)
        return np.clip(img, 0, 255).astype(np.uint8)

    measured = {}
    for name, lobes in (("round", [(0, 0, 0.6)]), ("two_lobes", [(0, -0.4, 0.3), (0, 0.4, 0.3)])):
        for size in (120, 360):
            rgb = cell(size, lobes)
            measured[name, size] = em.morphometry(rgb, cell_mask(rgb)[0])
    for size in (120, 360):
        round_, two = measured["round", size], measured["two_lobes", size]
        assert round_["n_lobes"] == 1 and two["n_lobes"] == 2
        assert round_["nc_ratio"] == pytest.approx(0.6**2, abs=0.06)  # nucleus area / cell area
        assert two["nc_ratio"] == pytest.approx(2 * 0.3**2, abs=0.05)
        assert round_["nucleus_solidity"] > 0.95 and two["lobes_solidity"] < 0.8  # a gap between lobes
        assert two["largest_lobe_share"] == pytest.approx(0.5, abs=0.08)
    for key in ("nc_ratio", "nucleus_circularity", "nucleus_max_thickness"):
        assert measured["round", 120][key] == pytest.approx(measured["round", 360][key], rel=0.1), key
