"""End-to-end: timm backbones (a ViT and a CNN, random weights) and their combination through
extraction, SVM, fine-tuning (last_block and head) and the tables, on a tiny synthetic study."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from workflow_helpers import bundle_round_trip, planned_jobs, snakemake

pytestmark = pytest.mark.e2e

CONFIG = {
    "results": "results",
    "dataset": {"source": "demo", "name": "timm test set",
                "demo": {"n_patients_per_subtype": 2, "cells_per_patient": 2, "image_size": 48, "seed": 3}},
    "validation": {"min_side": 32, "min_images_per_class": 2},
    "tasks": [{"name": "cellular", "column": "element", "classes": ["nucleus", "cellula"]}],
    "split": {"method": "holdout", "test_size": 0.3, "seed": 1},
    "augmentation": {"rotations": []},
    "models": [
        {"backbone": "timm:test_vit", "weights": "none", "layers": ["cls", "pool"],
         "strategies": ["features_svm", "finetune"], "finetune": {"policy": "last_block"}},
        {"backbone": "timm:test_resnet", "weights": "none",
         "strategies": ["features_svm", "finetune", "finetune_svm"], "finetune": {"policy": "head"}},
        {"backbone": "timm:test_vit+timm:test_resnet"},
    ],
    "features": {"batch_size": 8, "num_workers": 0},
    "svm": {"C": [1], "kernel": ["linear"], "cv_folds": 2},
    "finetune": {"epochs": 1, "batch_size": 8},
    "evaluation": {"n_bootstrap": 20},
    "compute": {"threads": 1},
}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("timm_study")
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    snakemake(workdir, configfile=config)
    return workdir


def test_timm_features_have_the_models_dims_and_preprocessing(study):
    results = study / "results"
    vit = json.loads((results / "features/timm:test_vit/meta.json").read_text())
    assert vit["dims"] == {"cls": 64, "pool": 64}
    assert vit["preprocess"] == {"resize_size": 168, "input_size": 160, "interpolation": "bicubic",
                                 "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    n = vit["n_rows"]
    cls = np.load(results / "features/timm:test_vit/cls.npy")
    pool = np.load(results / "features/timm:test_vit/pool.npy")
    assert cls.shape == pool.shape == (n, 64) and not np.allclose(cls, pool)
    assert np.load(results / "features/timm:test_resnet/pool.npy").shape == (n, 96)


def test_tables_show_every_timm_run(study):
    table = pd.read_csv(study / "results/tables/cellular.csv")
    rows = set(zip(table["Technique"], table["Model"]))
    assert rows == {
        ("Feature extraction", "test_vit (timm) (cls)"),  # two layers: each is named
        ("Feature extraction", "test_vit (timm) (pool)"),
        ("Feature extraction", "test_resnet (timm)"),
        ("Feature extraction", "test_vit (timm) + test_resnet (timm)"),
        ("Fine tuning", "test_vit (timm)"),
        ("Fine tuning", "test_resnet (timm)"),
        ("Fine tuning + SVM", "test_resnet (timm)"),
    }
    assert len(table) == 7
    assert table["Accuracy"].between(0, 100).all()


def test_combination_reads_both_parts_penultimate_features(study):
    from leukotype.classify import load_model

    run = study / "results/runs/cellular/features_svm/timm:test_vit+timm:test_resnet/penultimate/holdout"
    assert load_model(run / "svm.skops").n_features_in_ == 64 + 96
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["backbone"] == "timm:test_vit+timm:test_resnet" and metrics["n_test"] > 0


def test_finetuning_policies_ran_and_nothing_reruns(study):
    for backbone in ("timm:test_vit", "timm:test_resnet"):
        history = pd.read_csv(study / f"results/runs/cellular/finetune/{backbone}/softmax/holdout/history.tsv", sep="\t")
        assert history["epoch"].tolist() == [1] and np.isfinite(history["train_loss"]).all()
        predictions = pd.read_csv(study / f"results/runs/cellular/finetune/{backbone}/softmax/holdout/predictions.tsv", sep="\t")
        probs = predictions[["prob_nucleus", "prob_cellula"]].to_numpy()
        np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert planned_jobs(snakemake(study, "-n", configfile=study / "config.yaml")) == {}


def test_combined_backbone_bundle_reproduces_its_runs_predictions(study, tmp_path, capsys):
    """Export the A+B run, load it fresh: same labels, scores and probabilities as its
    predictions.tsv (within 1e-6), features of both parts from random weights checked by their
    fingerprints. explain states why a combined bundle has no single map."""
    from leukotype.cli import main
    from leukotype.config import Run
    from leukotype.export import export_run

    combo = "timm:test_vit+timm:test_resnet"
    bundle = export_run(study / "results", Run("cellular", "features_svm", combo, "penultimate", "holdout"), tmp_path / "combo")
    spec = json.loads((bundle / "bundle.json").read_text())
    assert [p["name"] for p in spec["backbone"]["parts"]] == ["timm:test_vit", "timm:test_resnet"]
    assert spec["features"]["dim"] == 64 + 96 and set(spec["preprocessing"]) == {"timm:test_vit", "timm:test_resnet"}
    bundle_round_trip(bundle, study)

    image = next((study / "results/data").rglob("validated.tsv"))
    first = pd.read_csv(image, sep="\t")["abspath"].iloc[0]
    out = tmp_path / "maps"
    assert main(["explain", "--model", str(bundle), first, "--out", str(out)]) == 2
    assert not out.exists()  # refused before anything was written
    message = capsys.readouterr().err
    assert "timm:test_vit: 160 px" in message and "share no feature map" in message
    assert "runs/cellular/features_svm/timm:test_resnet/" in message  # what to explain instead (not the ViT)


def test_vit_bundle_has_no_saliency_map_and_its_gallery_says_why(study, tmp_path, capsys, caplog):
    """A ViT has no spatial feature map after its patch embedding: explain refuses its bundle
    saying so, and the gallery of a ViT run shows its chosen cells without maps, the reason in
    every row of the table and in the log."""
    from leukotype.cli import main
    from leukotype.config import Run
    from leukotype.export import export_run
    from leukotype.gallery import run_gallery, select_cells

    run = Run("cellular", "features_svm", "timm:test_vit", "cls", "holdout")
    bundle = export_run(study / "results", run, tmp_path / "vit")
    validated = next((study / "results/data").rglob("validated.tsv"))
    first = pd.read_csv(validated, sep="\t")["abspath"].iloc[0]
    assert main(["explain", "--model", str(bundle), first, "--out", str(tmp_path / "maps")]) == 2
    reason = "timm:test_vit is a vision transformer: its layers are tokens, with no spatial feature map"
    assert reason in capsys.readouterr().err and not (tmp_path / "maps").exists()
    predictions = study / "results/runs/cellular/features_svm/timm:test_vit/cls/holdout/predictions.tsv"
    with caplog.at_level(logging.WARNING, logger="leukotype.gallery"):
        run_gallery(bundle, [predictions], validated, 2, 2, tmp_path / "gallery.png", tmp_path / "gallery.tsv")
    shown = pd.read_csv(tmp_path / "gallery.tsv", sep="\t")
    expected = select_cells(pd.read_csv(predictions, sep="\t"), ["nucleus", "cellula"], 2, 2)
    columns = ["kind", "image_id", "pred"]
    assert len(shown) > 0 and shown[columns].to_dict("list") == expected[columns].to_dict("list")
    assert shown["map"].str.startswith(f"none: {reason}").all()
    assert reason in caplog.text
