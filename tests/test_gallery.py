"""The report's saliency gallery: which test cells it shows, and the table without maps."""

import logging
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

import leukotype.gallery as gallery
from leukotype.gallery import GALLERY_COLUMNS, run_gallery, select_cells

CLASSES = ["A", "B", "C"]
#: (image_id, true, pred, top probability): three classes right, three kinds of error.
CELLS = [
    ("a1", "A", "A", 0.90), ("a2", "A", "A", 0.80), ("a3", "A", "A", 0.70),
    ("b1", "B", "B", 0.95), ("b2", "B", "B", 0.60),
    ("c1", "C", "C", 0.85), ("c2", "C", "C", 0.85),  # c1 and c2 tie: image_id decides
    ("w1", "A", "B", 0.99),
    ("w2", "B", "C", 0.70), ("w3", "B", "C", 0.75),
    ("w4", "C", "A", 0.55),
]


def _predictions(columns: str = "prob_") -> pd.DataFrame:
    """A run's predictions.tsv: identity rows of the cells, and rotated views (not test cells)
    that are more confident than any of them."""
    rows = []
    for image_id, true, pred, top in CELLS:
        for transform, confidence in (("identity", top), ("rot90", 0.999)):
            rest = (1 - confidence) / 2
            probs = {f"{columns}{c}": confidence if c == pred else rest for c in CLASSES}
            rows.append({"image_id": image_id, "transform": transform, "true": true, "pred": pred, **probs})
    return pd.DataFrame(rows)


def test_gallery_shows_the_most_confident_correct_and_wrong_cells_true_classes_in_turn():
    cells = select_cells(_predictions(), CLASSES, n_correct=4, n_wrong=3)
    assert cells["kind"].tolist() == ["correct"] * 4 + ["wrong"] * 3
    # correct: the most confident of A, B, C, then A's second; c1 before c2 (tie, by image_id)
    assert cells["image_id"].tolist() == ["a1", "b1", "c1", "a2", "w1", "w3", "w4"]
    assert cells["true"].tolist() == ["A", "B", "C", "A", "A", "B", "C"]
    assert cells["pred"].tolist() == ["A", "B", "C", "A", "B", "C", "A"]  # wrong: pred != true
    np.testing.assert_allclose(cells["confidence"], [0.90, 0.95, 0.85, 0.80, 0.99, 0.75, 0.55])
    # more asked than there are: every wrong cell once, B's second-most confident error last
    everything = select_cells(_predictions(), CLASSES, n_correct=0, n_wrong=10)
    assert everything["image_id"].tolist() == ["w1", "w3", "w4", "w2"]
    # a run without probabilities (raw SVM scores only) ranks by its top score
    scores = select_cells(_predictions("score_"), CLASSES, n_correct=3, n_wrong=1)
    assert scores["image_id"].tolist() == ["a1", "b1", "c1", "w1"]


class _TokenNetwork(nn.Module):
    """A network without a spatial feature map (patches -> tokens -> mean), like a ViT's trunk;
    its attention-like (N, heads, tokens, dim) tensor is 4-D but no map of the image."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3 * 8 * 8, 8)
        self.heads = nn.Identity()
        self.head = nn.Linear(8, len(CLASSES))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        patches = x.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
        tokens = self.embed(patches)  # (N, 16, 8)
        tokens = self.heads(tokens.reshape(len(x), 16, 2, 4).transpose(1, 2)).transpose(1, 2).flatten(2)
        return tokens.mean(1)


def test_gallery_without_maps_lists_the_cells_and_why(tmp_path, monkeypatch, caplog):
    """A bundle whose network has no spatial feature map: the gallery shows the chosen cells
    without maps, every row of the table and the log give the reason."""
    network = _TokenNetwork().eval()
    images = tmp_path / "images"
    images.mkdir()
    table = []
    for image_id, *_ in CELLS:
        Image.new("RGB", (40, 40), (200, 120, 150)).save(images / f"{image_id}.png")
        table.append({"image_id": image_id, "path": f"images/{image_id}.png", "abspath": str(images / f"{image_id}.png")})
    pd.DataFrame(table).to_csv(tmp_path / "validated.tsv", sep="\t", index=False)
    run = tmp_path / "runs/t/finetune/tokens/softmax/holdout"
    run.mkdir(parents=True)
    _predictions().to_csv(run / "predictions.tsv", sep="\t", index=False)

    spec = {
        "run": {"path": "runs/t/finetune/tokens/softmax/holdout"},
        "features": {"kind": "finetuned_network"},
        "backbone": {"name": "paper_cnn", "parts": [{"name": "paper_cnn"}]},
        "preprocessing": {"paper_cnn": [{"op": "center_crop", "size": 32}]},
        "display_name": "tokens (finetune)",
        "task": {"name": "t"},
    }
    head = {"weight": network.head.weight.detach().numpy(), "bias": network.head.bias.detach().numpy()}

    class Predictor:  # the bundle's network and head, as leukotype.predict.Predictor gives them
        def __init__(self, *_args, **_kwargs) -> None:
            self.bundle = SimpleNamespace(spec=spec, classes=CLASSES, kind="softmax")
            self._head = head

        def network(self):
            return network, lambda image: torch.from_numpy(np.asarray(image.resize((32, 32)), np.float32) / 255).permute(2, 0, 1)

        def prepare(self, image, _abspath):
            return image

        def scores(self, X):
            logits = X @ head["weight"].T + head["bias"]
            return logits, np.asarray(CLASSES)[logits.argmax(1)]

    monkeypatch.setattr("leukotype.predict.Predictor", Predictor)
    drawn, draw = {}, gallery.plot_gallery

    def plot(cells, pictures, *args, **kwargs):
        drawn.update(pictures=pictures, note=kwargs["note"])
        return draw(cells, pictures, *args, **kwargs)

    monkeypatch.setattr(gallery, "plot_gallery", plot)
    with caplog.at_level(logging.WARNING, logger="leukotype.gallery"):
        cells = run_gallery(tmp_path / "bundle", [run / "predictions.tsv"], tmp_path / "validated.tsv", 2, 2,
                            tmp_path / "gallery.png", tmp_path / "gallery.tsv")
    written = pd.read_csv(tmp_path / "gallery.tsv", sep="\t")
    assert list(written.columns) == list(GALLERY_COLUMNS)
    assert written["image_id"].tolist() == ["a1", "b1", "w1", "w3"] == cells["image_id"].tolist()
    assert written["path"].tolist() == ["images/a1.png", "images/b1.png", "images/w1.png", "images/w3.png"]
    reason = "none: the network has no spatial feature map to explain"
    assert all(value.startswith(reason) for value in written["map"])
    assert "no spatial feature map" in caplog.text
    assert drawn["note"] == "no saliency maps: the network has no spatial feature map to explain (no convolution or pooling map)"
    for picture in drawn["pictures"]:  # the cells as they are, at the network's input size
        assert picture.size == (32, 32) and (np.asarray(picture) == (200, 120, 150)).all()
    assert (tmp_path / "gallery.png").stat().st_size > 0
