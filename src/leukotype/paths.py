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
    data/samples/<task>[@<variant>].tsv                        sample table (a variant's own
                                                               only when it draws colour views)
    preprocessing/<key>/images.tsv                             a per-image step's table
                                                               (crop boxes: key crop_m<margin>)
    preprocessing/<variant>/state.json                         a variant's fitted states
                                                               (stain reference)
    preprocessing/<variant>.<fold>/state.json                  the same, fitted on one fold's
                                                               training part (k-fold; its
                                                               frozen features likewise:
                                                               features/<backbone>@<variant>.<fold>/)
    external/<set>/features/<adapt>/<backbone>/                an external set's features
    external/<set>/preprocessing/<key>/images.tsv              its per-image tables
    <run folder>/external/<set>/<adapt>/<file>                 a run's predictions and metrics on it
    tables/<task>_comparisons.*, figures/<task>_comparisons.png    paired comparisons (internal)
    tables/<task>_<set>_comparisons.*, figures/<task>_<set>_comparisons.png   on an external set

A preprocessing variant other than ``none`` (``leukotype.preprocessing``) is a suffix of the
backbone folder, ``<backbone>@<variant>``: the rules' ``{prep}`` wildcard holds ``""`` or
``"@<variant>"``, so a study without variants keeps its paths. ``prep`` arguments take a
variant's name and default to ``none`` (callers that know nothing of variants get the paths
they always got); rule patterns pass ``prep="{prep}"``.
"""

from __future__ import annotations

#: A run's folder relative to the results folder.
RUN_TEMPLATE = "runs/{task}/{strategy}/{backbone}/{layer}/{fold}"
#: Between a backbone and its preprocessing variant in a path segment.
PREP_SEPARATOR = "@"
#: The variant that changes nothing.
NO_PREP = "none"
#: Between a variant and a fold in the name of a state fitted on one fold's training part, and
#: of the frozen features extracted under it (``crop15_wb_grey.r0f2``); never in a variant's
#: own name (the config schema allows letters, digits and ``_``).
FOLD_FIT_SEPARATOR = "."


def fold_fitted(variant: str, fold: str) -> str:
    """The name of ``variant`` as fitted on ``fold``'s training part."""
    return f"{variant}{FOLD_FIT_SEPARATOR}{fold}"


def split_fold_fitted(name: str) -> tuple[str, str | None]:
    """(variant, fold) of a :func:`fold_fitted` name; (name, None) for a variant's own name."""
    variant, _, fold = name.partition(FOLD_FIT_SEPARATOR)
    return variant, fold or None

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

#: Files of a few-shot run on an external set (``<run folder>/external/<set>/shots/``): the
#: external cells it trained on, and its predictions for the run's internal test part.
SHOTS = "shots.tsv"
INTERNAL_PREDICTIONS = "internal_predictions.tsv"

#: Layer folder of the strategies that read no backbone layer (what their runs are keyed by).
STRATEGY_LAYER = {"finetune": "softmax", "finetune_svm": "finetuned"}


def _join(results: str, relative: str) -> str:
    return f"{results}/{relative}" if results else relative


def prep_suffix(prep: str = NO_PREP) -> str:
    """``""`` for ``none``, ``"@<variant>"`` otherwise; the wildcard ``"{prep}"`` stays itself."""
    if prep in ("", NO_PREP):
        return ""
    if prep == "{prep}":
        return prep
    return f"{PREP_SEPARATOR}{prep}"


def prep_name(suffix: str) -> str:
    """The variant a ``{prep}`` wildcard value names (``""`` -> ``none``)."""
    return suffix[len(PREP_SEPARATOR):] if suffix.startswith(PREP_SEPARATOR) else (suffix or NO_PREP)


def run_dir(
    results: str = "",
    task: str = "{task}",
    strategy: str = "{strategy}",
    backbone: str = "{backbone}",
    layer: str = "{layer}",
    fold: str = "{fold}",
    prep: str = NO_PREP,
) -> str:
    """A run's folder (relative when ``results`` is empty)."""
    relative = RUN_TEMPLATE.format(
        task=task, strategy=strategy, backbone=backbone + prep_suffix(prep), layer=layer, fold=fold
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
    prep: str = NO_PREP,
) -> str:
    """A file (or sub-folder) ``name`` of a run folder."""
    return f"{run_dir(results, task, strategy, backbone, layer, fold, prep)}/{name}"


def finetune_file(
    results: str,
    name: str,
    task: str = "{task}",
    backbone: str = "{backbone}",
    fold: str = "{fold}",
    prep: str = NO_PREP,
) -> str:
    """A file of a fine-tuning run (its layer folder is fixed: ``STRATEGY_LAYER['finetune']``)."""
    return run_file(results, name, task, "finetune", backbone, STRATEGY_LAYER["finetune"], fold, prep)


def finetuned_features_dir(
    results: str,
    task: str = "{task}",
    backbone: str = "{backbone}",
    fold: str = "{fold}",
    prep: str = NO_PREP,
) -> str:
    """The fine-tuned network's features that ``finetune_svm`` reads."""
    return finetune_file(results, FINETUNED_FEATURES, task, backbone, fold, prep)


def features_dir(results: str, backbone: str = "{backbone}", prep: str = NO_PREP) -> str:
    """Extracted features of one single backbone (every layer, image and transform)."""
    return _join(results, f"features/{backbone}{prep_suffix(prep)}")


def checkpoint_dir(
    results: str,
    task: str = "{task}",
    backbone: str = "{backbone}",
    fold: str = "{fold}",
    prep: str = NO_PREP,
) -> str:
    """Fine-tuning's resume state; outside the run folder so a failed job keeps it."""
    return _join(results, f"checkpoints/{task}/{backbone}{prep_suffix(prep)}/{fold}")


def samples_file(results: str, task: str = "{task}", prep: str = NO_PREP) -> str:
    """A task's sample table; a variant that draws colour views has its own."""
    return _join(results, f"data/samples/{task}{prep_suffix(prep)}.tsv")


# --------------------------------------------------------------------------------------------
# preprocessing variants' data and external test sets

#: File names of a variant's data (the same names as leukotype.preprocessing uses).
ANALYSIS_TABLE = "images.tsv"
PREP_STATE = "state.json"


def analysis_table(results: str, key: str = "{key}") -> str:
    """A per-image step's table for the training data (crop boxes: key ``crop_m<margin>``)."""
    return _join(results, f"preprocessing/{key}/{ANALYSIS_TABLE}")


def prep_state(results: str, variant: str = "{variant}") -> str:
    """A variant's states fitted on the training part (stain reference)."""
    return _join(results, f"preprocessing/{variant}/{PREP_STATE}")


def external_dir(results: str, ext: str = "{ext}") -> str:
    """An external test set's own folder (validation, features): no training job reads it."""
    return _join(results, f"external/{ext}")


def external_analysis_table(results: str, ext: str = "{ext}", key: str = "{key}") -> str:
    return f"{external_dir(results, ext)}/preprocessing/{key}/{ANALYSIS_TABLE}"


def external_features_dir(
    results: str, ext: str = "{ext}", adapt: str = "{adapt}", backbone: str = "{backbone}", prep: str = NO_PREP
) -> str:
    """Features of an external set's images (``adapt``: ``none`` or ``bn``), in folders no
    training job reads."""
    return f"{external_dir(results, ext)}/features/{adapt}/{backbone}{prep_suffix(prep)}"


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
    prep: str = NO_PREP,
) -> str:
    """A run's file about an external set (predictions, metrics, fine-tuned features)."""
    return run_file(results, f"external/{ext}/{adapt}/{name}", task, strategy, backbone, layer, fold, prep)


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
