"""Published baselines (config validation, tables, figure), best-run marks, per-class tables and
figure titles that stay inside the image."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest

from leukotype.baselines import PUBLISHED, baseline_rows
from leukotype.compare import compare_runs, run_predictions, standing_against_best
from leukotype.comparison_report import (
    STANDING_COLUMN,
    add_baselines,
    mark_standing,
    per_class_table,
    plot_comparison_matrix,
    run_labels,
    table_run_keys,
    write_comparison_tables,
    write_per_class,
)
from leukotype.config import load_schema, validate_config
from leukotype.errors import LeukotypeError
from leukotype.metrics import METRICS, fold_summary
from leukotype.report import TABLE_COLUMNS, paper_table, plot_accuracy, plot_confusion_grid

CLASSES = ["L1", "L2"]

MINIMAL = {
    "dataset": {"source": "demo"},
    "tasks": [{"name": "subtype", "column": "subtype", "classes": CLASSES}],
    "models": [{"backbone": "vgg16", "layers": ["fc6"]}],
}

PAPER_ROW = {
    "study": "Khan & Tehsin 2022, Table 3",
    "task": "subtype",
    "model": "Inception V3",
    "strategy": "features_svm",
    "metrics": {"accuracy": 0.875},
    "n_images": 633,
    "split": "75/25 hold-out",
    "citation": "K. Khan and S. Tehsin, CMC 2022",
}


def _config(**baseline_changes):
    cfg = copy.deepcopy(MINIMAL)
    cfg["evaluation"] = {"baselines": [{**PAPER_ROW, **baseline_changes}]}
    return cfg


def test_a_valid_baseline_passes_with_defaults():
    cfg = validate_config(_config())
    (row,) = cfg["evaluation"]["baselines"]
    assert row["approximate"] is False and row["metrics"] == {"accuracy": 0.875}


def test_baseline_naming_an_unknown_task_fails_listing_the_tasks():
    with pytest.raises(LeukotypeError) as excinfo:
        validate_config(_config(task="subtypes"))
    assert (
        "evaluation.baselines[0].task: 'subtypes' is not a configured task; choose one of "
        "['subtype']" in str(excinfo.value)
    )


def test_baseline_naming_an_unknown_metric_fails_listing_the_metrics():
    with pytest.raises(LeukotypeError) as excinfo:
        validate_config(_config(metrics={"acc": 0.9}))
    message = str(excinfo.value)
    assert "evaluation.baselines[0].metrics" in message and "'acc' was unexpected" in message
    assert f"valid keys are {sorted(METRICS)}" in message


def test_baseline_given_in_percent_fails():
    with pytest.raises(LeukotypeError, match="92.09 is greater than the maximum of 1"):
        validate_config(_config(metrics={"accuracy": 92.09}))


def test_schema_lists_exactly_the_metrics_the_workflow_computes():
    schema = load_schema("config")
    item = schema["properties"]["evaluation"]["properties"]["baselines"]["items"]
    assert sorted(item["properties"]["metrics"]["properties"]) == sorted(METRICS)


def _records():
    def record(strategy, backbone, layer, accuracy):
        return {
            "task": "subtype", "strategy": strategy, "backbone": backbone, "layer": layer,
            "fold": "holdout", "classes": CLASSES, "n_test": 20,
            "metrics": {name: accuracy for name in METRICS},
            "ci": {name: [accuracy - 0.1, accuracy + 0.05] for name in METRICS},
            "confusion": [[9, 1], [3, 7]] if accuracy > 0.7 else [[6, 4], [4, 6]],
        }

    return [
        record("features_svm", "vgg16", "fc6", 0.80),
        record("finetune", "vgg16", "softmax", 0.60),
    ]


def test_baselines_appear_in_the_table_marked_as_published(tmp_path):
    summary = fold_summary(_records())
    table = paper_table(summary, "subtype", dataset="SYNTHETIC: demo")
    approx = {**PAPER_ROW, "model": "VGG16", "strategy": "finetune", "approximate": True,
              "metrics": {"accuracy": 0.96, "kappa": 0.9}}
    shown = add_baselines(table, [PAPER_ROW, approx])
    assert list(shown.columns) == [*TABLE_COLUMNS, "Data", "Source"]
    assert shown["Source"].tolist() == [
        "this workflow",
        "this workflow",
        f"Khan & Tehsin 2022, Table 3 ({PUBLISHED}; 633 images)",
        f"Khan & Tehsin 2022, Table 3 ({PUBLISHED}; 633 images)",
    ]
    published = shown.iloc[2]
    assert (published["Technique"], published["Model"], published["Classifier"]) == (
        "Feature extraction", "Inception V3", "SVM")
    assert published["Accuracy"] == "87.5" and published["Precision"] == "—"
    assert published["Accuracy 95% CI"] == "" and published["Folds"] == "75/25 hold-out"
    assert published["Data"] == "the study's own (633 images)"
    assert shown.iloc[3]["Accuracy"] == "~96.0" and shown.iloc[3]["Kappa"] == "~0.900"
    assert shown.iloc[3]["Technique"] == "Fine tuning"
    assert add_baselines(table, []) is table  # nothing configured: the table as it was
    assert list(baseline_rows([PAPER_ROW], ["Model"]).columns) == ["Model", "Source"]


def test_accuracy_figure_shows_published_bars_and_keeps_a_long_title_inside(tmp_path):
    summary = fold_summary(_records())
    long_name = "PBC (Acevedo et al. 2020), full dataset, 17,092 images, CellaVision DM96, MGG stain"
    fig = plot_accuracy(summary, "subtype", tmp_path / "acc.png", dataset=long_name,
                        baselines=[PAPER_ROW])
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[-1] == "Inception V3 [Khan & Tehsin 2022, Table 3, published] — Feature extraction"
    hatched = [p for p in ax.patches if p.get_hatch() == "//"]
    assert [round(p.get_width(), 1) for p in hatched] == [87.5]
    assert PUBLISHED in [t.get_text() for t in fig.legends[0].get_texts()]
    _assert_title_inside(fig)
    grid = plot_confusion_grid(_records(), "subtype", tmp_path / "grid.png", dataset=long_name)
    _assert_title_inside(grid)


def _assert_title_inside(fig):
    renderer = fig.canvas.get_renderer()
    title = fig._suptitle
    assert title is not None and "\n" in title.get_text()  # wrapped, not cut off
    box = title.get_window_extent(renderer)
    width, height = fig.get_size_inches() * fig.dpi
    assert box.x0 >= 0 and box.x1 <= width and box.y1 <= height


def _runs():
    ids = [f"i{k:02d}" for k in range(20)]
    true = np.array(CLASSES * 10)
    good = true.copy()
    good[19] = "L1"  # right on 19 of 20; wrong where the other run is wrong too
    bad = np.where(np.arange(20) < 12, true, np.where(true == "L1", "L2", "L1"))  # 12 of 20
    frame = lambda pred: pd.DataFrame({"image_id": ids, "transform": "identity", "true": true, "pred": pred})  # noqa: E731
    return [
        run_predictions("features_svm:vgg16-fc6", "holdout", frame(good)),
        run_predictions("finetune:vgg16-softmax", "holdout", frame(bad)),
    ]


def test_main_table_marks_the_best_run_and_comparison_outputs(tmp_path):
    summary = fold_summary(_records())
    comparisons = compare_runs(_runs(), CLASSES, n_boot=200)
    keys = table_run_keys(summary, "subtype")
    assert keys == ["features_svm:vgg16-fc6", "finetune:vgg16-softmax"]
    marked = mark_standing(paper_table(summary, "subtype"), keys,
                           standing_against_best(comparisons, keys))
    # 7 discordant cells (12..18), all for the first run: exact McNemar p = 2 / 2**7 < 0.05.
    assert (comparisons["a_only"].iloc[0], comparisons["b_only"].iloc[0]) == (7, 0)
    assert comparisons["p_value"].iloc[0] == pytest.approx(2 / 2**7)
    assert marked[STANDING_COLUMN].tolist() == ["best", "worse"]

    labels = run_labels(summary, "subtype")
    paths = write_comparison_tables(comparisons, labels, tmp_path / "subtype_comparisons")
    csv = pd.read_csv(paths["csv"])
    assert csv.loc[0, "label_a"] == "VGG16 (fc6) — Feature extraction"
    assert csv.loc[0, "accuracy_diff"] == pytest.approx(0.35)
    md = paths["md"].read_text()
    assert "| VGG16 (fc6) — Feature extraction | VGG16 — Fine tuning | +35.0 |" in md
    assert "\\begin{tabular}" in paths["tex"].read_text()
    fig = plot_comparison_matrix(comparisons, labels, tmp_path / "m.png", "subtype: a long title " * 6)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert sorted(texts) == ["+35.0*", "-35.0*"]
    _assert_title_inside(fig)


def test_per_class_table_per_run(tmp_path):
    summary = fold_summary(_records())
    table = per_class_table(_records(), run_labels(summary, "subtype"))
    first = table[table["run"] == "features_svm:vgg16-fc6"].set_index("class")
    # confusion [[9, 1], [3, 7]]: L1 precision 9/12, recall 9/10; L2 precision 7/8, recall 7/10
    assert first.loc["L1", ["precision", "recall", "support"]].tolist() == pytest.approx([0.75, 0.9, 10])
    assert first.loc["L2", "f1"] == pytest.approx(2 * 7 / (2 * 7 + 1 + 3))
    paths = write_per_class(table, tmp_path / "subtype_per_class")
    md = paths["md"].read_text()
    assert "### VGG16 (fc6) — Feature extraction" in md and "| L1 | 75.0 | 90.0 |" in md
    with pytest.raises(LeukotypeError):
        mark_standing(paper_table(summary, "subtype"), ["one"], {})
