"""Paper-style tables (exact strings) and figures (files, size, axes)."""

from __future__ import annotations

import pandas as pd
import pytest
from PIL import Image

from leukotype.errors import LeukotypeError
from leukotype.metrics import METRICS, fold_summary
from leukotype.report import (
    TABLE_COLUMNS,
    latex_escape,
    model_display_name,
    paper_table,
    plot_accuracy,
    plot_confusion,
    plot_confusion_grid,
    plot_learning_curve,
    split_model_id,
    write_tables,
)

CLASSES = ["L1", "L2", "M2", "M3", "M5"]
CONFUSION = [[8, 1, 1, 0, 0], [1, 9, 0, 0, 0], [0, 0, 7, 2, 1], [0, 0, 1, 9, 0], [0, 1, 0, 1, 8]]


def _record(strategy, backbone, layer, fold, values, ci=(0.0, 1.0), task="subtype"):
    return {
        "task": task,
        "strategy": strategy,
        "backbone": backbone,
        "layer": layer,
        "fold": fold,
        "classes": CLASSES,
        "n_test": 50,
        "metrics": dict(zip(METRICS, values)),
        "ci": {name: list(ci) for name in METRICS},
        "confusion": CONFUSION,
    }


@pytest.fixture()
def records():
    # values: accuracy, precision, recall, f1, balanced accuracy, kappa
    runs = [
        _record(
            "features_svm",
            "alexnet",
            "fc6",
            "holdout",
            [0.9209, 0.90, 0.8876, 0.8912, 0.8876, 0.9011],
            ci=(0.90, 0.94),
        ),
        _record(
            "features_svm",
            "inception_v3+resnet101",
            "pool",
            "holdout",
            [0.50] * 5 + [0.40],
            ci=(0.40, 0.60),
        ),
        # another task: must not appear
        _record("features_svm", "vgg16", "fc7", "holdout", [0.99] * 6, task="lineage"),
    ]
    folds = {
        "r0f0": (0.80, 0.70, 0.60, 0.65, 0.60, 0.70),
        "r0f1": (0.90, 0.80, 0.70, 0.75, 0.70, 0.80),
        "r0f2": (0.85, 0.75, 0.80, 0.70, 0.80, 0.90),
    }
    runs += [_record("finetune", "vgg16", "softmax", fold, list(v)) for fold, v in folds.items()]
    return runs


@pytest.fixture()
def summary(records):
    return fold_summary(records)


EXPECTED_MD = """\
| Technique | Model | Classifier | Accuracy | Precision | Recall | F1 | Balanced accuracy | Kappa | Accuracy 95% CI | Folds |
| :--- | :--- | :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
| Feature extraction | AlexNet (fc6) | SVM | 92.1 | 90.0 | 88.8 | 89.1 | 88.8 | 0.901 | [90.0, 94.0] | hold-out |
| Feature extraction | Inception V3 + ResNet101 | SVM | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 0.400 | [40.0, 60.0] | hold-out |
| Fine tuning | VGG16 | Softmax (CNN) | 85.0 ± 5.0 | 75.0 ± 5.0 | 70.0 ± 10.0 | 70.0 ± 5.0 | 70.0 ± 10.0 | 0.800 ± 0.100 | [72.6, 97.4] | 3 |
"""

EXPECTED_TEX = r"""\begin{tabular}{lllrrrrrrrr}
\toprule
Technique & Model & Classifier & Accuracy & Precision & Recall & F1 & Balanced accuracy & Kappa & Accuracy 95\% CI & Folds \\
\midrule
Feature extraction & AlexNet (fc6) & SVM & 92.1 & 90.0 & 88.8 & 89.1 & 88.8 & 0.901 & [90.0, 94.0] & hold-out \\
Feature extraction & Inception V3 + ResNet101 & SVM & 50.0 & 50.0 & 50.0 & 50.0 & 50.0 & 0.400 & [40.0, 60.0] & hold-out \\
Fine tuning & VGG16 & Softmax (CNN) & 85.0 $\pm$ 5.0 & 75.0 $\pm$ 5.0 & 70.0 $\pm$ 10.0 & 70.0 $\pm$ 5.0 & 70.0 $\pm$ 10.0 & 0.800 $\pm$ 0.100 & [72.6, 97.4] & 3 \\
\bottomrule
\end{tabular}
"""


def test_paper_table_shape_and_values(summary):
    table = paper_table(summary, "subtype")
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert len(table) == 3
    assert table["Model"].tolist() == ["AlexNet (fc6)", "Inception V3 + ResNet101", "VGG16"]
    assert table.loc[2, "Accuracy"] == "85.0 ± 5.0"
    with pytest.raises(LeukotypeError, match="tasks present"):
        paper_table(summary, "nope")


def test_write_tables_exact_markdown_latex_and_csv(summary, tmp_path):
    table = paper_table(summary, "subtype")
    paths = write_tables(table, tmp_path / "tables" / "subtype")
    assert paths["md"].read_text(encoding="utf-8") == EXPECTED_MD
    assert paths["tex"].read_text(encoding="utf-8") == EXPECTED_TEX
    csv = pd.read_csv(paths["csv"], dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(csv, table)
    assert sorted(p.name for p in paths["md"].parent.iterdir()) == [
        "subtype.csv",
        "subtype.md",
        "subtype.tex",
    ]


def test_names_and_escaping():
    assert latex_escape("a_b & 5% ± #1 {x} \\") == r"a\_b \& 5\% $\pm$ \#1 \{x\} \textbackslash{}"
    assert model_display_name("vgg16", "fc7") == "VGG16 (fc7)"
    assert model_display_name("efficientnet_lite0", "pool") == "EfficientNet-Lite0"
    assert model_display_name("paper_cnn", "flatten") == "Paper CNN"
    assert model_display_name("mystery_net", "pool") == "mystery_net"
    assert split_model_id("inception_v3+resnet101-pool") == ("inception_v3+resnet101", "pool")
    assert split_model_id("resnet101") == ("resnet101", "")


def test_other_layers_are_named_only_when_needed(records):
    extra = _record("features_svm", "resnet101", "layer3", "holdout", [0.7] * 6)
    pool = _record("features_svm", "resnet101", "pool", "holdout", [0.8] * 6)
    models = paper_table(fold_summary([*records, extra, pool]), "subtype")["Model"].tolist()
    assert "ResNet101 (layer3)" in models and "ResNet101 (pool)" in models
    assert "Inception V3 + ResNet101" in models  # a single layer: no suffix


def _png(path):
    with Image.open(path) as image:
        return image.size, image.info.get("dpi")


def test_plot_accuracy_one_bar_per_run_with_chance_line(summary, tmp_path):
    path = tmp_path / "figures" / "accuracy.png"
    fig = plot_accuracy(summary, "subtype", path)
    assert path.stat().st_size > 10_000
    (width, _), dpi = _png(path)
    assert width == 8 * 150 and dpi == pytest.approx((150, 150), abs=0.1)
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    bars = ax.patches
    assert sorted(round(b.get_width(), 2) for b in bars) == [50.0, 85.0, 92.09]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "AlexNet (fc6) — Feature extraction",
        "Inception V3 + ResNet101 — Feature extraction",
        "VGG16 — Fine tuning",
    ]
    chance = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(chance) == 1 and chance[0].get_xdata()[0] == pytest.approx(20.0)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["chance (1/5 = 20.0%)", "Feature extraction", "Fine tuning"]
    assert [p.name for p in path.parent.iterdir()] == ["accuracy.png"]


def test_plot_confusion_grid_one_panel_per_run_plus_colorbar(records, tmp_path):
    path = tmp_path / "grid.png"
    fig = plot_confusion_grid(records, "subtype", path)
    assert path.stat().st_size > 20_000
    assert len(fig.axes) == 3 + 1  # three runs, one shared colour bar
    titles = [ax.get_title() for ax in fig.axes[:3]]
    assert titles[2] == "VGG16 — Fine tuning\n3 folds summed, n = 150"
    # cells show summed counts and row percentages
    texts = [t.get_text() for t in fig.axes[2].texts]
    assert "24\n80%" in texts and "27\n90%" in texts
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == CLASSES

    more = records + [_record("finetune_svm", "resnet101", "pool", "holdout", [0.7] * 6)]
    fig = plot_confusion_grid(more, "subtype", tmp_path / "grid4.png")
    assert len(fig.axes) == 4 + 1  # 2 x 3 grid: the two empty panels are removed
    with pytest.raises(LeukotypeError, match="no metrics records"):
        plot_confusion_grid(records, "nope", tmp_path / "x.png")


def test_plot_confusion_single(records, tmp_path):
    path = tmp_path / "confusion.png"
    fig = plot_confusion(records[0], path)
    assert path.stat().st_size > 10_000
    assert len(fig.axes) == 2  # matrix + colour bar
    image = fig.axes[0].images[0].get_array()
    assert image[0, 0] == pytest.approx(0.8) and image[2, 3] == pytest.approx(0.2)


def test_plot_learning_curve_panels(tmp_path):
    history = pd.DataFrame(
        {
            "epoch": [1, 2, 3],
            "train_loss": [1.0, 0.6, 0.4],
            "val_loss": [1.1, 0.8, 0.7],
            "train_acc": [0.5, 0.7, 0.8],
            "val_acc": [0.45, 0.6, 0.65],
        }
    )
    fig = plot_learning_curve(history, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 10_000
    assert [ax.get_ylabel() for ax in fig.axes] == ["Loss", "Accuracy"]
    assert [len(ax.get_lines()) for ax in fig.axes] == [2, 2]
    loss_only = plot_learning_curve(history[["epoch", "train_loss"]], tmp_path / "loss.png")
    assert len(loss_only.axes) == 1
    # read back from TSV without a validation part: empty cells, no validation lines
    no_val = history.assign(val_loss="", val_acc="").astype(str)
    fig = plot_learning_curve(no_val, tmp_path / "no_val.png")
    assert [len(ax.get_lines()) for ax in fig.axes] == [1, 1]
    with pytest.raises(LeukotypeError, match="no loss column"):
        plot_learning_curve(history[["epoch", "val_acc"]], tmp_path / "bad.png")
