"""Configuration: schema validation with helpful errors, and the study grid.

Torch- and pandas-free: Snakemake imports it while it parses the workflow. What a backbone is
comes from ``leukotype.catalog``, tasks from ``leukotype.tasks``, run paths from
``leukotype.paths``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leukotype import catalog, paths
from leukotype.errors import LeukotypeError
from leukotype.paths import STRATEGY_LAYER
from leukotype.tasks import Task, task_by_name, task_from_dict, tasks_from_config

__all__ = [  # tasks are re-exported: existing callers import them from here
    "Task", "task_by_name", "task_from_dict", "tasks_from_config", "STRATEGY_LAYER",
]

#: JSON schemas of the workflow (config and manifest). The workflow is used from its checkout
#: (the package is installed editable), so the schemas live where Snakemake users expect them.
SCHEMA_DIR = Path(__file__).resolve().parents[2] / "workflow" / "schemas"


# --------------------------------------------------------------------------------------------
# Schema validation

#: Layer names per named backbone (the last one is the penultimate layer, the head's input),
#: from the torch-free catalogue, so that config errors and Snakemake's DAG need no torch.
#: (Named entries with a fixed architecture; the timm family's layers: ``catalog.layers``.)
BACKBONE_LAYERS: dict[str, tuple[str, ...]] = {
    name: tuple(info.layers) for name, info in catalog.named().items() if info.family != "timm"
}
#: Backbones trained from scratch: no pretrained features to extract.
SCRATCH_BACKBONES = frozenset(name for name, info in catalog.named().items() if info.from_scratch)
STRATEGIES = ("features_svm", "finetune", "finetune_svm")


def load_schema(name: str = "config") -> dict[str, Any]:
    import json

    with open(SCHEMA_DIR / f"{name}.schema.json", encoding="utf-8") as handle:
        return json.load(handle)


def _extend_with_defaults(validator_class: Any) -> Any:
    """A validator that fills ``default`` values while validating (jsonschema FAQ recipe)."""
    from jsonschema import validators

    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator: Any, properties: Any, instance: Any, schema: Any) -> Any:
        if isinstance(instance, dict):
            for prop, subschema in properties.items():
                if "default" in subschema and prop not in instance:
                    import copy

                    instance[prop] = copy.deepcopy(subschema["default"])
                if "$ref" in subschema and prop not in instance and "default" in subschema:
                    instance[prop] = {}
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


def _format_error(error: Any) -> str:
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    where = where.lstrip(".") or "<top level>"
    if error.validator == "enum":
        return f"{where}: {error.instance!r} is not valid; choose one of {list(error.validator_value)}"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        return f"{where}: {error.message}; valid keys are {allowed}"
    return f"{where}: {error.message}"


def validate_with_schema(instance: Any, schema_name: str, fill_defaults: bool = True) -> Any:
    """Validate ``instance`` (filled with defaults in place) and raise one readable error."""
    from jsonschema import Draft202012Validator

    schema = load_schema(schema_name)
    cls = _extend_with_defaults(Draft202012Validator) if fill_defaults else Draft202012Validator
    errors = sorted(cls(schema).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        lines = "\n  ".join(_format_error(e) for e in errors[:10])
        raise LeukotypeError(f"invalid {schema_name} ({len(errors)} problem(s)):\n  {lines}")
    # The defaults-filling validator fills nested $ref objects only on a second pass.
    if fill_defaults:
        cls(schema).validate(instance)
    return instance


def _finetune_defaults(cfg: dict[str, Any]) -> None:
    schema = load_schema("config")["$defs"]["finetune"]["properties"]
    base = cfg.setdefault("finetune", {})
    for key, sub in schema.items():
        if "default" in sub:  # FINETUNE_LATER_DEFAULTS have none: a study's params stay as they were
            base.setdefault(key, sub["default"])


def validate_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Validate a config dict against the schema, fill defaults, and check cross-field rules."""
    validate_with_schema(cfg, "config")
    _finetune_defaults(cfg)
    problems: list[str] = []
    tasks = []
    for i, entry in enumerate(cfg["tasks"]):
        try:
            tasks.append(task_from_dict(entry))
        except LeukotypeError as err:
            problems.append(f"tasks[{i}]: {err}")
    names = [t["name"] for t in cfg["tasks"]]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"tasks: duplicate task names {duplicates}")
    seen_backbones: list[str] = []
    for i, model in enumerate(cfg["models"]):
        backbone = model["backbone"]
        if backbone in seen_backbones:
            problems.append(f"models[{i}]: backbone {backbone!r} is listed twice; merge the entries")
        seen_backbones.append(backbone)
        try:
            info = catalog.get(backbone)
        except LeukotypeError as err:
            problems.append(
                f"models[{i}].backbone: {backbone!r} is not valid; choose one of "
                f"{catalog.valid_names()} ({err})"
            )
            continue
        valid_layers = list(info.layers)
        layers = model.setdefault("layers", [info.default_layer])
        bad = [layer for layer in layers if layer not in valid_layers]
        if bad:
            problems.append(
                f"models[{i}].layers: {bad} not available for {backbone}; choose from "
                f"{valid_layers}"
            )
        if info.from_scratch:
            if "features_svm" in model["strategies"]:
                problems.append(
                    f"models[{i}]: {backbone} is trained from scratch; use strategies "
                    "finetune / finetune_svm, not features_svm"
                )
            if model.setdefault("weights", "none") != "none":
                problems.append(f"models[{i}]: {backbone} has no pretrained weights; set weights: none")
            model["weights"] = "none"
            model.setdefault("finetune", {}).setdefault("policy", catalog.valid_policies(backbone)[0])
        model.setdefault("weights", "imagenet")
        if "finetune_svm" in model["strategies"] and "finetune" not in model["strategies"]:
            # finetune_svm reads the fine-tuned network: the finetune run is needed anyway.
            model["strategies"] = [*model["strategies"], "finetune"]
        if "finetune" in model["strategies"]:
            policy = finetune_settings(cfg, backbone)["policy"]
            allowed = catalog.valid_policies(backbone)
            if policy not in allowed:
                problems.append(
                    f"models[{i}].finetune.policy: {backbone} cannot be fine-tuned with policy "
                    f"{policy!r}; valid policies for it: {list(allowed)}"
                )
    if not problems:
        problems += _weights_problems(cfg) + _timm_problems(cfg)
    from leukotype.baselines import check_baselines

    problems += check_baselines(cfg)
    from leukotype.external import check_external_config

    problems += check_external_config(cfg)
    from leukotype.preprocessing import check_preprocessing_config

    problems += check_preprocessing_config(cfg)
    if problems:
        raise LeukotypeError("invalid config:\n  " + "\n  ".join(problems))
    _sort_keys_in_place(cfg)
    return cfg


def _weights_problems(cfg: Mapping[str, Any]) -> list[str]:
    """Every single backbone's effective weights setting must be one it can load."""
    from leukotype.weights import dinobloom_message

    problems = []
    for i, model in enumerate(cfg["models"]):
        for part in catalog.parts(model["backbone"]):
            weights, _ = weights_setting(cfg, part)
            whose = "" if part == model["backbone"] else f" (part {part} of {model['backbone']})"
            info = catalog.get(part)
            # DinoBloom's weights are files from Zenodo: say which and how to configure them
            by_hand = f". {dinobloom_message(part)}" if info.weights_by_hand else ""
            if weights == "hub" and not info.has_hub_weights:
                problems.append(
                    f"models[{i}].weights: {part}{whose}: 'hub' (timm's published weights) is "
                    f"for timm:<model> backbones only{by_hand}"
                )
            elif weights == "imagenet" and not info.has_imagenet_weights:
                hub = "'hub' (timm's published weights, staged by fetch_weights), " if info.has_hub_weights else ""
                problems.append(
                    f"models[{i}].weights: {part}{whose} has no ImageNet weights here; set "
                    f"weights to {hub}a staged state-dict file (safetensors or tensor-only .pth, pin "
                    "it with sha256) or to 'none' (random init); a combination's part can have "
                    f"its own models entry with its own weights{by_hand}"
                )
    return problems


def _timm_problems(cfg: Mapping[str, Any]) -> list[str]:
    """timm architecture names exist (imports timm, so only when a config names one)."""
    problems = []
    for i, model in enumerate(cfg["models"]):
        for part in catalog.parts(model["backbone"]):
            info = catalog.get(part)
            if info.family == "timm":
                from leukotype.timm_backbones import check_model_name

                try:
                    check_model_name(str(info.timm_model))
                except LeukotypeError as err:
                    problems.append(f"models[{i}].backbone: {part!r}: {err}")
    return problems


def _sort_keys_in_place(obj: Any) -> None:
    """Order every mapping's keys canonically (in place: Snakemake holds the config object).

    Snakemake compares a rule's params by their text, so reordering keys in a config file must
    not look like a change and rerun jobs.
    """
    if isinstance(obj, dict):
        items = sorted(obj.items(), key=lambda kv: str(kv[0]))
        obj.clear()
        obj.update(items)
        for value in obj.values():
            _sort_keys_in_place(value)
    elif isinstance(obj, list):
        for value in obj:
            _sort_keys_in_place(value)


def load_config(path: str | Path) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as handle:
        cfg = yaml.safe_load(handle)
    if not isinstance(cfg, dict):
        raise LeukotypeError(f"{path}: expected a mapping at the top level")
    return validate_config(cfg)


def model_config(cfg: Mapping[str, Any], backbone: str) -> dict[str, Any]:
    for model in cfg["models"]:
        if model["backbone"] == backbone:
            return dict(model)
    raise LeukotypeError(
        f"backbone {backbone!r} is not configured; configured: {[m['backbone'] for m in cfg['models']]}"
    )


def finetune_settings(cfg: Mapping[str, Any], backbone: str) -> dict[str, Any]:
    """Global fine-tuning settings with the model's own overrides on top."""
    settings = dict(cfg["finetune"])
    settings.update(model_config(cfg, backbone).get("finetune", {}))
    return settings


#: Settings that change how a job runs but not its result. Rules keep them out of their params
#: (Snakemake reruns a job whose params change, so moving a run to a GPU or changing a batch
#: size of inference must not show there); jobs read them from the config. Every other setting
#: changes results and is a param.
FEATURES_EXECUTION_FIELDS = ("batch_size", "device", "num_workers", "optimize")
FINETUNE_EXECUTION_FIELDS = ("device", "num_workers", "threads", "fast_path", "fast_path_memory_mb")
#: Result settings added after studies were run, left out of the rule's params and the
#: checkpoint fingerprint at these values (their behaviour before they existed), so that such a
#: study neither reruns nor loses its checkpoints; another value is a change like any other.
FINETUNE_LATER_DEFAULTS = {"head_init": "random"}


def finetune_result_settings(cfg: Mapping[str, Any], backbone: str) -> dict[str, Any]:
    """The fine-tuning settings that change the trained model (the rule's params)."""
    settings = finetune_settings(cfg, backbone)
    return without_later_defaults(
        {k: v for k, v in settings.items() if k not in FINETUNE_EXECUTION_FIELDS}
    )


def without_later_defaults(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` without the ``FINETUNE_LATER_DEFAULTS`` that are at their default."""
    return {
        k: v
        for k, v in settings.items()
        if not (k in FINETUNE_LATER_DEFAULTS and v == FINETUNE_LATER_DEFAULTS[k])
    }


def finetune_execution_settings(cfg: Mapping[str, Any], backbone: str) -> dict[str, Any]:
    """The fine-tuning settings that only change how the job runs (read by the job itself)."""
    settings = finetune_settings(cfg, backbone)
    return {k: v for k, v in settings.items() if k in FINETUNE_EXECUTION_FIELDS}


def features_result_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``features`` settings that change extracted values (the extraction rule's params)."""
    return {k: v for k, v in cfg["features"].items() if k not in FEATURES_EXECUTION_FIELDS}


# --------------------------------------------------------------------------------------------
# The study grid: the one place that enumerates models x strategies x tasks x folds


@dataclass(frozen=True)
class Run:
    task: str
    strategy: str
    backbone: str
    layer: str
    fold: str
    #: preprocessing variant (leukotype.preprocessing); ``none``: the images as they are
    prep: str = paths.NO_PREP

    @property
    def path(self) -> str:
        """Run folder relative to the results folder."""
        return paths.run_dir("", self.task, self.strategy, self.backbone, self.layer, self.fold, self.prep)

    @classmethod
    def from_path(cls, path: str) -> Run:
        """The run of a folder ``runs/<task>/<strategy>/<backbone>[@<variant>]/<layer>/<fold>``
        (the inverse of :attr:`path`)."""
        parts = path.strip("/").split("/")
        if len(parts) != 6 or parts[0] != "runs":
            raise LeukotypeError(f"run {path!r}: expected runs/<task>/<strategy>/<backbone>[@<variant>]/<layer>/<fold>")
        backbone, _, variant = parts[3].partition(paths.PREP_SEPARATOR)
        return cls(parts[1], parts[2], backbone, parts[4], parts[5], variant or paths.NO_PREP)


def study_runs(cfg: Mapping[str, Any]) -> list[Run]:
    from leukotype.split import fold_ids  # lazily: split needs pandas, a config does not

    runs = []
    for task in cfg["tasks"]:
        for model in cfg["models"]:
            for strategy in model["strategies"]:
                layers = model["layers"] if strategy == "features_svm" else [STRATEGY_LAYER[strategy]]
                for layer in layers:
                    for fold in fold_ids(cfg["split"]):
                        for prep in preprocessing_names(cfg):
                            runs.append(Run(task["name"], strategy, model["backbone"], layer, fold, prep))
    return runs


def preprocessing_names(cfg: Mapping[str, Any]) -> list[str]:
    """The configured preprocessing variants, in config order (``none`` when there are none)."""
    return [str(entry["name"]) for entry in cfg.get("preprocessing") or [{"name": paths.NO_PREP}]]


def penultimate_layer(backbone: str) -> str:
    return catalog.penultimate_layer(backbone)


def finetune_reuses_features(cfg: Mapping[str, Any], backbone: str) -> bool:
    """Whether fine-tuning can train on the cached features instead of running the backbone.

    With the paper's policy (every pretrained layer frozen) the fast path's frozen activations
    are exactly the extracted penultimate features (same weights, preprocessing and precision),
    so the head trains on them and no image passes through the backbone a second time.
    """
    model = model_config(cfg, backbone)
    settings = finetune_settings(cfg, backbone)
    return (
        "finetune" in model["strategies"]
        and not catalog.is_from_scratch(backbone)
        and settings["policy"] == "head"
        and settings["fast_path"]
        and settings["precision"] == cfg["features"]["precision"]
    )


def extraction_backbones(cfg: Mapping[str, Any]) -> dict[str, list[str]]:
    """Backbones whose features are extracted, with the union of layers every run needs.

    A combined backbone is never extracted itself: its parts are, once, and shared.
    """
    needed: dict[str, list[str]] = {}
    for model in cfg["models"]:
        pairs: list[tuple[str, str]] = []
        if "features_svm" in model["strategies"]:
            for layer in model["layers"]:
                pairs += catalog.part_layers(model["backbone"], layer)
        if finetune_reuses_features(cfg, model["backbone"]):
            pairs += [(part, penultimate_layer(part)) for part in catalog.parts(model["backbone"])]
        for part, layer in pairs:
            bucket = needed.setdefault(part, [])
            if layer not in bucket:
                bucket.append(layer)
    return needed


def weights_setting(cfg: Mapping[str, Any], backbone: str) -> tuple[str, str | None]:
    """(weights, sha256) for a backbone: its own models entry's, else (a part of a combined
    backbone) the first combination's that contains it."""
    candidates = [m for m in cfg["models"] if m["backbone"] == backbone]
    candidates += [m for m in cfg["models"] if backbone in catalog.parts(m["backbone"])]
    for model in candidates:
        return model.get("weights", "imagenet"), model.get("sha256")
    raise LeukotypeError(f"backbone {backbone!r} is not configured")


# --------------------------------------------------------------------------------------------
# What each job reads: the input functions of the rule files (and the benchmarks' stand-in)


def weight_files(cfg: Mapping[str, Any], backbone: str) -> list[str]:
    """Weight files an extraction or fine-tuning job of ``backbone`` reads (one per part)."""
    from leukotype.weights import expected_weights_path

    files = []
    for part in catalog.parts(backbone):
        weights, _ = weights_setting(cfg, part)
        path = expected_weights_path(part, weights, cfg["torch_home"])
        if path is not None:
            files.append(str(path))
    return files


def staged_weights(cfg: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(backbone, weights)`` settings `fetch_weights` downloads: torchvision ImageNet files
    and timm's published (``hub``) weights of the backbones the jobs read."""
    from leukotype.weights import downloadable

    backbones = set(extraction_backbones(cfg)) | {
        m["backbone"] for m in cfg["models"] if "finetune" in m["strategies"]
    }
    settings: set[tuple[str, str]] = set()
    for backbone in backbones:
        for part in catalog.parts(backbone):
            weights = weights_setting(cfg, part)[0]
            if (weights == "imagenet" and downloadable(part)) or weights == "hub":
                settings.add((part, weights))
    return sorted(settings)


def staged_weight_files(cfg: Mapping[str, Any]) -> list[str]:
    """The weight files `fetch_weights` downloads (see :func:`staged_weights`)."""
    return sorted({f for part, _ in staged_weights(cfg) for f in weight_files(cfg, part)})


def svm_feature_dirs(
    results: str, strategy: str, task: str, backbone: str, fold: str, prep: str = paths.NO_PREP,
    frozen_prep: str | None = None,
) -> list[str]:
    """Feature folders an SVM run reads: the backbone's parts (extracted under ``frozen_prep``,
    :func:`frozen_features_prep`; default ``prep``), or the fine-tuned network's."""
    if strategy == "features_svm":
        return [paths.features_dir(results, part, frozen_prep or prep) for part in catalog.parts(backbone)]
    return [paths.finetuned_features_dir(results, task, backbone, fold, prep)]


def frozen_features_prep(cfg: Mapping[str, Any], prep: str, fold: str) -> str:
    """The variant name under which a run's (``prep``, ``fold``) frozen features and fitted
    state live: ``<prep>.<fold>`` for a variant fitted per fold, else ``prep``."""
    from leukotype.preprocessing import fitted_variant_name, per_fold_variants

    return fitted_variant_name(prep, fold, per_fold_variants(cfg))


def external_svm_feature_dirs(
    results: str, strategy: str, task: str, backbone: str, fold: str, ext: str, adapt: str, prep: str = paths.NO_PREP,
    frozen_prep: str | None = None,
) -> list[str]:
    """An external set's features an SVM run reads (as :func:`svm_feature_dirs` for the
    training data): the backbone parts' (under ``frozen_prep``), or those of the run's
    fine-tuned network."""
    if strategy == "features_svm":
        return [
            paths.external_features_dir(results, ext, adapt, part, frozen_prep or prep) for part in catalog.parts(backbone)
        ]
    return [
        paths.external_run_file(
            results, paths.FINETUNED_FEATURES, task, "finetune", backbone, paths.STRATEGY_LAYER["finetune"],
            fold, ext=ext, adapt=adapt, prep=prep,
        )
    ]


def svm_feature_layers(strategy: str, backbone: str, layer: str) -> list[str]:
    """The layer an SVM run reads in each of its :func:`svm_feature_dirs` (a combination reads
    each part's penultimate layer)."""
    if strategy == "features_svm":
        return [part_layer for _, part_layer in catalog.part_layers(backbone, layer)]
    return [layer]


def finetune_feature_dirs(cfg: Mapping[str, Any], backbone: str, prep: str = paths.NO_PREP) -> list[str]:
    """Cached backbone features the head trains on (paper policy, see
    :func:`finetune_reuses_features`), else nothing."""
    if finetune_reuses_features(cfg, backbone):
        return [paths.features_dir(cfg["results"], part, prep) for part in catalog.parts(backbone)]
    return []
