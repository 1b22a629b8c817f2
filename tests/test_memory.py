"""Out-of-memory as a message: computed needs against the job's mem_mb (leukotype.memory)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from leukotype import memory
from leukotype.errors import LeukotypeError
from leukotype.feature_store import write_feature_matrix
from leukotype.io import write_tsv

MIB = memory.MIB


def test_require_memory_names_need_parts_and_keys():
    parts = {"features": 3000 * MIB, "process": 500 * MIB}
    assert memory.require_memory("train_svm", parts, 4000) == pytest.approx(3500)
    assert memory.require_memory("train_svm", parts, None) == pytest.approx(3500)  # no limit known
    with pytest.raises(LeukotypeError) as error:
        memory.require_memory("train_svm", parts, 2000)
    message = str(error.value)
    assert "train_svm needs about 3,500 MB" in message and "mem_mb=2,000" in message
    assert "features 3,000 MB" in message
    assert "compute.mem_mb_svm" in message and "set-resources: train_svm: mem_mb: 5000" in message


def test_svm_parts_count_features_scaled_copy_and_budgeted_kernels(monkeypatch):
    monkeypatch.setattr(memory, "process_rss_bytes", lambda: 0)
    parts = memory.svm_memory_parts(n_train=1000, n_test=500, dim=2048, kernel_budget_mb=4)
    assert parts["features 1500x2048 float32"] == 1500 * 2048 * 4
    assert parts["standardised training copy"] == 1000 * 2048 * 4
    assert parts["kernel matrices"] == 4 * MIB  # capped: above the budget the solver changes


@pytest.fixture
def svm_inputs(tmp_path):
    n_train, n_test, dim = 3000, 1000, 2048
    ids = [f"img{i:06d}" for i in range(n_train + n_test)]
    samples = pd.DataFrame(
        {
            "image_id": ids,
            "transform": "identity",
            "label": ["a", "b"] * ((n_train + n_test) // 2),
            "group": ids,
            "fold": "holdout",
            "part": ["train"] * n_train + ["test"] * n_test,
        }
    )
    write_tsv(samples, tmp_path / "samples.tsv")
    features = tmp_path / "features"
    write_feature_matrix(features, "pool", samples[["image_id", "transform"]], np.zeros((len(ids), dim), np.float32))
    return tmp_path, features


def test_train_svm_stops_before_loading_features_when_mem_mb_is_too_small(svm_inputs, monkeypatch):
    from leukotype import classify, feature_store
    from leukotype.stages import run_svm

    root, features = svm_inputs
    monkeypatch.setattr(memory, "process_rss_bytes", lambda: 0)

    def expensive(*args, **kwargs):
        raise AssertionError("the expensive part started")

    monkeypatch.setattr(feature_store, "load_features", expensive)
    monkeypatch.setattr(classify, "fit_svm", expensive)
    task = {"name": "t", "column": "label", "classes": ["a", "b"]}
    svm_cfg = {"C": [1], "kernel": ["linear"], "gamma": ["scale"], "cv_folds": 2, "class_weight": None}
    out = [root / "m.skops", root / "p.tsv", root / "cv.tsv"]
    with pytest.raises(LeukotypeError, match=r"train_svm needs about 8\d MB .* mem_mb=64; .*compute.mem_mb_svm"):
        # features 31 MB + copy 23 MB + kernels capped at 32 MB > 64 MB
        run_svm(root / "samples.tsv", task, "holdout", [features], "pool", svm_cfg, *out, memory_mb=64)
    with pytest.raises(AssertionError, match="expensive part"):  # enough memory: goes on
        run_svm(root / "samples.tsv", task, "holdout", [features], "pool", svm_cfg, *out, memory_mb=400)


def test_extraction_stops_before_loading_weights_when_a_batch_cannot_fit(tmp_path, monkeypatch):
    from leukotype import weights
    from leukotype.stages import run_extract

    def expensive(*args, **kwargs):
        raise AssertionError("the expensive part started")

    monkeypatch.setattr(weights, "resolve_weights", expensive)
    parts = memory.extraction_memory_parts("efficientnet_lite0", batch_size=1024)
    # the largest EfficientNet-Lite0 activation: 96 x 112 x 112 per image (block 1 expansion,
    # + its padding), as input and output of a layer
    assert parts["activations of a batch of 1024"] == pytest.approx(2 * 96 * 112 * 112 * 4 * 1024, rel=0.05)
    features_cfg = {"batch_size": 1024, "num_workers": 0, "precision": "fp32", "device": "cpu", "optimize": True}
    with pytest.raises(LeukotypeError) as error:
        run_extract(tmp_path / "v.tsv", "efficientnet_lite0", ["pool"], "imagenet", None, None, {}, features_cfg, tmp_path / "out", memory_mb=2000)
    message = str(error.value)
    assert "extract_features needs about" in message and "activations of a batch of 1024" in message
    assert "compute.mem_mb_extract" in message and "features.batch_size" in message
    assert not (tmp_path / "out").exists()
