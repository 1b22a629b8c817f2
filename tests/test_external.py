"""External test sets: config checks, label mapping, scoring, and isolation from training."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pandas as pd
import pytest
import yaml

from leukotype.config import task_from_dict, validate_config
from leukotype.errors import LeukotypeError
from leukotype.external import ExternalSet, evaluate_external, external_samples
from workflow_helpers import REPO, snakemake

TEST_CONFIG = yaml.safe_load((REPO / "configs" / "test.yaml").read_text())


def config_with(external):
    cfg = copy.deepcopy(TEST_CONFIG)
    cfg.setdefault("evaluation", {})["external"] = external
    return cfg


def test_label_mapping_to_an_unknown_class_fails_at_validation_listing_the_choices():
    cfg = config_with([{"name": "lab2", "source": "x", "labels": {"subtype": {"blast": "M9"}}}])
    with pytest.raises(LeukotypeError) as err:
        validate_config(cfg)
    message = str(err.value)
    assert "'blast' maps to unknown class 'M9'" in message
    assert "['L1', 'L2', 'M2', 'M3', 'M5']" in message


def test_unknown_task_and_duplicate_names_fail_at_validation():
    cfg = config_with([
        {"name": "lab2", "source": "x", "labels": {"subtyp": {"a": "L1"}}},
        {"name": "lab2", "source": "y"},
    ])
    with pytest.raises(LeukotypeError) as err:
        validate_config(cfg)
    assert "unknown task 'subtyp'; configured tasks: ['cellular', 'lineage', 'subtype']" in str(err.value)
    assert "name 'lab2' is used twice" in str(err.value)


def test_a_shot_weight_must_be_positive_or_balanced_and_needs_few_shot_cells():
    with pytest.raises(LeukotypeError) as err:
        validate_config(config_with([{"name": "lab2", "source": "x", "train_per_class": 2, "shot_weight": 0}]))
    assert "shot_weight" in str(err.value)
    with pytest.raises(LeukotypeError) as err:
        validate_config(config_with([{"name": "lab2", "source": "x", "shot_weight": "balanced"}]))
    assert "shot_weight sets how few-shot cells are used, but train_per_class is 0" in str(err.value)
    with pytest.raises(LeukotypeError) as err:
        validate_config(config_with([{"name": "lab2", "source": "x", "train_per_class": 2, "shot_method": "mix"}]))
    assert "shot_method: 'mix' is not valid; choose one of ['pooled', 'augment']" in str(err.value)
    # the schema's choices are the package's (one list of methods, read by both)
    from leukotype.external import SHOT_METHODS

    schema = json.loads((REPO / "workflow/schemas/config.schema.json").read_text())
    entry = schema["properties"]["evaluation"]["properties"]["external"]["items"]["properties"]
    assert tuple(entry["shot_method"]["enum"]) == SHOT_METHODS
    cfg = validate_config(config_with([{"name": "lab2", "source": "x", "train_per_class": 2}]))
    assert "shot_weight" not in cfg["evaluation"]["external"][0]  # no new param for existing studies
    ext = ExternalSet.from_dict({"name": "lab2", "source": "x", "train_per_class": 2, "shot_weight": "balanced"})
    assert ext.weight_per_shot(300, 75) == 4.0
    assert ExternalSet.from_dict({"name": "lab2", "source": "x", "shot_weight": 2.5}).weight_per_shot(300, 75) == 2.5


def test_valid_external_entry_gets_its_defaults():
    cfg = validate_config(config_with([{"name": "lab2", "source": "x"}]))
    (entry,) = cfg["evaluation"]["external"]
    assert entry["min_images_per_class"] == 5 and entry["labels"] == {} and entry["column"] is None
    assert cfg["evaluation"]["adapt_batchnorm"] is False


def _validated(labels, status=None):
    n = len(labels)
    return pd.DataFrame({
        "image_id": [f"img{i:06d}" for i in range(n)],
        "path": [f"{lab}/{i}.bmp" for i, lab in enumerate(labels)],
        "abspath": [f"/x/{lab}/{i}.bmp" for i, lab in enumerate(labels)],
        "label": labels,
        "group": [f"g{i}" for i in range(n)],
        "status": status or ["ok"] * n,
    })


def test_external_samples_map_labels_and_list_what_is_not_scored():
    task = task_from_dict({"name": "cell_type", "column": "label", "classes": ["basophil", "lymphocyte", "neutrophil", "platelet"]})
    labels = ["neutrophil"] * 6 + ["lymph"] * 5 + ["basophil"] + ["smudge"] * 2 + ["neutrophil"]
    status = ["ok"] * 14 + ["rejected"]
    ext = ExternalSet.from_dict({"name": "lab2", "source": "x", "labels": {"cell_type": {"neutrophil": "neutrophil", "lymph": "lymphocyte", "basophil": "basophil"}}})
    samples, summary = external_samples(_validated(labels, status), task, ext)
    assert summary["shared_classes"] == ["lymphocyte", "neutrophil"]
    assert summary["excluded_classes"] == {"basophil": "too_few_images: 1 < min_images_per_class 5"}
    assert summary["unmapped_labels"] == {"smudge": 2}
    assert summary["n_rejected"] == 1 and summary["n_scored"] == 11
    assert samples["label"].value_counts().to_dict() == {"neutrophil": 6, "lymphocyte": 5}
    assert set(samples["transform"]) == {"identity"}
    # identity mapping without labels: only labels equal to a task class
    samples, summary = external_samples(_validated(labels, status), task, ExternalSet.from_dict({"name": "l", "source": "x"}))
    assert summary["shared_classes"] == ["neutrophil"] and summary["unmapped_labels"] == {"lymph": 5, "smudge": 2}


def test_derived_task_maps_source_labels_by_default():
    task = task_from_dict({"name": "lineage", "column": "subtype", "classes": ["ALL", "AML"], "derive": {"ALL": ["L1", "L2"], "AML": ["M2", "M3", "M5"]}})
    ext = ExternalSet.from_dict({"name": "l", "source": "x", "min_images_per_class": 1})
    frame = _validated(["L1", "M3", "M5"]).rename(columns={"label": "subtype"})
    samples, summary = external_samples(frame, task, ext)
    assert samples["label"].tolist() == ["ALL", "AML", "AML"] and summary["shared_classes"] == ["ALL", "AML"]


def _predictions(true, pred, prefix="e"):
    return pd.DataFrame({"image_id": [f"{prefix}{i}" for i in range(len(true))], "transform": "identity", "true": true, "pred": pred})


def test_external_metrics_on_shared_classes_next_to_internal_and_the_drop():
    classes = ["a", "b", "c"]
    # external set shares a and b; one of its images is predicted as c (a class it lacks): wrong
    ext_pred = _predictions(["a"] * 4 + ["b"] * 4, ["a", "a", "a", "c", "b", "b", "a", "a"])
    internal = _predictions(["a"] * 2 + ["b"] * 2 + ["c"] * 4, ["a", "a", "b", "b", "a", "c", "c", "c"], prefix="i")
    samples = ext_pred[["image_id"]].assign(group=[f"g{i}" for i in range(8)])
    summary = {"external": "lab2", "shared_classes": ["a", "b"], "excluded_classes": {}, "unmapped_labels": {}, "n_rejected": 0}
    record = evaluate_external(ext_pred, internal, samples, {f"i{i}": f"i{i}" for i in range(8)}, summary, classes, {"task": "t"}, n_boot=200, seed=0)
    assert record["n_external"] == 8 and record["n_internal"] == 4  # internal restricted to a, b
    assert record["external_metrics"]["accuracy"] == pytest.approx(5 / 8)
    assert record["external_metrics"]["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 4) / 2)
    assert record["internal_metrics"]["accuracy"] == pytest.approx(1.0)
    assert record["drop"]["accuracy"] == pytest.approx(3 / 8)
    low, high = record["external_ci"]["accuracy"]
    assert low <= 5 / 8 <= high and high - low > 0


def test_external_comparisons_mark_each_sets_best_run_and_those_not_significantly_worse(tmp_path):
    """compare_external's stage on real external records: McNemar on the set's scored images,
    the adapted run a run of its own, and the external table's 'vs best' from that table."""
    from leukotype.stages_external import run_compare_external, run_evaluate_external, run_external_table

    task = {"name": "subtype", "column": "subtype", "classes": ["a", "b", "c"]}
    ext_cfg = {"name": "lab2", "source": "x", "display": "second lab"}
    n = 40  # scored images: a and b (c is not in the set); one unmapped label is not scored
    true = ["a", "b"] * (n // 2)
    validated = pd.DataFrame({"image_id": [f"e{i:02d}" for i in range(n + 1)], "abspath": "/x.png",
                              "subtype": true + ["blast"], "group": [f"p{i // 2}" for i in range(n + 1)],
                              "status": "ok"})
    validated.to_csv(tmp_path / "validated.tsv", sep="\t", index=False)
    samples = pd.DataFrame({"image_id": [f"i{i}" for i in range(8)], "group": [f"i{i}" for i in range(8)],
                            "transform": "identity", "label": "a", "fold": "holdout",
                            "part": ["train"] * 6 + ["test"] * 2})
    samples.to_csv(tmp_path / "samples.tsv", sep="\t", index=False)
    _predictions(["a", "a"], ["a", "a"], prefix="i").to_csv(tmp_path / "internal.tsv", sep="\t", index=False)
    worse = true[:20] + ["c"] * 20  # right on the first 20
    better = true[:35] + ["c"] * 5  # right on the same 20 and 15 more
    runs = {("vgg16", "none"): worse, ("alexnet", "none"): better, ("alexnet", "bn"): better}
    metrics, predictions, internal = [], [], []
    for (backbone, adapt), pred in runs.items():
        name = f"{backbone}_{adapt}"
        frame = pd.DataFrame({"image_id": validated["image_id"][:n], "transform": "identity", "true": true, "pred": pred})
        frame.to_csv(tmp_path / f"{name}.tsv", sep="\t", index=False)
        meta = {"task": "subtype", "strategy": "features_svm", "backbone": backbone, "layer": "fc6",
                "fold": "holdout", "ext": "lab2", "adapt": adapt}
        run_evaluate_external(tmp_path / f"{name}.tsv", tmp_path / "internal.tsv", tmp_path / "samples.tsv",
                              tmp_path / "validated.tsv", task, ext_cfg, meta, {"n_bootstrap": 200, "seed": 0},
                              tmp_path / f"{name}.json")
        (tmp_path / f"{backbone}_internal.json").write_text(json.dumps(
            {**meta, "metrics": {"accuracy": 0.9}}))
        metrics.append(tmp_path / f"{name}.json")
        predictions.append(tmp_path / f"{name}.tsv")
        internal.append(tmp_path / f"{backbone}_internal.json")

    pairs = run_compare_external(metrics, predictions, tmp_path / "samples.tsv", tmp_path / "validated.tsv", task,
                                 ext_cfg, {"n_bootstrap": 200, "seed": 0, "alpha": 0.05},
                                 tmp_path / "cmp.csv", tmp_path / "cmp.png")
    assert set(pairs["test_set"]) == {"lab2"} and set(pairs["n_images"]) == {n}
    row = pairs.set_index(["run_a", "run_b"]).loc[("features_svm:alexnet-fc6", "features_svm:vgg16-fc6")]
    assert (row["a_only"], row["b_only"]) == (15, 0)
    assert row["p_value"] == pytest.approx(2 * 0.5**15) and row["p_holm"] == pytest.approx(3 * 2 * 0.5**15)
    assert row["accuracy_diff"] == pytest.approx(15 / 40) and 0 < row["accuracy_ci_lo"] < 15 / 40 < row["accuracy_ci_hi"]
    assert "groups" in row["ci_method"]
    same = pairs.set_index(["run_a", "run_b"]).loc[("features_svm:alexnet-fc6", "features_svm:alexnet-fc6#bn")]
    assert same["p_value"] == 1.0 and same["accuracy_ci_lo"] == same["accuracy_ci_hi"] == 0.0
    assert (tmp_path / "cmp.png").stat().st_size > 5_000

    table = run_external_table(metrics, internal, task, [ext_cfg], tmp_path / "ext.csv", tmp_path / "ext.png",
                               comparisons={"lab2": tmp_path / "cmp.csv"})
    standing = dict(zip(zip(table["Model"], table["Adaptation"]), table["vs best"]))
    assert standing == {("AlexNet (fc6)", "none"): "best",
                        ("AlexNet (fc6)", "BatchNorm re-estimated (test-time)"): "not significantly worse",
                        ("VGG16 (fc6)", "none"): "worse"}
    assert pd.read_csv(tmp_path / "ext.csv")["vs best"].tolist() == table["vs best"].tolist()


def _jobs(dry_run_text):
    """{rule: [input paths of each job]} from a dry run's job listing."""
    jobs: dict[str, list[list[str]]] = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", dry_run_text):
        head = re.match(r"(?:local)?rule (\w+):", block.strip())
        if not head:
            continue
        inputs = re.search(r"^\s+input: (.*)$", block, flags=re.M)
        jobs.setdefault(head.group(1), []).append(inputs.group(1).split(", ") if inputs else [])
    return jobs


TRAINING_RULES = ("demo_data", "validate_images", "split", "augment", "extract_features", "train_svm", "finetune")


def test_no_training_job_reads_an_external_file_in_the_job_graph(tmp_path):
    """From the planned DAG: every job upstream of a trained model (and the models' jobs
    themselves) has inputs only among the training data's files, never the external set's."""
    source = tmp_path / "lab2_manifest.csv"  # a real external source path (the demo's is generated)
    cfg = {
        "results": "results",
        "evaluation": {"adapt_batchnorm": True, "external": [
            {"name": "lab2", "source": "demo", "tasks": ["subtype"], "train_per_class": 2},
            {"name": "lab3", "source": str(source), "tasks": ["subtype"]},
        ]},
    }
    source.write_text("path,subtype,element\n")
    overlay = tmp_path / "ext.yaml"
    overlay.write_text(yaml.safe_dump(cfg))
    result = snakemake(tmp_path, "-n", "--configfile", str(REPO / "configs" / "test.yaml"), str(overlay))
    jobs = _jobs(result.stdout)
    external_marks = ("results/external/", "results/demo_external/", str(source), "/external/")
    for rule in TRAINING_RULES:
        assert rule in jobs, rule
        for inputs in jobs[rule]:
            assert not [p for p in inputs if any(m in p for m in external_marks)], (rule, inputs)
    # the external jobs do read them (the check above looks at the right paths)
    assert any(str(source) in p for inputs in jobs["validate_external"] for p in inputs)
    assert all(any("results/external/" in p for p in inputs) for inputs in jobs["predict_external_svm"])
    # every run on every set, the BatchNorm-adapted one too (paper_cnn has no BatchNorm), and
    # on lab2 (train_per_class) each SVM run refitted few-shot
    assert len(jobs["evaluate_external"]) == 2 * (3 + 2 + 3) + 3
    shots = jobs["adapt_external_svm"]
    assert len(shots) == 3  # features_svm and finetune_svm of Lite0, finetune_svm of the paper CNN
    for inputs in shots:
        # the run's model and training features, and the set's unadapted features, never BN-adapted ones
        assert any(p.endswith("/svm.skops") for p in inputs) and any("results/data/samples/" in p for p in inputs)
        assert any(p.startswith("results/external/lab2/features/none/") or "/external/lab2/none/features" in p
                   for p in inputs)
        assert not [p for p in inputs if "/bn/" in p or "lab3" in p]
    assert len(jobs["extract_external_features"]) == 2 * 2
    # one paired comparison per set, of all 8 runs scored on it (adapted ones as runs of their
    # own), metrics and predictions paired; the external table reads both sets' comparisons
    assert len(jobs["compare_external"]) == 2
    for inputs in jobs["compare_external"]:
        metrics = [p for p in inputs if p.endswith("/metrics.json")]
        predictions = [p for p in inputs if p.endswith("/predictions.tsv") and "/external/" in p]
        assert len(metrics) == 8 and [p.rsplit("/", 1)[0] for p in predictions] == [p.rsplit("/", 1)[0] for p in metrics]
        assert len({p.split("/external/")[1].split("/")[0] for p in metrics}) == 1  # one set per job
        assert sum(p.endswith("/bn/metrics.json") for p in metrics) == 3
    (summary,) = jobs["summarise_external"]
    assert {p for p in summary if p.endswith("_comparisons.csv")} == {
        "results/tables/subtype_lab2_comparisons.csv", "results/tables/subtype_lab3_comparisons.csv"}
    # the feature maps draw both sets' (unadapted) features
    for inputs in jobs["feature_map"]:
        backbone = next(p for p in inputs if p.startswith("results/features/")).split("/")[2]
        assert {f"results/external/{s}/features/none/{backbone}" for s in ("lab2", "lab3")} <= set(inputs)


def test_no_training_job_reads_an_external_file_with_preprocessing_variants(tmp_path):
    """Variants (crop boxes per image, a stain reference fitted on training images, colour
    views) join the DAG: still no training job, nor the jobs that fit a variant's data, reads
    an external file; a variant's external features read the set's own crop boxes and the
    reference fitted on the training part."""
    cfg = {
        "results": "results",
        "evaluation": {"external": [{"name": "lab2", "source": "demo", "tasks": ["subtype"]}]},
        "preprocessing": [
            {"name": "none"},
            {"name": "cropstain", "steps": [{"step": "crop", "margin": 0.15}, {"step": "stain", "method": "reinhard"}]},
            {"name": "colour", "steps": [{"step": "colour", "views": 2}]},
        ],
    }
    overlay = tmp_path / "ext.yaml"
    overlay.write_text(yaml.safe_dump(cfg))
    result = snakemake(tmp_path, "-n", "--configfile", str(REPO / "configs" / "test.yaml"), str(overlay))
    jobs = _jobs(result.stdout)
    external_marks = ("results/external/", "results/demo_external/", "/external/")
    for rule in (*TRAINING_RULES, "analyse_images", "fit_preprocessing"):
        assert rule in jobs, rule
        for inputs in jobs[rule]:
            assert not [p for p in inputs if any(m in p for m in external_marks)], (rule, inputs)
    (fit_inputs,) = jobs["fit_preprocessing"]  # one variant fits a state, on the training data
    assert "results/preprocessing/crop_m0.15/images.tsv" in fit_inputs
    assert any(p.startswith("results/data/splits/") for p in fit_inputs)
    extract = {tuple(i) for i in jobs["extract_features"]}
    assert any("results/preprocessing/cropstain/state.json" in i for i in extract)
    external = [i for i in jobs["extract_external_features"] if "results/preprocessing/cropstain/state.json" in i]
    assert external and all("results/external/lab2/preprocessing/crop_m0.15/images.tsv" in i for i in external)
    # one feature folder per backbone and variant; one sample table more per task (colour views)
    assert len(jobs["extract_features"]) == 3  # efficientnet_lite0 x 3 variants
    assert len(jobs["augment"]) == 2 * len(TEST_CONFIG["tasks"])
    assert len(jobs["evaluate_external"]) == 3 * (3 + 2)  # every subtype run, per variant


def test_an_external_image_with_a_study_images_bytes_is_rejected_not_scored(tmp_path):
    from leukotype.demo import make_demo_external
    from leukotype.io import read_json, read_tsv
    from leukotype.stages_external import run_validate_external

    manifest = make_demo_external(tmp_path / "ext", 1, 48, 0)
    table = pd.read_csv(manifest)
    copied = tmp_path / "study" / "cell.png"
    copied.parent.mkdir()
    copied.write_bytes((manifest.parent / table["path"][3]).read_bytes())  # a training image sent as another lab's
    import hashlib
    study = pd.DataFrame({"image_id": ["img000000"], "path": ["L1/cell.png"], "abspath": [str(copied)],
                          "md5": [hashlib.md5(copied.read_bytes()).hexdigest()], "status": ["ok"]})
    study.to_csv(tmp_path / "study.tsv", sep="\t", index=False)
    checks = {"min_side": 32, "max_pixels": 10**7}
    run_validate_external(manifest, {"name": "lab2", "source": str(manifest)}, checks,
                          tmp_path / "validated.tsv", tmp_path / "validation.json", study=tmp_path / "study.tsv")
    validated = read_tsv(tmp_path / "validated.tsv").set_index("path")
    assert validated.loc[table["path"][3], "status"] == "rejected"
    assert validated.loc[table["path"][3], "reason"] == "in_study: identical bytes to the study's image L1/cell.png"
    assert (validated.drop(index=table["path"][3])["status"] == "ok").all() and len(validated) == len(table)
    assert read_json(tmp_path / "validation.json")["reasons"] == {"in_study": 1}


def test_kfold_fits_a_variant_on_its_reference_images_and_no_split_in_the_job_graph(tmp_path):
    """With k-fold every image is a test image once, so a fitted variant (white balance) takes
    its reference from images outside the study: its fit reads them, no split nor study table
    of boxes, and every fold's runs share its one feature folder."""
    from PIL import Image

    reference = tmp_path / "reference_slide"
    reference.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (200 + i, 190, 210)).save(reference / f"r{i}.png")
    cfg = {
        "results": "results",
        "split": {"method": "kfold", "n_splits": 2},
        "preprocessing": [{"name": "none"}, {"name": "wb", "reference_source": str(reference),
                                              "steps": [{"step": "crop", "margin": 0.15}, {"step": "white_balance"}]}],
        "models": [{"backbone": "efficientnet_lite0", "weights": "imagenet", "strategies": ["features_svm"]}],
    }
    overlay = tmp_path / "kfold.yaml"
    overlay.write_text(yaml.safe_dump(cfg))
    result = snakemake(tmp_path, "-n", "--configfile", str(REPO / "configs" / "test.yaml"), str(overlay))
    jobs = _jobs(result.stdout)
    (fit_inputs,) = jobs["fit_preprocessing"]
    assert sorted(fit_inputs) == sorted([str(reference), "results/data/validated.tsv"])
    extract = [i for i in jobs["extract_features"] if "results/preprocessing/wb/state.json" in i]
    assert len(extract) == 1 and len(jobs["extract_features"]) == 2  # one folder per variant, for every fold
    runs = [i for i in jobs["train_svm"] if any("efficientnet_lite0@wb" in p for p in i)]
    assert len(runs) == len(jobs["train_svm"]) // 2 == 2 * len(TEST_CONFIG["tasks"])  # 2 folds x 3 tasks


def test_kfold_fits_a_variant_without_reference_source_once_per_fold_on_its_training_part(tmp_path):
    """Without a reference_source, k-fold fits the variant per fold (``wb.<fold>``): each fit
    reads the splits, each fold's state gets its own feature folders, training and external,
    every run reads its own fold's, and the runs (and tables) keep the variant's name."""
    source = tmp_path / "lab2_manifest.csv"
    cfg = {
        "results": "results",
        "split": {"method": "kfold", "n_splits": 2},
        "preprocessing": [{"name": "none"}, {"name": "wb", "steps": [{"step": "crop", "margin": 0.15}, {"step": "white_balance"}]}],
        "models": [{"backbone": "efficientnet_lite0", "weights": "imagenet", "strategies": ["features_svm"]}],
        "evaluation": {"external": [{"name": "lab2", "source": str(source), "tasks": ["subtype"]}]},
    }
    source.write_text("path,subtype\n")
    assert validate_config({**copy.deepcopy(TEST_CONFIG), **cfg})  # no reference_source needed any more
    overlay = tmp_path / "kfold.yaml"
    overlay.write_text(yaml.safe_dump(cfg))
    result = snakemake(tmp_path, "-n", "--configfile", str(REPO / "configs" / "test.yaml"), str(overlay))
    jobs = _jobs(result.stdout)
    folds = ["r0f0", "r0f1"]
    fits = jobs["fit_preprocessing"]
    assert len(fits) == 2 and all(any(p.endswith("/data/splits/subtype.tsv") for p in inputs) for inputs in fits)
    states = {f"results/preprocessing/wb.{fold}/state.json" for fold in folds}
    extract = {p for inputs in jobs["extract_features"] for p in inputs if p.endswith("state.json")}
    assert extract == states and len(jobs["extract_features"]) == 3  # none, and wb once per fold
    external = {p for inputs in jobs["extract_external_features"] for p in inputs if p.endswith("state.json")}
    assert external == states
    wb_runs = 0
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", result.stdout):
        if not block.strip().startswith("rule train_svm:"):
            continue
        output = re.search(r"^\s+output: (.*)$", block, flags=re.M).group(1)
        inputs = re.search(r"^\s+input: (.*)$", block, flags=re.M).group(1).split(", ")
        if "efficientnet_lite0@wb/" in output:  # a wb run reads the features of its own fold's state
            fold = re.search(r"/(r0f[01])/", output).group(1)
            assert [p for p in inputs if p.startswith("results/features/")] == [f"results/features/efficientnet_lite0@wb.{fold}"]
            wb_runs += 1
    assert wb_runs == 2 * len(TEST_CONFIG["tasks"])
    assert not any("@wb." in p for inputs in jobs["summarise_task"] for p in inputs)  # runs keep @wb


def test_demo_external_set_differs_in_stain_and_scale(tmp_path):
    from PIL import Image

    from leukotype.demo import make_demo_dataset, make_demo_external

    internal = pd.read_csv(make_demo_dataset(tmp_path / "int", 1, 2, 64, 0))
    external = pd.read_csv(make_demo_external(tmp_path / "ext", 2, 64, 0))
    assert set(external["subtype"]) == set(internal["subtype"]) and len(external) == 5 * 2 * 2

    def mean_colour(root, table):
        rows = table[table["element"] == "cellula"]
        return np.mean([np.asarray(Image.open(root / p), dtype=float).reshape(-1, 3).mean(0) for p in rows["path"]], axis=0)

    shift = mean_colour(tmp_path / "ext", external) - mean_colour(tmp_path / "int", internal)
    assert np.abs(shift).max() > 15  # another stain: mean colour moves by > 15 grey levels


def test_batchnorm_adaptation_uses_the_new_images_statistics_and_no_labels(tmp_path):
    import torch
    from torch import nn

    from leukotype.adaptation import adapt_batchnorm
    from leukotype.demo import make_demo_external
    from leukotype.features import extract_features

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    batches = [torch.randn(5, 3, 6, 6) * 3 + 2 for _ in range(3)]
    seen = adapt_batchnorm(model, [(b, None) for b in batches])  # labels slot ignored
    conv_out = torch.cat([model[0](b) for b in batches]).detach()
    assert seen == 15 and not model.training
    assert torch.allclose(model[1].running_mean, conv_out.mean(dim=(0, 2, 3)), atol=1e-5)
    # through extraction: same images, different features, recorded in meta.json
    manifest = make_demo_external(tmp_path / "ext", 1, 48, 0)
    table = pd.read_csv(manifest).head(4)
    table = table.assign(abspath=[str(tmp_path / "ext" / p) for p in table["path"]], image_id=[f"i{i}" for i in range(4)], transform="identity")
    for name, adapt in (("plain", False), ("bn", True)):
        extract_features(table, "efficientnet_lite0", None, ["pool"], tmp_path / name, batch_size=4, progress=False, adapt_batchnorm=adapt)
    plain, adapted = np.load(tmp_path / "plain/pool.npy"), np.load(tmp_path / "bn/pool.npy")
    assert np.abs(plain - adapted).mean() > 1e-3
    assert json.loads((tmp_path / "bn/meta.json").read_text())["adapted_batchnorm"] is True


def test_shots_take_whole_groups_at_most_half_of_a_class_and_follow_the_seed():
    from leukotype.external import draw_shots

    labels = ["a"] * 20 + ["b"] * 6 + ["c"] * 3
    groups = [f"a{i // 2}" for i in range(20)] + [f"b{i}" for i in range(6)] + [f"c{i}" for i in range(3)]
    samples = pd.DataFrame({"image_id": [f"e{i}" for i in range(29)], "label": labels, "group": groups})
    shots = draw_shots(samples, 5, seed=3)
    counts = samples[shots].groupby("label").size().to_dict()
    assert counts == {"a": 4, "b": 3, "c": 1}  # a: pairs never split (4, not 5); b, c: half
    for group, rows in samples.groupby("group"):
        assert shots[rows.index].nunique() == 1, group  # a duplicate pair trains or is scored, whole
    assert shots.equals(draw_shots(samples, 5, seed=3))
    assert not shots.equals(draw_shots(samples, 5, seed=4))
    assert not draw_shots(samples, 0, seed=3).any()


def test_few_shot_refit_learns_the_other_labs_cells_and_keeps_its_own(tmp_path):
    """A lab shift that moves every external cell of a and b into the next class's region: the
    run as trained gets a third right; refitted with 5 labelled cells per class of the set it
    gets nearly all of the other cells right, the internal test part stays right, and the
    cells it trained on are neither scored nor the run's model file changed."""
    import hashlib

    from leukotype.classify import fit_svm, save_model
    from leukotype.feature_store import write_feature_matrix
    from leukotype.report_external import NOT_PAIRED
    from leukotype.stages_external import (
        run_adapt_external_svm,
        run_evaluate_external,
        run_external_table,
        run_predict_external_svm,
    )

    rng = np.random.default_rng(0)
    classes = ["a", "b", "c"]
    centre = {"a": 0.0, "b": 3.0, "c": 6.0}

    def cells(label, n, shift):
        x = rng.normal(0.0, 0.25, (n, 6))
        x[:, 0] += centre[label] + shift[0]
        x[:, 1] += shift[1]
        return x

    labels = [c for c in classes for _ in range(24)]
    X = np.vstack([cells(c, 24, (0.0, 0.0)) for c in classes])
    part = np.array((["train"] * 18 + ["test"] * 6) * 3)
    samples = pd.DataFrame({"image_id": [f"i{i}" for i in range(72)], "group": [f"i{i}" for i in range(72)],
                            "transform": "identity", "label": labels, "fold": "holdout", "part": part})
    samples.to_csv(tmp_path / "samples.tsv", sep="\t", index=False)
    write_feature_matrix(tmp_path / "features", "pool", samples[["image_id", "transform"]], X)
    train = part == "train"
    pipeline, _ = fit_svm(X[train], np.array(labels)[train], samples["group"][train], {"C": [100.0], "kernel": ["linear"]},
                          cv_folds=2, seed=0)
    save_model(pipeline, tmp_path / "svm.skops")
    digest = hashlib.sha256((tmp_path / "svm.skops").read_bytes()).hexdigest()
    ext_labels = [c for c in classes for _ in range(20)]
    X_ext = np.vstack([cells(c, 20, (2.0, 0.0)) for c in classes])  # a lands in b's region, b in c's
    validated = pd.DataFrame({"image_id": [f"e{i}" for i in range(60)], "abspath": "/x.png", "subtype": ext_labels,
                              "group": [f"e{i}" for i in range(60)], "status": "ok"})
    validated.to_csv(tmp_path / "validated.tsv", sep="\t", index=False)
    write_feature_matrix(tmp_path / "ext", "pool", validated[["image_id"]].assign(transform="identity"), X_ext)
    task = {"name": "subtype", "column": "subtype", "classes": classes}
    ext_cfg = {"name": "lab2", "source": "x", "train_per_class": 5}

    as_trained = run_predict_external_svm(tmp_path / "svm.skops", tmp_path / "validated.tsv", task, ext_cfg,
                                          [tmp_path / "ext"], "pool", tmp_path / "none.tsv")
    assert (as_trained["true"] == as_trained["pred"]).mean() == pytest.approx(1 / 3, abs=0.05)
    out = {k: tmp_path / f"shots_{k}.tsv" for k in ("pred", "internal", "shots")}
    adapted = run_adapt_external_svm(tmp_path / "svm.skops", tmp_path / "samples.tsv", "holdout", [tmp_path / "features"],
                                     tmp_path / "validated.tsv", task, ext_cfg, [tmp_path / "ext"], ["pool"], 0,
                                     out["pred"], out["internal"], out["shots"], tmp_path / "shots_svm.skops")
    shots = pd.read_csv(out["shots"], sep="\t")
    assert shots.groupby("label").size().to_dict() == {"a": 5, "b": 5, "c": 5}
    assert len(adapted) == 45 and not set(adapted["image_id"]) & set(shots["image_id"])
    assert (adapted["true"] == adapted["pred"]).mean() >= 0.9
    internal = pd.read_csv(out["internal"], sep="\t")
    assert len(internal) == 18 and (internal["true"] == internal["pred"]).mean() >= 0.95
    assert hashlib.sha256((tmp_path / "svm.skops").read_bytes()).hexdigest() == digest
    from leukotype.classify import load_model

    rest = validated["image_id"].isin(adapted["image_id"]).to_numpy()  # the refitted model, saved
    refitted = load_model(tmp_path / "shots_svm.skops")
    assert refitted.predict(X_ext[rest]).tolist() == adapted["pred"].tolist()
    # the internal predictions are the refitted model's scores, not the run's
    from leukotype.classify import decision_scores

    score_columns = [f"score_{c}" for c in classes]
    np.testing.assert_allclose(internal[score_columns].to_numpy(), decision_scores(refitted, X[part == "test"], classes),
                               rtol=0, atol=1e-5)
    assert np.abs(internal[score_columns].to_numpy() - decision_scores(pipeline, X[part == "test"], classes)).max() > 0.1
    # a job whose mem_mb cannot hold the features stops before loading them, with the reason
    with pytest.raises(LeukotypeError, match="adapt_external_svm"):
        run_adapt_external_svm(tmp_path / "svm.skops", tmp_path / "samples.tsv", "holdout", [tmp_path / "features"],
                               tmp_path / "validated.tsv", task, ext_cfg, [tmp_path / "ext"], ["pool"], 0,
                               tmp_path / "p.tsv", tmp_path / "i.tsv", tmp_path / "s.tsv", memory_mb=1)

    from leukotype.classify import predict_table
    from leukotype.io import write_tsv

    test = samples[samples["part"] == "test"]
    write_tsv(predict_table(pipeline, X[part == "test"], test, classes), tmp_path / "internal.tsv")
    meta = {"task": "subtype", "strategy": "features_svm", "backbone": "vgg16", "layer": "fc6", "fold": "holdout",
            "ext": "lab2"}
    records = []
    for adapt, pred, internal_pred, shot_list in (("none", tmp_path / "none.tsv", tmp_path / "internal.tsv", None),
                                                  ("shots", out["pred"], out["internal"], out["shots"])):
        record = run_evaluate_external(pred, internal_pred, tmp_path / "samples.tsv", tmp_path / "validated.tsv",
                                       task, ext_cfg, {**meta, "adapt": adapt}, {"n_bootstrap": 100, "seed": 0},
                                       tmp_path / f"{adapt}.json", shots=shot_list)
        records.append(tmp_path / f"{adapt}.json")
    assert record["n_external"] == 45 and record["shots_per_class"] == {"a": 5, "b": 5, "c": 5}
    assert record["train_per_class"] == 5 and record["external_metrics"]["accuracy"] >= 0.9
    assert record["internal_accuracy_all"] >= 0.95  # the refitted model's, on the run's test part
    (tmp_path / "internal.json").write_text(json.dumps({**meta, "metrics": {"accuracy": 1.0}}))
    # with the set's comparison table (of the unadapted row only): the few-shot row is not paired
    pd.DataFrame(columns=["run_a", "run_b", "rank_a", "significant"]).to_csv(tmp_path / "cmp.csv", index=False)
    table = run_external_table(records, [tmp_path / "internal.json"], task, [ext_cfg], tmp_path / "t.csv",
                               tmp_path / "t.png", comparisons={"lab2": tmp_path / "cmp.csv"})
    rows = table.set_index("Adaptation")
    few_shot = rows.loc["few-shot: SVM refitted with the set's labelled cells (a 5, b 5, c 5); scored on its other cells"]
    assert few_shot["External n"] == "45" and rows.loc["none", "External n"] == "60"
    assert float(few_shot["External accuracy"]) >= 90.0 > 40.0 > float(rows.loc["none", "External accuracy"])
    assert few_shot["vs best"] == NOT_PAIRED and rows.loc["none", "vs best"] == "best"


def test_shot_weight_and_feature_augmentation_on_a_shift_that_conflicts_with_the_training_lab(tmp_path):
    """The lab's a cells look like the training lab's b, its b like c. 54 training rows against
    15 of the lab's cells, a soft-margin linear SVM (C 1): pooled with weight 1 the refit still
    follows the training lab and gets about half of the lab's other cells right; with
    ``shot_weight: balanced`` each lab cell weighs 54 / 15 = 3.6 rows (listed in shots.tsv and
    the metrics) and the refit gets at least 20 points more of them right, paid for on the
    training lab's cells. ``shot_method: augment`` gives each lab a view of its own: as many
    more of the lab's cells right, and every one of the training lab's test cells."""
    from leukotype.classify import make_svm_pipeline, save_model
    from leukotype.feature_store import write_feature_matrix
    from leukotype.stages_external import run_adapt_external_svm, run_evaluate_external

    rng = np.random.default_rng(0)
    classes = ["a", "b", "c"]

    def cells(label, n, shift):
        x = rng.normal(0.0, 0.25, (n, 6))
        x[:, 0] += 3.0 * classes.index(label) + shift
        return x

    X = np.vstack([cells(c, 24, 0.0) for c in classes])
    part = np.array((["train"] * 18 + ["test"] * 6) * 3)
    samples = pd.DataFrame({"image_id": [f"i{i}" for i in range(72)], "group": [f"i{i}" for i in range(72)],
                            "transform": "identity", "label": [c for c in classes for _ in range(24)],
                            "fold": "holdout", "part": part})
    samples.to_csv(tmp_path / "samples.tsv", sep="\t", index=False)
    write_feature_matrix(tmp_path / "features", "pool", samples[["image_id", "transform"]], X)
    train = part == "train"
    save_model(make_svm_pipeline(kernel="linear", C=1.0).fit(X[train], samples["label"][train]), tmp_path / "svm.skops")
    validated = pd.DataFrame({"image_id": [f"e{i}" for i in range(60)], "abspath": "/x.png",
                              "subtype": [c for c in classes for _ in range(20)],
                              "group": [f"e{i}" for i in range(60)], "status": "ok"})
    validated.to_csv(tmp_path / "validated.tsv", sep="\t", index=False)
    X_ext = np.vstack([cells(c, 20, 2.0) for c in classes])  # a lands in b's region, b in c's
    write_feature_matrix(tmp_path / "ext", "pool", validated[["image_id"]].assign(transform="identity"), X_ext)
    task = {"name": "subtype", "column": "subtype", "classes": classes}
    accuracy, internal = {}, {}
    for weight, method in ((1.0, "pooled"), ("balanced", "pooled"), (1.0, "augment")):
        ext_cfg = {"name": "lab2", "source": "x", "train_per_class": 5, "shot_weight": weight, "shot_method": method}
        out = {k: tmp_path / f"{weight}_{method}_{k}" for k in ("pred.tsv", "internal.tsv", "shots.tsv", "svm.skops")}
        adapted = run_adapt_external_svm(tmp_path / "svm.skops", tmp_path / "samples.tsv", "holdout",
                                         [tmp_path / "features"], tmp_path / "validated.tsv", task, ext_cfg,
                                         [tmp_path / "ext"], ["pool"], 0, *out.values())
        own = pd.read_csv(out["internal.tsv"], sep="\t")
        accuracy[weight, method] = (adapted["true"] == adapted["pred"]).mean()
        internal[weight, method] = (own["true"] == own["pred"]).mean()
        record = run_evaluate_external(out["pred.tsv"], out["internal.tsv"], tmp_path / "samples.tsv",
                                       tmp_path / "validated.tsv", task, ext_cfg,
                                       {"task": "subtype", "strategy": "features_svm", "backbone": "vgg16",
                                        "layer": "fc6", "fold": "holdout", "ext": "lab2", "adapt": "shots"},
                                       {"n_bootstrap": 20, "seed": 0}, tmp_path / f"{weight}.json",
                                       shots=out["shots.tsv"])
        expected = 1.0 if weight == 1.0 else 54 / 15
        assert record["shot_weight"] == weight and record["weight_per_shot"] == pytest.approx(expected)
        assert record["shot_method"] == method
        assert pd.read_csv(out["shots.tsv"], sep="\t")["weight"].tolist() == pytest.approx([expected] * 15)
    print("lab's cells:", accuracy, "training lab's:", internal)
    assert accuracy[1.0, "pooled"] <= 0.6 and accuracy["balanced", "pooled"] >= accuracy[1.0, "pooled"] + 0.2
    assert internal["balanced", "pooled"] < internal[1.0, "pooled"]
    assert accuracy[1.0, "augment"] >= accuracy[1.0, "pooled"] + 0.2
    assert internal[1.0, "augment"] == 1.0 > internal[1.0, "pooled"]
    # the tables say which rows were feature-augmented (record: the last one written, augment's)
    from leukotype.report_external import adaptation_name, summarise_external

    internal_record = {"task": "subtype", "strategy": "features_svm", "backbone": "vgg16", "layer": "fc6",
                       "fold": "holdout", "metrics": {"accuracy": 1.0}}
    (row,) = summarise_external([record], [internal_record], "subtype").to_dict("records")
    assert "(feature-augmented: " in adaptation_name(row["adapt"], row["shots_per_class"], row["shot_method"])
    assert "augmented" not in adaptation_name("shots", row["shots_per_class"], "pooled")


def test_external_features_of_a_fitted_variant_with_colour_views(tmp_path):
    """A variant with a fitted step and colour views (configs/pbc.yaml's crop15_wb_grey_stretch_stain2)
    on an external set: every step with its fitted state, no colour view drawn (external
    images are test images), so the features are those of the variant without its colour step."""
    from leukotype.demo import make_demo_external
    from leukotype.preprocessing import ANALYSIS_TABLE, STATE_FILE, Variant, analysis_table, fit_variant, read_analysis_table
    from leukotype.images import load_rgb
    from leukotype.io import read_tsv, write_json, write_tsv
    from leukotype.stages_external import run_extract_external, run_validate_external

    manifest = make_demo_external(tmp_path / "ext", 1, 48, 0)
    run_validate_external(manifest, {"name": "lab2", "source": str(manifest)}, {"min_side": 32, "max_pixels": 10**7},
                          tmp_path / "validated.tsv", tmp_path / "validation.json")
    validated = read_tsv(tmp_path / "validated.tsv")
    steps = [{"step": "white_balance"}, {"step": "colour", "views": 2, "hed": 0.05, "brightness": 0.15}]
    variants = {"with_views": Variant.from_dict({"name": "wbviews", "steps": steps, "reference_images": 10}),
                "without": Variant.from_dict({"name": "wb", "steps": steps[:1], "reference_images": 10})}
    step = variants["without"].steps[0]
    table_path = tmp_path / step.analysis_key() / ANALYSIS_TABLE
    table_path.parent.mkdir()
    write_tsv(analysis_table(step, validated), table_path)
    images = [(p, load_rgb(p)) for p in validated["abspath"]]
    features_cfg = {"batch_size": 8, "num_workers": 0, "device": "cpu", "precision": "fp32", "optimize": True}
    features = {}
    for name, variant in variants.items():
        states = fit_variant(variant, images, {step.analysis_key(): read_analysis_table(table_path)})
        assert len(states) == len(variant.steps)
        write_json({"variant": variant.to_dict(), "states": states}, tmp_path / name / STATE_FILE)
        run_extract_external(tmp_path / "validated.tsv", "efficientnet_lite0", ["pool"], "imagenet", None, None, features_cfg,
                             tmp_path / f"features_{name}", preprocessing=variant.to_dict(),
                             preprocessing_files=[table_path, tmp_path / name / STATE_FILE])
        index = read_tsv(tmp_path / f"features_{name}" / "index.tsv")
        assert set(index["transform"]) == {"identity"} and len(index) == int((validated["status"] == "ok").sum())
        features[name] = np.load(tmp_path / f"features_{name}" / "pool.npy")
    np.testing.assert_allclose(features["with_views"], features["without"], rtol=0, atol=1e-6)
