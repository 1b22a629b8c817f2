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


def test_map_embeds_external_sets_jointly_marked_by_dataset(tmp_path):
    """Internal test images and an external set's scored images on one map: every point once
    per dataset (ids repeat across datasets), coloured by mapped class where the set is scored,
    the set's own marker and legend entry only in those panels."""
    from leukotype.feature_store import write_feature_matrix
    from leukotype.stages import run_feature_map

    rng = np.random.default_rng(0)
    centre = {"L1": 0.0, "L2": 6.0}
    # internal: 8 test images (4 per class) + training rows the map must ignore
    ids = [f"img{i:06d}" for i in range(12)]
    labels = ["L1", "L2"] * 6
    part = ["test"] * 8 + ["train"] * 4
    samples = pd.DataFrame({"image_id": ids, "transform": "identity", "label": labels, "part": part,
                            "group": ids, "fold": "holdout"})
    samples.to_csv(tmp_path / "subtype.tsv", sep="\t", index=False)
    lineage = samples.assign(label=["ALL"] * 12)
    lineage.to_csv(tmp_path / "lineage.tsv", sep="\t", index=False)
    feats = np.stack([rng.normal(centre[c], 1.0, 20) for c in labels])
    write_feature_matrix(tmp_path / "internal", "pool", samples[["image_id", "transform"]], feats)
    # external: 12 images with the SAME ids; 10 scored (5 L1, 5 L2), one unmapped label, one rejected
    ext_labels = ["L1", "L2"] * 5 + ["blast", "L1"]
    validated = pd.DataFrame({"image_id": [f"img{i:06d}" for i in range(12)],
                              "abspath": [f"/x/{i}.png" for i in range(12)],
                              "subtype": ext_labels, "group": [f"p{i // 2}" for i in range(12)],
                              "status": ["ok"] * 11 + ["rejected"]})
    validated.to_csv(tmp_path / "validated.tsv", sep="\t", index=False)
    ext_feats = np.stack([rng.normal(centre.get(c, 3.0) + 0.5, 1.0, 20) for c in ext_labels])
    write_feature_matrix(tmp_path / "external", "pool", validated[["image_id"]].assign(transform="identity"), ext_feats)

    tasks = {"subtype": {"name": "subtype", "column": "subtype", "classes": ["L1", "L2"]},
             "lineage": {"name": "lineage", "column": "subtype", "classes": ["ALL", "AML"],
                         "derive": {"ALL": ["L1"], "AML": ["L2"]}}}
    external = {"config": {"name": "lab2", "source": "x", "display": "second lab", "tasks": ["subtype"]},
                "validated": tmp_path / "validated.tsv", "features": tmp_path / "external"}
    points = run_feature_map(tmp_path / "internal", "pool",
                             {"subtype": tmp_path / "subtype.tsv", "lineage": tmp_path / "lineage.tsv"},
                             tmp_path / "map.png", {"perplexity": 5}, seed=0,
                             classes={t: v["classes"] for t, v in tasks.items()},
                             externals=[external], tasks_cfg=tasks)
    assert points["dataset"].value_counts().to_dict() == {"internal": 8, "lab2": 10}
    assert not points.duplicated(["dataset", "image_id"]).any()
    counts = points.groupby(["dataset", "label_subtype"]).size().to_dict()
    assert counts == {("internal", "L1"): 4, ("internal", "L2"): 4, ("lab2", "L1"): 5, ("lab2", "L2"): 5}
    # lab2 is not scored on lineage: its points are embedded but not in that panel
    assert points.groupby("dataset")["label_lineage"].apply(lambda v: (v != "").sum()).to_dict() == {
        "internal": 8, "lab2": 0}
    assert np.isfinite(points[["x", "y"]].to_numpy()).all()
    # fitted jointly: an external image's nearest internal neighbour has its class
    xy = points[["x", "y"]].to_numpy()
    internal, ext = (points["dataset"] == "internal").to_numpy(), (points["dataset"] == "lab2").to_numpy()
    d = np.linalg.norm(xy[ext][:, None] - xy[internal][None], axis=-1)
    nearest = points.loc[internal, "label_subtype"].to_numpy()[d.argmin(axis=1)]
    assert (nearest == points.loc[ext, "label_subtype"].to_numpy()).mean() >= 0.9

    # the figure: the subtype panel lists both datasets; the lineage panel (no lab2 point) neither
    panels = [(f"task {t}", points[f"label_{t}"].tolist(), tasks[t]["classes"]) for t in ("subtype", "lineage")]
    fig = plot_feature_map(xy, panels, tmp_path / "again.png", "t-SNE",
                           datasets=["internal" if d == "internal" else "second lab" for d in points["dataset"]])
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]
    assert legends == [["L1", "L2", "data: internal", "data: second lab"], ["ALL", "AML"]]
    shapes = {c.get_paths()[0].vertices.shape for c in fig.axes[0].collections}
    assert len(shapes) == 2  # one marker per dataset
