"""End-to-end: the whole workflow on a tiny synthetic study (configs/test.yaml), offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from workflow_helpers import REPO, bundle_round_trip, planned_jobs, snakemake

pytestmark = pytest.mark.e2e

CONFIG = REPO / "configs" / "test.yaml"
TASKS = {"cellular": 2, "subtype": 5, "lineage": 2}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("study")
    snakemake(workdir, configfile=CONFIG)
    return workdir


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", keep_default_na=False, dtype={"group": str, "image_id": str})


def test_validation_accepts_every_synthetic_image(study):
    validated = read(study / "results/data/validated.tsv")
    # 5 subtypes x 4 patients x 2 cells x (nucleus + whole cell)
    assert len(validated) == 80
    assert (validated["status"] == "ok").all()
    assert set(validated["subtype"]) == {"L1", "L2", "M2", "M3", "M5"}
    assert set(validated["element"]) == {"nucleus", "cellula"}
    assert validated["group"].nunique() == 20  # synthetic patients


@pytest.mark.parametrize("task", TASKS)
def test_split_keeps_patients_together_and_augments_training_only(study, task):
    split = read(study / f"results/data/splits/{task}.tsv")
    parts = split.groupby("group")["part"].nunique()
    assert (parts == 1).all(), "a patient straddles train and test"
    test_fraction = (split["part"] == "test").mean()
    assert 0.1 <= test_fraction <= 0.4
    samples = read(study / f"results/data/samples/{task}.tsv")
    train, test = samples[samples["part"] == "train"], samples[samples["part"] == "test"]
    assert set(test["transform"]) == {"identity"}
    assert len(train) == 4 * (split["part"] == "train").sum()
    transforms_per_image = train.groupby("image_id")["transform"].apply(lambda t: tuple(sorted(t)))
    assert set(transforms_per_image) == {("identity", "rot180", "rot270", "rot90")}


@pytest.mark.parametrize("task", TASKS)
def test_paper_tables_have_one_row_per_model_and_strategy(study, task):
    table = pd.read_csv(study / f"results/tables/{task}.csv")
    assert len(table) == 5
    assert set(table["Technique"]) == {"Feature extraction", "Fine tuning", "Fine tuning + SVM"}
    assert set(table["Data"]) == {"SYNTHETIC: synthetic test set"}  # labelled synthetic everywhere
    assert (study / f"results/tables/{task}.md").read_text().count("\n") >= 7
    assert "\\begin{tabular}" in (study / f"results/tables/{task}.tex").read_text()
    for figure in (f"{task}_accuracy.png", f"{task}_confusion.png"):
        assert (study / "results/figures" / figure).stat().st_size > 5_000


def test_metrics_record_config_seed_and_versions(study):
    runs = read(study / "results/tables/all_runs.tsv")
    assert len(runs) == 15
    assert runs["accuracy"].between(0, 1).all()
    record = json.loads(
        (study / "results/runs/cellular/features_svm/efficientnet_lite0/pool/holdout/metrics.json").read_text()
    )
    assert record["provenance"]["versions"]["torch"] == "2.14.1"
    assert record["provenance"]["config"]["split"]["seed"] == 7
    assert record["n_test"] == (read(study / "results/data/splits/cellular.tsv")["part"] == "test").sum()
    # nucleus-only vs whole-cell crops differ in extent: ImageNet features separate them
    assert record["metrics"]["accuracy"] >= 0.9
    # which SVM solver ran, and why (svm.solver: auto; a small kernel matrix -> exact)
    assert record["classifier"]["solver"] == "exact"
    assert record["classifier"]["solver_reason"].startswith("auto: ")
    assert record["classifier"]["kernel"] in ("linear", "rbf")


def test_every_run_reports_ece_and_brier_with_intervals_and_the_tables_show_ece(study):
    """ECE and Brier of the test predictions (recomputed here from predictions.tsv), with
    bootstrap intervals, in every run's row; the paper tables' ECE column is 100 x ECE."""
    from leukotype.calibration import brier_score, expected_calibration_error

    runs = read(study / "results/tables/all_runs.tsv")
    for metric in ("ece", "brier"):
        assert runs[metric].between(0, 2).all()
        assert (runs[f"{metric}_ci_low"] <= runs[f"{metric}_ci_high"]).all()
    run = runs[(runs["task"] == "subtype") & (runs["strategy"] == "finetune")].iloc[0]
    path = f"results/runs/subtype/finetune/{run['backbone']}/{run['layer']}/holdout/predictions.tsv"
    test = read(study / path).query("transform == 'identity'")
    classes = ["L1", "L2", "M2", "M3", "M5"]
    probs, labels = test[[f"prob_{c}" for c in classes]].to_numpy(), test["true"].map(classes.index).to_numpy()
    assert run["ece"] == pytest.approx(expected_calibration_error(probs, labels))
    assert run["brier"] == pytest.approx(brier_score(probs, labels))
    for task in TASKS:
        table = pd.read_csv(study / f"results/tables/{task}.csv")
        assert sorted(table["ECE"]) == sorted((100 * runs.loc[runs["task"] == task, "ece"]).round(1))


def test_finetune_writes_history_curve_and_resumable_checkpoint(study):
    run = study / "results/runs/subtype/finetune/paper_cnn/softmax/holdout"
    history = read(run / "history.tsv")
    assert history["epoch"].tolist() == [1, 2]
    assert (run / "learning_curve.png").stat().st_size > 5_000
    assert list((study / "results/checkpoints/subtype/paper_cnn/holdout").glob("*.pt"))


def test_rerun_with_nothing_changed_does_nothing(study):
    result = snakemake(study, "-n", configfile=CONFIG)
    assert planned_jobs(result) == {}
    assert "Nothing to be done" in result.stdout + result.stderr


def _changed_config(study: Path, **changes) -> Path:
    """The test config with some settings changed, written back with keys reordered (sorted):
    reordering alone must not count as a change."""
    cfg = yaml.safe_load(CONFIG.read_text())
    for key, value in changes.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = study / "changed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_changed_svm_setting_reruns_no_extraction_and_no_training(study):
    result = snakemake(study, "-n", configfile=_changed_config(study, svm={"C": [10]}))
    jobs = planned_jobs(result)
    assert jobs.get("train_svm") == 9
    for rule in ("extract_features", "finetune", "validate_images", "split", "augment"):
        assert rule not in jobs


def test_changed_split_reruns_split_and_downstream_only(study):
    result = snakemake(study, "-n", configfile=_changed_config(study, split={"seed": 8}))
    jobs = planned_jobs(result)
    assert jobs["split"] == 3 and jobs["augment"] == 3 and jobs["finetune"] == 6 and jobs["train_svm"] == 9
    for rule in ("extract_features", "validate_images", "demo_data"):
        assert rule not in jobs


def test_execution_settings_reschedule_nothing_and_result_settings_rerun(study):
    """Device, inference batch size, workers and the optimised path change how a job runs, not
    its result: they are not rule params. A training setting is, and reruns training only."""
    execution = _changed_config(
        study,
        features={"batch_size": 3, "num_workers": 1, "device": "cpu", "optimize": False},
        finetune={"epochs": 2, "batch_size": 16, "device": "cpu"},
    )
    assert planned_jobs(snakemake(study, "-n", configfile=execution)) == {}
    for change in ({"lr": 0.01}, {"head_init": "probe"}):
        jobs = planned_jobs(snakemake(study, "-n", configfile=_changed_config(study, finetune=change)))
        assert jobs["finetune"] == 6, change
        for rule in ("extract_features", "validate_images", "split", "augment"):
            assert rule not in jobs
    # head_init at its default (added after the study ran) is no change at all
    default = _changed_config(study, finetune={"head_init": "random"})
    assert planned_jobs(snakemake(study, "-n", configfile=default)) == {}


def _scored(path: Path) -> pd.DataFrame:
    table = read(path)
    return table[table["transform"] == "identity"].set_index("image_id").sort_index()


@pytest.mark.parametrize("task", TASKS)
def test_comparisons_recompute_from_the_runs_predictions(study, task):
    from math import comb

    results = study / "results"
    pairs = pd.read_csv(results / f"tables/{task}_comparisons.csv")
    assert len(pairs) == 10  # 5 runs: every pair once
    assert set(pairs["test"]) == {"exact McNemar"} and set(pairs["test_set"]) == {"internal"}

    def run_dir(key):
        strategy, model = key.split(":")
        backbone, layer = model.rsplit("-", 1)
        return results / "runs" / task / strategy / backbone / layer / "holdout"

    for row in pairs.itertuples():
        a, b = _scored(run_dir(row.run_a) / "predictions.tsv"), _scored(run_dir(row.run_b) / "predictions.tsv")
        assert list(a.index) == list(b.index)  # the same test images
        right_a, right_b = a["pred"] == a["true"], b["pred"] == b["true"]
        assert (row.a_only, row.b_only) == ((right_a & ~right_b).sum(), (~right_a & right_b).sum())
        n, k = row.a_only + row.b_only, min(row.a_only, row.b_only)
        p = 1.0 if n == 0 else min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n)
        assert row.p_value == pytest.approx(p)
        for side, key in (("a", row.run_a), ("b", row.run_b)):
            record = json.loads((run_dir(key) / "metrics.json").read_text())
            assert getattr(row, f"accuracy_{side}") == pytest.approx(record["metrics"]["accuracy"])
        assert row.accuracy_diff == pytest.approx(row.accuracy_a - row.accuracy_b)
        assert row.accuracy_diff >= 0  # run A is the higher-ranked
        assert row.accuracy_ci_lo <= row.accuracy_ci_hi
    # Holm by hand: sorted p times (m - rank), running maximum, capped at 1
    order = pairs["p_value"].sort_values(kind="stable")
    running, expected = 0.0, {}
    for rank, (index, value) in enumerate(order.items()):
        running = max(running, min(1.0, (len(order) - rank) * value))
        expected[index] = running
    assert pairs["p_holm"].tolist() == pytest.approx([expected[i] for i in pairs.index])

    table = pd.read_csv(results / f"tables/{task}.csv", keep_default_na=False)
    assert (table["vs best"] == "best").sum() == 1
    best = table.loc[table["vs best"] == "best", "Accuracy"].astype(float).iloc[0]
    assert best == table["Accuracy"].astype(float).max()
    best_key = pairs.loc[pairs["rank_a"] == 1, "run_a"].iloc[0]
    worse = pairs[(pairs["run_a"] == best_key) & pairs["significant"]]
    assert (table["vs best"] == "worse").sum() == len(worse)

    per_class = pd.read_csv(results / f"tables/{task}_per_class.csv", keep_default_na=False)
    assert per_class["run"].nunique() == 5 and per_class["class"].nunique() == TASKS[task]
    for key, rows in per_class.groupby("run"):
        record = json.loads((run_dir(key) / "metrics.json").read_text())
        assert rows["support"].sum() == record["n_test"]
        for r in rows.itertuples():
            assert r.recall == pytest.approx(record["per_class"][r[4]]["recall"])
    assert (results / f"figures/{task}_comparisons.png").stat().st_size > 5_000


def test_feature_map_and_published_baselines_on_the_study(study, tmp_path):
    from leukotype.stages import run_summarise

    assert (study / "results/figures/features/efficientnet_lite0-pool.png").stat().st_size > 20_000
    results = study / "results"
    cfg = yaml.safe_load(CONFIG.read_text())
    task = next(t for t in cfg["tasks"] if t["name"] == "subtype")
    metrics = sorted(results.glob("runs/subtype/*/*/*/holdout/metrics.json"))
    baseline = {"study": "Khan & Tehsin 2022, Table 3", "task": "subtype", "model": "Inception V3",
                "strategy": "features_svm", "metrics": {"accuracy": 0.875}, "n_images": 633,
                "split": "75/25 hold-out", "citation": "Khan & Tehsin 2022"}
    table = run_summarise(metrics, task, tmp_path / "subtype.csv", tmp_path / "acc.png", tmp_path / "cm.png",
                          comparisons=results / "tables/subtype_comparisons.csv", baselines=[baseline])
    assert len(table) == 6 and table["Source"].tolist()[:5] == ["this workflow"] * 5
    published = table.iloc[5]
    assert published["Accuracy"] == "87.5" and published["vs best"] == ""
    assert published["Source"] == "Khan & Tehsin 2022, Table 3 (published, not reproduced here; 633 images)"


def test_html_report_holds_tables_and_figures(study):
    snakemake(study, "--report", "report.html", configfile=CONFIG)
    html = (study / "report.html").read_text(errors="replace")
    assert len(html) > 50_000
    for name in ("cellular_accuracy.png", "subtype_confusion.png", "lineage.csv",
                 "subtype_comparisons.png", "lineage_comparisons.csv", "efficientnet_lite0-pool.png"):
        assert name in html


def test_lint_is_clean(tmp_path):
    result = snakemake(tmp_path, "--lint", configfile=CONFIG)
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def test_config_typo_fails_before_any_job_with_valid_choices(tmp_path):
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["models"][0]["backbone"] = "efficientnet_lite"
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = snakemake(tmp_path, "-n", configfile=path, check=False)
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert "models[0].backbone: 'efficientnet_lite' is not valid; choose one of" in message
    assert "'efficientnet_lite0'" in message
    assert not (tmp_path / "results").exists()


def test_missing_imagenet_weights_are_fetched_before_extraction(tmp_path):
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["models"] = [{"backbone": "resnet101", "weights": "imagenet"}]
    cfg["torch_home"] = str(tmp_path / "torch")
    path = tmp_path / "resnet.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = snakemake(tmp_path, "-n", configfile=path)
    jobs = planned_jobs(result)
    assert jobs["fetch_weights"] == 1 and jobs["extract_features"] == 1
    assert "hub/checkpoints/resnet101-" in result.stdout


def test_workflow_runs_on_a_user_folder_dataset(tmp_path):
    """A class-folder dataset with a space and non-ASCII characters in names."""
    from leukotype.demo import make_demo_dataset

    demo = make_demo_dataset(tmp_path / "gen", n_patients_per_subtype=2, cells_per_patient=2, image_size=64, seed=3)
    manifest = pd.read_csv(demo)
    root = tmp_path / "my cells"
    for row in manifest[manifest["element"] == "cellula"].itertuples():
        target = root / f"Typ {row.subtype}" / f"zelle ä {Path(row.path).name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo.parent / row.path, target)
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["dataset"] = {"source": str(root)}
    cfg["tasks"] = [{"name": "subtype", "classes": [f"Typ {s}" for s in ["L1", "L2", "M2", "M3", "M5"]]}]
    cfg["models"] = [{"backbone": "efficientnet_lite0", "weights": "imagenet"}]
    path = tmp_path / "folder.yaml"
    path.write_text(yaml.safe_dump(cfg))
    snakemake(tmp_path, configfile=path)
    validated = read(tmp_path / "results/data/validated.tsv")
    assert len(validated) == 20 and (validated["status"] == "ok").all()
    assert validated["path"].str.contains("zelle ä").all()
    table = pd.read_csv(tmp_path / "results/tables/subtype.csv")
    assert table["Model"].tolist() == ["EfficientNet-Lite0"]


def test_offline_node_without_staged_weights_stops_before_extraction(tmp_path):
    """No internet (an unreachable proxy stands in for it) and nothing staged: fetch_weights
    fails with the file and the command to stage it, and no extraction job starts."""
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["models"] = [{"backbone": "alexnet", "weights": "imagenet"}]
    cfg["torch_home"] = str(tmp_path / "torch")
    path = tmp_path / "alexnet.yaml"
    path.write_text(yaml.safe_dump(cfg))
    offline = {key: "http://127.0.0.1:9" for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
    result = snakemake(tmp_path, configfile=path, check=False, env=offline)
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert "cannot download https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in message
    assert "localrule extract_features" not in message and "rule extract_features" not in message
    assert not (tmp_path / "results" / "features").exists()


# ------------------------------------------------------------------ model bundles (issue 11)


def test_export_model_bundles_the_best_run_of_each_task(study):
    for task in TASKS:
        folder = study / "results/models" / task
        spec = json.loads((folder / "bundle.json").read_text())
        runs = read(study / "results/tables/all_runs.tsv")
        best = runs[runs["task"] == task]["balanced_accuracy"].max()
        assert spec["metrics"]["metrics"]["balanced_accuracy"] == pytest.approx(best)
        assert spec["task"]["name"] == task and len(spec["classes"]) == TASKS[task]
        card = (folder / "MODEL_CARD.md").read_text()
        assert "not a medical device" in card and "SYNTHETIC" in card
        listed = {line.split("  ", 1)[1] for line in (folder / "MANIFEST.sha256").read_text().splitlines()}
        # (Snakemake's hidden .snakemake_timestamp in directory outputs is not part of a bundle)
        files = {p.relative_to(folder).as_posix() for p in folder.rglob("[!.]*") if p.is_file()}
        assert listed == files - {"MANIFEST.sha256"}
    lineage = json.loads((study / "results/models/lineage/bundle.json").read_text())
    # the training data's validation, which predict applies to new images
    assert lineage["validation"] == {"min_side": 32, "max_pixels": 50_000_000, "max_aspect_ratio": 5,
                                     "allow_outside_paths": False}
    assert lineage["task"]["derive"] == {"ALL": ["L1", "L2"], "AML": ["M2", "M3", "M5"]}
    assert lineage["provenance"]["config"]["split"]["seed"] == 7


def test_bundles_reproduce_the_workflows_test_predictions(study, tmp_path):
    """Every kind of bundle: SVM on backbone features, softmax head on frozen features, the
    paper CNN's network (softmax and its features -> SVM)."""
    from leukotype.config import Run
    from leukotype.export import export_run

    bundle_round_trip(study / "results/models/subtype", study)  # features -> SVM (the best run)
    for strategy, backbone, layer in [
        ("finetune", "efficientnet_lite0", "softmax"),
        ("finetune", "paper_cnn", "softmax"),
        ("finetune_svm", "paper_cnn", "finetuned"),
    ]:
        run = Run("subtype", strategy, backbone, layer, "holdout")
        bundle_round_trip(export_run(study / "results", run, tmp_path / strategy / backbone), study)


def test_predict_rule_lists_bad_files_with_reasons_and_predicts_the_rest(study):
    inbox = study / "inbox"
    inbox.mkdir()
    validated = read(study / "results/data/validated.tsv")
    good = validated["abspath"].head(3).tolist()
    for path in good:
        shutil.copy(path, inbox / Path(path).name)
    (inbox / "empty.png").write_bytes(b"")
    (inbox / "notes.txt").write_text("not an image\n")
    (inbox / "cut.png").write_bytes(Path(good[0]).read_bytes()[:200])
    from PIL import Image

    Image.new("RGB", (8, 8)).save(inbox / "tiny.png")
    Image.new("RGB", (400, 40)).save(inbox / "strip.png")  # the bundle's max_aspect_ratio: 5
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["predict"] = {"model": "results/models/subtype", "images": ["inbox"]}
    path = study / "predict.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = snakemake(study, "results/predictions/predictions.csv", configfile=path)
    assert planned_jobs(result) == {"predict": 1}  # the rest of the study is up to date
    table = pd.read_csv(study / "results/predictions/predictions.csv", keep_default_na=False)
    assert len(table) == 8  # nothing skipped
    reasons = dict(zip(table["path"].map(lambda p: Path(p).name), table["reason"].str.split(":").str[0]))
    assert reasons["empty.png"] == "zero_bytes" and reasons["notes.txt"] == "not_an_image"
    assert reasons["cut.png"] in {"truncated", "not_an_image"} and reasons["tiny.png"] == "too_small"
    assert reasons["strip.png"] == "extreme_aspect_ratio"
    ok = table[table["status"] == "ok"]
    assert len(ok) == 3 and set(ok["pred"]) <= {"L1", "L2", "M2", "M3", "M5"}
    probs = ok[[f"prob_{c}" for c in ["L1", "L2", "M2", "M3", "M5"]]].astype(float).to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(ok["confidence"].astype(float), probs.max(axis=1))
    assert ok["top_k"].str.split(";").str.len().eq(3).all()
    assert set(ok["ood"].astype(str)) <= {"True", "False"}
    assert (table.loc[table["status"] != "ok", "pred"] == "").all()


def test_explain_writes_an_overlay_per_valid_image_and_lists_bad_ones(study, tmp_path):
    from PIL import Image

    from leukotype.cli import main

    validated = read(study / "results/data/validated.tsv")
    good = validated["abspath"].head(2).tolist()
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    out = tmp_path / "maps"
    assert main(["explain", "--model", str(study / "results/models/subtype"), *good, str(bad), "--out", str(out)]) == 0
    listed = read(out / "explain.tsv")
    assert listed["status"].tolist() == ["ok", "ok", "rejected"]
    assert listed["reason"].iloc[2].startswith("not_an_image")
    for name in listed["overlay"].iloc[:2]:
        with Image.open(out / name) as overlay:
            assert overlay.size == (224, 224) and overlay.mode == "RGB"  # EfficientNet-Lite0's input
    assert set(listed["pred"].iloc[:2]) <= {"L1", "L2", "M2", "M3", "M5"}


@pytest.mark.parametrize("task", TASKS)
def test_gallery_shows_the_best_runs_most_confident_right_and_wrong_test_cells(study, task):
    """figures/<task>_gallery.png: of the run export_model bundled, the 4 most confident correct
    and 4 most confident wrong test cells (fewer if fewer), true classes in turn, with maps."""
    bundle = json.loads((study / f"results/models/{task}/bundle.json").read_text())
    predictions = read(study / "results" / bundle["run"]["path"] / "predictions.tsv")
    test = predictions[predictions["transform"] == "identity"].copy()
    classes = bundle["classes"]
    test["confidence"] = test[[f"prob_{c}" for c in classes]].max(axis=1)
    gallery = read(study / f"results/tables/{task}_gallery.tsv")
    truth = test.set_index("image_id")
    for kind, right in (("correct", True), ("wrong", False)):
        pool = test[(test["true"] == test["pred"]) == right]
        pool = pool.sort_values(["confidence", "image_id"], ascending=[False, True])
        pool = pool.assign(rank=pool.groupby("true").cumcount()).sort_values(["rank", "true"], kind="stable")
        shown = gallery[gallery["kind"] == kind]
        assert len(shown) == min(4, len(pool))
        assert shown["image_id"].tolist() == pool["image_id"].head(4).tolist()
        assert ((truth.loc[shown["image_id"], "true"] == truth.loc[shown["image_id"], "pred"]) == right).all()
        assert shown["pred"].tolist() == truth.loc[shown["image_id"], "pred"].tolist()
    assert len(gallery) > 0 and (gallery["map"] == "yes").all()
    assert (study / f"results/figures/{task}_gallery.png").stat().st_size > 10_000
