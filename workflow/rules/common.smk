# Config validation, wildcard constraints and input functions shared by every rule file.
import os
import re
import sys
from functools import cache
from pathlib import Path

from snakemake.exceptions import WorkflowError

# The package lives in src/; make it importable even when it is not pip-installed.
sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from leukotype import catalog, paths  # noqa: E402
from leukotype.config import (  # noqa: E402
    external_svm_feature_dirs,
    extraction_backbones,
    finetune_feature_dirs as _finetune_feature_dirs,
    features_result_settings,
    finetune_result_settings as _finetune_result_settings,
    staged_weight_files as _staged_weight_files,
    STRATEGIES,
    study_runs,
    svm_feature_dirs,
    weight_files,
    weights_setting,
)
from leukotype.config import validate_config as _validate_config  # noqa: E402
from leukotype.errors import LeukotypeError  # noqa: E402
from leukotype.preprocessing import (  # noqa: E402
    SEGMENTATION_VERSION,
    fitted_variant_name,
    fold_fitted_variants,
    per_fold_variants,
    step_from_dict,
    variants,
)
from leukotype.split import fold_ids  # noqa: E402
from leukotype.stages import dataset_label  # noqa: E402

try:
    _validate_config(config)
except LeukotypeError as err:
    raise WorkflowError(f"config: {err}") from None

R = config["results"]
TASKS = {task["name"]: task for task in config["tasks"]}
FOLDS = fold_ids(config["split"])
RUNS = study_runs(config)
EXTRACT = extraction_backbones(config)
FINETUNED = sorted(
    {m["backbone"] for m in config["models"] if "finetune" in m["strategies"]}
)

# One software environment for every job: the CUDA build where jobs are configured for a GPU.
CONDA_ENV = (
    "../../envs/cuda.yaml" if config["compute"]["gpu"] else "../../envs/cpu.yaml"
)

# GPU jobs request one GPU only when the config asks for it; CPU jobs never do (SLURM: --gpus).
GPU_RESOURCES = {"gpu": 1} if config["compute"]["gpu"] else {}

# Weights are staged under one folder (login node with internet: `snakemake fetch_weights`);
# compute jobs, also on SLURM nodes without internet, read them from there. One rule decides
# it (config torch_home, else $TORCH_HOME, else torch's default), and every job sees the result.
from leukotype.weights import torch_home, torch_home_conflict  # noqa: E402

if torch_home_conflict(config["torch_home"]):
    print(f"note: {torch_home_conflict(config['torch_home'])}", file=sys.stderr)
TORCH_HOME = str(torch_home(config["torch_home"]))
os.environ["TORCH_HOME"] = TORCH_HOME


envvars:
    "TORCH_HOME",


def _alternatives(values):
    return "|".join(sorted({re.escape(str(v)) for v in values}))


# Preprocessing variants (leukotype.preprocessing), compared side by side like backbones: a
# variant other than `none` is the suffix `@<name>` of the backbone's folders ({prep}).
PREP = variants(config)
# Under k-fold a variant with a fitted step and no reference_source is fitted once per fold, on
# the fold's training part: its states and frozen features are `<name>.<fold>` (runs keep
# `@<name>`). FITTED: every name a state is fitted and frozen features are extracted under.
PER_FOLD = per_fold_variants(config)
FITTED = {**PREP, **fold_fitted_variants(config, FOLDS)}


def fitted_name(prep, fold):
    """Where a run's (variant, fold) frozen features and fitted state live."""
    return fitted_variant_name(prep, fold, PER_FOLD)


# Per-image step tables (crop boxes), one per key, shared by the variants with that step.
ANALYSES = {
    step.analysis_key(): step.to_dict()
    for variant in PREP.values()
    for step in variant.per_image_steps()
}


def _optional_prep():
    names = [n for n in FITTED if n != paths.NO_PREP]
    if not names:
        return "(?:)"
    return f"(?:{re.escape(paths.PREP_SEPARATOR)}(?:{_alternatives(names)}))?"


def variant_of(wildcards):
    return FITTED.get(paths.prep_name(wildcards.prep)) or variants({})[paths.NO_PREP]


def _fitted_state_name(wildcards):
    """The state a job's images are prepared with: its fold's for a run of a variant fitted
    per fold (fine-tuning, external predictions), else its {prep}'s own (extraction jobs of a
    fold-fitted name carry the fold in {prep})."""
    name = paths.prep_name(wildcards.prep)
    fold = getattr(wildcards, "fold", None)
    return fitted_name(name, fold) if fold else name


def preprocessing_record(wildcards):
    """The variant of a job (a param: changing its steps reruns the job)."""
    return variant_of(wildcards).to_dict()


def preprocessing_inputs(wildcards):
    """Per-image tables and the fitted state a variant's image jobs read (none for `none`)."""
    variant = variant_of(wildcards)
    files = [paths.analysis_table(R, key) for key in variant.analysis_keys()]
    if variant.fitted:
        files.append(paths.prep_state(R, _fitted_state_name(wildcards)))
    return files


def fit_preprocessing_inputs(wildcards):
    """What a variant's fitted steps see: at most `reference_images` training images that are
    test images in no task's split (so every split is an input), or the variant's
    `reference_source`, which no split changes. A variant fitted per fold (`<name>.<fold>`)
    sees that fold's training images."""
    variant = FITTED[wildcards.variant]
    if variant.reference_source:
        return {"reference": variant.reference_source}
    return {
        "splits": [f"{R}/data/splits/{task}.tsv" for task in TASKS],
        "analyses": [paths.analysis_table(R, key) for key in variant.analysis_keys()],
    }


def external_preprocessing_inputs(wildcards):
    """The external set's own per-image tables and the variant's state fitted on training."""
    variant = variant_of(wildcards)
    files = [
        paths.external_analysis_table(R, wildcards.ext, key)
        for key in variant.analysis_keys()
    ]
    if variant.fitted:
        files.append(paths.prep_state(R, _fitted_state_name(wildcards)))
    return files


def samples_input(wildcards):
    """The task's sample table; a variant that draws colour views has its own."""
    variant = variant_of(wildcards)
    return paths.samples_file(
        R, wildcards.task, variant.name if variant.views else paths.NO_PREP
    )


wildcard_constraints:
    task=_alternatives(TASKS),
    fold=_alternatives(FOLDS),
    backbone=_alternatives([m["backbone"] for m in config["models"]] + list(EXTRACT)),
    strategy=_alternatives(STRATEGIES),
    svm_strategy="features_svm|finetune_svm",
    layer=r"[A-Za-z0-9_]+",
    # "" (no preprocessing: the paths of a study without variants) or "@<variant>"
    prep=_optional_prep(),
    variant=_alternatives(FITTED),
    key=_alternatives(ANALYSES or ["-"]),
    ext=_alternatives([e["name"] for e in config["evaluation"]["external"]] or ["-"]),
    adapt="none|bn|shots",


def dataset_input(wildcards):
    """The manifest (or class folder) that validation reads."""
    source = config["dataset"]["source"]
    if source == "demo":
        return f"{R}/demo_data/manifest.csv"
    if not os.path.exists(source):
        raise WorkflowError(
            f"dataset.source {source!r} does not exist (relative to {os.getcwd()}); set it to a "
            "folder of class sub-folders, a manifest CSV, or 'demo'"
        )
    return source


def weights_input(backbone):
    """Weight files a job reads: staged ImageNet files are inputs, so a missing one is fetched
    by the local `fetch_weights` rule (or the run stops before any extraction)."""
    return list(_weight_files(backbone))


@cache  # called for every extraction and fine-tuning job; the config is fixed once parsed
def _weight_files(backbone):
    return tuple(weight_files(config, backbone))


def staged_weight_files():
    """ImageNet weight files that `fetch_weights` can download (torchvision backbones)."""
    return _staged_weight_files(config)


def feature_dirs(wildcards):
    """Feature folders an SVM run reads: the backbone's parts, or the fine-tuned network's."""
    return _svm_feature_dirs(
        wildcards.svm_strategy,
        wildcards.task,
        wildcards.backbone,
        wildcards.fold,
        paths.prep_name(wildcards.prep),
    )


def _svm_feature_dirs(strategy, task, backbone, fold, prep):
    return svm_feature_dirs(
        R, strategy, task, backbone, fold, prep, frozen_prep=fitted_name(prep, fold)
    )


def run_feature_dirs(wildcards):
    """Feature folders behind any run (their meta.json records its precision)."""
    return _svm_feature_dirs(
        wildcards.strategy,
        wildcards.task,
        wildcards.backbone,
        wildcards.fold,
        paths.prep_name(wildcards.prep),
    )


def svm_cv_results(wildcards):
    """An SVM run's cv_results.tsv (its solver goes into metrics.json); none for finetune."""
    if wildcards.strategy == "finetune":
        return []
    return [
        paths.run_file(
            R,
            paths.CV_RESULTS,
            wildcards.task,
            wildcards.strategy,
            wildcards.backbone,
            wildcards.layer,
            wildcards.fold,
            paths.prep_name(wildcards.prep),
        )
    ]


def finetune_feature_dirs(wildcards):
    """Cached backbone features the head trains on (paper policy), else nothing."""
    return _finetune_feature_dirs(
        config,
        wildcards.backbone,
        fitted_name(paths.prep_name(wildcards.prep), wildcards.fold),
    )


def finetune_result_settings(backbone):
    """Fine-tuning settings that change the trained model (execution-only ones left out)."""
    return _finetune_result_settings(config, backbone)


def weights_name(wildcards):
    """The weights setting of a backbone; for a combination whose parts differ, part -> setting."""
    return _per_part(wildcards.backbone, 0)


def weights_sha256(wildcards):
    """The sha256 pinned for the backbone's weights file (None when not pinned), like above."""
    return _per_part(wildcards.backbone, 1)


def _per_part(backbone, index):
    values = {
        part: weights_setting(config, part)[index] for part in catalog.parts(backbone)
    }
    distinct = set(values.values())
    return distinct.pop() if len(distinct) == 1 else values


def task_metrics(wildcards):
    return [
        f"{R}/{run.path}/{paths.METRICS}" for run in RUNS if run.task == wildcards.task
    ]


def task_predictions(wildcards):
    """Prediction tables of a task's runs, in the order of task_metrics."""
    return [
        f"{R}/{run.path}/{paths.PREDICTIONS}"
        for run in RUNS
        if run.task == wildcards.task
    ]


def comparison_settings():
    """The evaluation keys a comparison job reads (baselines and maps do not rerun it)."""
    return {k: config["evaluation"][k] for k in ("n_bootstrap", "seed", "alpha")}


def feature_map_targets():
    """One t-SNE map per extracted backbone (and variant) and layer; a variant fitted per
    fold is mapped as fitted on the first fold."""
    return [
        f"{R}/figures/features/{backbone}{paths.prep_suffix(fitted_name(prep, FOLDS[0]))}-{layer}.png"
        for backbone, layers in EXTRACT.items()
        for layer in layers
        for prep in PREP
    ]


def final_targets():
    targets = []
    for task in TASKS:
        targets += [
            f"{R}/tables/{task}.csv",
            f"{R}/tables/{task}.md",
            f"{R}/tables/{task}.tex",
            f"{R}/figures/{task}_accuracy.png",
            f"{R}/figures/{task}_confusion.png",
            f"{R}/tables/{task}_comparisons.md",
            f"{R}/tables/{task}_comparisons.tex",
            f"{R}/figures/{task}_comparisons.png",
            f"{R}/tables/{task}_per_class.md",
        ]
    targets += feature_map_targets()
    targets.append(f"{R}/tables/all_runs.tsv")
    targets += [f"{R}/models/{task}" for task in TASKS]
    targets += [f"{R}/figures/{task}_reliability.png" for task in TASKS]
    if config["gallery"]["correct"] or config["gallery"]["wrong"]:
        targets += [f"{R}/figures/{task}_gallery.png" for task in TASKS]
    if config["predict"]["model"]:
        targets.append(f"{R}/predictions/predictions.csv")
    return targets + external_targets()


# ------------------------------------------------------------------ model bundles (models.smk)


def _task_runs(wildcards):
    return [run for run in RUNS if run.task == wildcards.task]


def export_classifier_files(wildcards):
    """The trained classifier of every run of the task (export picks the best one)."""
    return sorted(
        {
            paths.run_file(
                R,
                (
                    paths.FINETUNED_MODEL
                    if run.strategy == "finetune"
                    else paths.SVM_MODEL
                ),
                run.task,
                run.strategy,
                run.backbone,
                run.layer,
                run.fold,
                run.prep,
            )
            for run in _task_runs(wildcards)
        }
    )


def export_feature_dirs(wildcards):
    """Training features of every run of the task: the classifiers' inputs."""
    return sorted(
        {
            folder
            for run in _task_runs(wildcards)
            for folder in _svm_feature_dirs(
                run.strategy, run.task, run.backbone, run.fold, run.prep
            )
        }
    )


def export_weight_files(wildcards):
    """Backbone weight files the bundles reference by sha256."""
    return sorted(
        {f for run in _task_runs(wildcards) for f in weights_input(run.backbone)}
    )


# External test sets (leukotype.external): their own validation, features and predictions,
# read by no training job.
from leukotype.external import NO_BATCHNORM, external_sets  # noqa: E402
from leukotype.external import SHOT_STRATEGIES, zero_shot_entry  # noqa: E402

EXTERNAL = {ext.name: ext for ext in external_sets(config)}
EXTERNAL_CFG = {e["name"]: e for e in config["evaluation"]["external"]}
# what the jobs that never refit see of an entry: a few-shot setting does not rerun them
EXTERNAL_ZERO_SHOT = {name: zero_shot_entry(e) for name, e in EXTERNAL_CFG.items()}


def external_entry_for_adapt(wildcards):
    """The entry an evaluation reads: all of it for a few-shot row, else its zero-shot part."""
    if wildcards.adapt == "shots":
        return EXTERNAL_CFG[wildcards.ext]
    return EXTERNAL_ZERO_SHOT[wildcards.ext]


ADAPT = ["none", "bn"] if config["evaluation"]["adapt_batchnorm"] else ["none"]


def has_batchnorm(backbone):
    return not any(part in NO_BATCHNORM for part in catalog.parts(backbone))


def _adaptations(run, ext):
    """How ``run`` is scored on ``ext``: as it is, BatchNorm-adapted, few-shot refitted."""
    adapts = [a for a in ADAPT if a == "none" or has_batchnorm(run.backbone)]
    if ext.train_per_class and run.strategy in SHOT_STRATEGIES:
        adapts.append("shots")
    return adapts


def external_runs():
    """(run, external set, adaptation) triples: every trained run on every set it scores."""
    return [
        (run, name, adapt)
        for run in RUNS
        for name, ext in EXTERNAL.items()
        if ext.evaluates(run.task)
        for adapt in _adaptations(run, ext)
    ]


def export_preprocessing_files(wildcards):
    """The fitted states of the task's variants (the bundle records its run's)."""
    return sorted(
        {
            paths.prep_state(R, fitted_name(run.prep, run.fold))
            for run in _task_runs(wildcards)
            if PREP[run.prep].fitted
        }
    )


def external_source(wildcards):
    """The external set's class folder or manifest (the demo's is generated)."""
    source = EXTERNAL[wildcards.ext].source
    if source == "demo":
        return f"{R}/demo_external/manifest.csv"
    if not os.path.exists(source):
        raise WorkflowError(
            f"evaluation.external {wildcards.ext!r}: source {source!r} does not exist "
            f"(relative to {os.getcwd()})"
        )
    return source


def external_feature_dirs(wildcards, adapt=None):
    """External features an SVM run reads: the backbone parts', or its fine-tuned network's
    (``adapt``: which features, default the job's own adaptation)."""
    prep = paths.prep_name(wildcards.prep)
    return external_svm_feature_dirs(
        R,
        wildcards.svm_strategy,
        wildcards.task,
        wildcards.backbone,
        wildcards.fold,
        wildcards.ext,
        adapt or wildcards.adapt,
        prep,
        frozen_prep=fitted_name(prep, wildcards.fold),
    )


def unadapted_external_feature_dirs(wildcards):
    """The external features a few-shot run trains and predicts on: the unadapted ones."""
    return external_feature_dirs(wildcards, adapt="none")


def external_finetune_feature_dirs(wildcards):
    """Frozen external features the fine-tuned head reads (paper policy), else nothing."""
    if _finetune_feature_dirs(config, wildcards.backbone):
        prep = fitted_name(paths.prep_name(wildcards.prep), wildcards.fold)
        return [
            paths.external_features_dir(R, wildcards.ext, wildcards.adapt, part, prep)
            for part in catalog.parts(wildcards.backbone)
        ]
    return []


def _external_run_files(name, task, ext=None, paired=False):
    """``name`` of every run of ``task`` on every external set that scores it (or on ``ext``
    only), adapted rows included, in one order for metrics and predictions: they pair up.
    ``paired``: only the rows scored on all of the set's cells (few-shot rows are scored on
    the cells they did not train on, so they cannot be paired with the others).
    """
    return [
        paths.external_run_file(
            R,
            name,
            run.task,
            run.strategy,
            run.backbone,
            run.layer,
            run.fold,
            ext=run_ext,
            adapt=adapt,
            prep=run.prep,
        )
        for run, run_ext, adapt in external_runs()
        if run.task == task
        and ext in (None, run_ext)
        and not (paired and adapt == "shots")
    ]


def external_task_metrics(wildcards):
    return _external_run_files(paths.METRICS, wildcards.task)


def external_set_metrics(wildcards):
    return _external_run_files(
        paths.METRICS, wildcards.task, wildcards.ext, paired=True
    )


def external_set_predictions(wildcards):
    return _external_run_files(
        paths.PREDICTIONS, wildcards.task, wildcards.ext, paired=True
    )


def evaluate_external_inputs(wildcards):
    """A run's predictions on the set and on its internal test part; a few-shot run's are
    both the refitted model's, and the cells it trained on come with them."""
    prep = paths.prep_name(wildcards.prep)
    run = (wildcards.task, wildcards.strategy, wildcards.backbone, wildcards.layer)
    inputs = {
        "predictions": paths.external_run_file(
            R,
            paths.PREDICTIONS,
            *run,
            wildcards.fold,
            wildcards.ext,
            wildcards.adapt,
            prep,
        ),
        "internal": paths.run_file(R, paths.PREDICTIONS, *run, wildcards.fold, prep),
    }
    if wildcards.adapt == "shots":
        for key, name in (
            ("internal", paths.INTERNAL_PREDICTIONS),
            ("shots", paths.SHOTS),
        ):
            inputs[key] = paths.external_run_file(
                R, name, *run, wildcards.fold, wildcards.ext, "shots", prep
            )
    return inputs


def external_sets_of(task):
    """Names of the external sets that score ``task``."""
    return [name for name, ext in EXTERNAL.items() if ext.evaluates(task)]


def external_task_comparisons(wildcards):
    """The paired-comparison table of every external set that scores the task (in the order
    of external_sets_of)."""
    return [
        paths.comparisons_table(R, wildcards.task, name)
        for name in external_sets_of(wildcards.task)
    ]


def external_map_features(wildcards):
    """Every external set's (unadapted) features of a mapped backbone: drawn on its map."""
    return [
        paths.external_features_dir(
            R, name, "none", wildcards.backbone, paths.prep_name(wildcards.prep)
        )
        for name in EXTERNAL
    ]


def external_map_tables(wildcards):
    return [f"{paths.external_dir(R, name)}/validated.tsv" for name in EXTERNAL]


def external_targets():
    targets = []
    for task in TASKS:
        sets = external_sets_of(task)
        if sets:
            targets += [
                f"{R}/tables/{task}_external.csv",
                f"{R}/figures/{task}_external.png",
            ]
        for name in sets:
            targets += [
                paths.comparisons_table(R, task, name, fmt)
                for fmt in ("csv", "md", "tex")
            ]
            targets.append(paths.comparisons_figure(R, task, name))
    return targets
