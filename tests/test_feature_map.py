"""t-SNE feature maps: seeded, class structure kept, one panel per task, datasets marked."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from leukotype.errors import LeukotypeError
from leukotype.feature_map import feature_map_inputs, plot_feature_map, subsample, tsne_embedding


def _clusters(n_per=15, dim=40, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 1.0, size=(n_per, dim))
    b = rng.normal(6.0, 1.0, size=(n_per, dim))
    return np.vstack([a, b]), np.array(["L1"] * n_per + ["L2"] * n_per)


def test_tsne_is_seeded_and_keeps_separated_classes_apart():
    x, labels = _clusters()
    first = tsne_embedding(x, seed=3, perplexity=30)
    assert first.shape == (30, 2)
    np.testing.assert_array_equal(first, tsne_embedding(x, seed=3, perplexity=30))
    # every point's nearest neighbour in the map has its class
    d = np.linalg.norm(first[:, None] - first[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert (labels[d.argmin(axis=1)] == labels).all()
    with pytest.raises(LeukotypeError, match="at least 5"):
        tsne_embedding(x[:4])


def test_subsample_keeps_class_fractions():
    labels = ["a"] * 80 + ["b"] * 20
    keep = subsample(labels, 50, seed=0)
    kept = np.asarray(labels)[keep]
    assert len(keep) == 50 and (kept == "a").sum() == 40 and (kept == "b").sum() == 10
    assert subsample(labels, 500, seed=0).tolist() == list(range(100))


def test_map_inputs_union_of_test_images_and_panels(tmp_path):
    samples = {
        "subtype": pd.DataFrame({"image_id": ["1", "2", "3", "3"], "transform": ["identity"] * 3 + ["rot90"],
                                 "part": ["test", "test", "train", "train"], "label": ["L1", "L2", "L1", "L1"]}),
        "lineage": pd.DataFrame({"image_id": ["2", "3"], "transform": ["identity"] * 2,
                                 "part": ["test", "test"], "label": ["ALL", "AML"]}),
    }
    ids, per_task = feature_map_inputs(samples)
    assert ids == ["1", "2", "3"]
    assert per_task == {"subtype": {"1": "L1", "2": "L2"}, "lineage": {"2": "ALL", "3": "AML"}}
    embedding = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.5]])
    panels = [(f"task {t}", [m.get(i, "") for i in ids], sorted(set(m.values()))) for t, m in per_task.items()]
    fig = plot_feature_map(embedding, panels, tmp_path / "map.png", "t-SNE",
                           datasets=["internal", "internal", "jtsc"])
    assert len(fig.axes) == 2
    offsets = [len(c.get_offsets()) for c in fig.axes[0].collections]
    assert sum(offsets) == 2  # image 3 is not a subtype test image
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert legend == ["ALL", "AML", "data: internal", "data: jtsc"]
    markers = {c.get_paths()[0].vertices.shape for c in fig.axes[1].collections}
    assert len(markers) == 2  # the external image has its own marker
    assert (tmp_path / "map.png").stat().st_size > 5_000
