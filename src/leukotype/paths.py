"""Where every result of a study lives: the one definition of the results folder's layout.

Every function returns a path under ``results`` as a string. Each field defaults to its own
Snakemake wildcard (``"{task}"``, ``"{fold}"``, ...), so the same call gives a rule's output
pattern (``run_file(R, PREDICTIONS, strategy="{svm_strategy}")``) and, with values, one run's
file (``run_file(R, PREDICTIONS, "subtype", "features_svm", "vgg16", "fc6", "holdout")``).
Used by ``config.Run``, the rule files' outputs and input functions, and the benchmarks.

Layout::

    runs/<task>/<strategy>/<backbone>/<layer>/<fold>/<file>   one run (RUN_TEMPLATE)
    features/<backbone>/                                       extracted features
    checkpoints/<task>/<backbone>/<fold>/                      fine-tuning resume state
    external/<set>/features/<adapt>/<backbone>/                an external set's features
    <run folder>/external/<set>/<adapt>/<file>                 a run's predictions and metrics on it
    tables/<task>_comparisons.*, figures/<task>_comparisons.png    paired comparisons (internal)
    tables/<task>_<set>_comparisons.*, figures/<task>_<set>_comparisons.png   on an external set
"""

from __future__ import annotations

#: A run's folder relative to the results folder.
RUN_TEMPLATE = "runs/{task}/{strategy}/{backbone}/{layer}/{fold}"

# Files of a run folder.
PREDICTIONS = "predictions.tsv"
METRICS = "metrics.json"
CONFUSION = "confusion.csv"
CONFUSION_PNG = "confusion.png"
SVM_MODEL = "svm.skops"
CV_RESULTS = "cv_results.tsv"
#: Temperature of an SVM run's probabilities, fitted on its training part (calibration.py).
CALIBRATION = "calibration.json"
FINETUNED_MODEL = "model.pt"
HISTORY = "history.tsv"
LEARNING_CURVE = "learning_curve.png"
#: Folder of a fine-tuning run holding the fine-tuned network's features (for finetune_svm).
FINETUNED_FEATURES = "features"

#: Layer folder of the strategies that read no backbone layer (what their runs are keyed by).
STRATEGY_LAYER = {"finetune": "softmax", "finetune_svm": "finetuned"}


def _join(results: str, relative: str) -> str:
    return f"{results}/{relative}" if results else relative


def run_dir(
    results: str = "",
    task: str = "{task}",
    strategy: str = "{strategy}",
    backbone: str = "{backbone}",
    layer: str = "{layer}",
    fold: str = "{fold}",
) -> str:
    """A run's folder (relative when ``results`` is empty)."""
    relative = RUN_TEMPLATE.format(
        task=task, strategy=strategy, backbone=backbone, layer=layer, fold=fold
    )
    return _join(results, relative)


def run_file(
    results: str,
    name: str,
    task: str = "{task}",
    strategy: str = "{strategy}",
    backbone: str = "{backbone}",
    layer: str = "{layer}",
    fold: str = "{fold}",
) -> str:
    """A file (or sub-folder) ``name`` of a run folder."""
    return f"{run_dir(results, task, strategy, backbone, layer, fold)}/{name}"


def finetune_file(
    results: str, name: str, task: str = "{task}", backbone: str = "{backbone}", fold: str = "{fold}"
) -> str:
    """A file of a fine-tuning run (its layer folder is fixed: ``STRATEGY_LAYER['finetune']``)."""
    return run_file(results, name, task, "finetune", backbone, STRATEGY_LAYER["finetune"], fold)


def finetuned_features_dir(
    results: str, task: str = "{task}", backbone: str = "{backbone}", fold: str = "{fold}"
) -> str:
    """The fine-tuned network's features that ``finetune_svm`` reads."""
    return finetune_file(results, FINETUNED_FEATURES, task, backbone, fold)


def features_dir(results: str, backbone: str = "{backbone}") -> str:
    """Extracted features of one single backbone (every layer, image and transform)."""
    return _join(results, f"features/{backbone}")


def checkpoint_dir(
    results: str, task: str = "{task}", backbone: str = "{backbone}", fold: str = "{fold}"
) -> str:
    """Fine-tuning's resume state; outside the run folder so a failed job keeps it."""
    return _join(results, f"checkpoints/{task}/{backbone}/{fold}")


# --------------------------------------------------------------------------------------------
# external test sets


def external_dir(results: str, ext: str = "{ext}") -> str:
    """An external test set's own folder (validation, features): no training job reads it."""
    return _join(results, f"external/{ext}")


def external_features_dir(
    results: str, ext: str = "{ext}", adapt: str = "{adapt}", backbone: str = "{backbone}"
) -> str:
    """Features of an external set's images (``adapt``: ``none`` or ``bn``)."""
    return f"{external_dir(results, ext)}/features/{adapt}/{backbone}"


def external_run_file(
    results: str,
    name: str,
    task: str = "{task}",
    strategy: str = "{strategy}",
    backbone: str = "{backbone}",
    layer: str = "{layer}",
    fold: str = "{fold}",
    ext: str = "{ext}",
    adapt: str = "{adapt}",
) -> str:
    """A run's file about an external set (predictions, metrics, fine-tuned features)."""
    return run_file(results, f"external/{ext}/{adapt}/{name}", task, strategy, backbone, layer, fold)


# --------------------------------------------------------------------------------------------
# paired comparisons


def comparisons_table(
    results: str, task: str = "{task}", ext: str | None = None, fmt: str = "csv"
) -> str:
    """The paired-comparison table of a task on its internal test part (``ext=None``) or on
    an external set (``tables/<task>_<set>_comparisons.<fmt>``)."""
    middle = f"_{ext}" if ext else ""
    return _join(results, f"tables/{task}{middle}_comparisons.{fmt}")


def comparisons_figure(results: str, task: str = "{task}", ext: str | None = None) -> str:
    """The difference-matrix figure next to :func:`comparisons_table`."""
    middle = f"_{ext}" if ext else ""
    return _join(results, f"figures/{task}{middle}_comparisons.png")
