"""Configuration: schema validation with helpful errors, and the task definitions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leukotype.errors import LeukotypeError

if TYPE_CHECKING:  # pandas is not needed to read or validate a config (Snakemake parses it)
    import pandas as pd

#: JSON schemas of the workflow (config and manifest). The workflow is used from its checkout
#: (the package is installed editable), so the schemas live where Snakemake users expect them.
SCHEMA_DIR = Path(__file__).resolve().parents[2] / "workflow" / "schemas"


@dataclass(frozen=True)
class Task:
    """One classification task.

    ``column`` is the manifest column holding the source labels. A derived (coarser) task maps
    source labels to its own classes, e.g. lineage ``{ALL: [L1, L2], AML: [M2, M3, M5]}``.
    An empty label means "not labelled for this task": the image is left out of that task only.
    """

    name: str
    column: str
    classes: tuple[str, ...]
    derive: Mapping[str, tuple[str, ...]] | None = field(default=None)

    @property
    def source_classes(self) -> tuple[str, ...]:
        """Labels allowed in ``column``."""
        if self.derive is None:
            return self.classes
        return tuple(label for cls in self.classes for label in self.derive[cls])

    def to_task_labels(self, source: pd.Series) -> pd.Series:
        """Map source labels to this task's classes (empty stays empty)."""
        source = source.fillna("").astype(str)
        if self.derive is None:
            return source
        lookup = {label: cls for cls, labels in self.derive.items() for label in labels}
        return source.map(lambda value: lookup.get(value, "" if value == "" else value))


def task_from_dict(entry: Mapping[str, Any]) -> Task:
    derive = entry.get("derive")
    classes = tuple(str(c) for c in entry["classes"])
    if derive is not None:
        derive = {str(k): tuple(str(v) for v in vals) for k, vals in derive.items()}
        missing = sorted(set(classes) - set(derive))
        extra = sorted(set(derive) - set(classes))
        if missing or extra:
            raise LeukotypeError(
                f"task {entry['name']!r}: 'derive' must map every class in 'classes' exactly "
                f"once; missing {missing}, unknown {extra}"
            )
    return Task(
        name=str(entry["name"]),
        column=str(entry.get("column", "label")),
        classes=classes,
        derive=derive,
    )


def tasks_from_config(cfg: Mapping[str, Any]) -> list[Task]:
    return [task_from_dict(entry) for entry in cfg["tasks"]]


def task_by_name(tasks: Sequence[Task], name: str) -> Task:
    for task in tasks:
        if task.name == name:
            return task
    raise LeukotypeError(f"unknown task {name!r}; configured tasks: {[t.name for t in tasks]}")


# --------------------------------------------------------------------------------------------
# Schema validation

#: Layer names per backbone, mirrored from the registry so that config errors (and Snakemake's DAG
#: building) need no torch import; the last one is the penultimate layer, the head's input.
#: ``tests/test_config.py`` asserts this stays equal to ``leukotype.backbones.BACKBONES``.
BACKBONE_LAYERS: dict[str, tuple[str, ...]] = {
    "alexnet": ("fc6", "fc7"),
    "vgg16": ("fc6", "fc7"),
    "inception_v3": ("pool",),
    "resnet101": ("pool",),
    "inception_v3+resnet101": ("pool",),
    "efficientnet_lite0": ("pool",),
    "paper_cnn": ("flatten",),
}
#: Backbones trained from scratch: no pretrained features to extract.
SCRATCH_BACKBONES = frozenset({"paper_cnn"})
STRATEGIES = ("features_svm", "finetune", "finetune_svm")
#: Layer folder used in run paths for the strategies that do not read a backbone layer.
STRATEGY_LAYER = {"finetune": "softmax", "finetune_svm": "finetuned"}


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
        valid_layers = BACKBONE_LAYERS[backbone]
        layers = model.setdefault("layers", [valid_layers[0]])
        bad = [layer for layer in layers if layer not in valid_layers]
        if bad:
            problems.append(
                f"models[{i}].layers: {bad} not available for {backbone}; choose from "
                f"{list(valid_layers)}"
            )
        if backbone in SCRATCH_BACKBONES:
            if "features_svm" in model["strategies"]:
                problems.append(
                    f"models[{i}]: {backbone} is trained from scratch; use strategies "
                    "finetune / finetune_svm, not features_svm"
                )
            if model.setdefault("weights", "none") != "none":
                problems.append(f"models[{i}]: {backbone} has no pretrained weights; set weights: none")
            model["weights"] = "none"
            model.setdefault("finetune", {}).setdefault("policy", "all")
        model.setdefault("weights", "imagenet")
        if "finetune_svm" in model["strategies"] and "finetune" not in model["strategies"]:
            # finetune_svm reads the fine-tuned network: the finetune run is needed anyway.
            model["strategies"] = [*model["strategies"], "finetune"]
    if problems:
        raise LeukotypeError("invalid config:\n  " + "\n  ".join(problems))
    _sort_keys_in_place(cfg)
    return cfg


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


# --------------------------------------------------------------------------------------------
# The study grid: the one place that enumerates models x strategies x tasks x folds


@dataclass(frozen=True)
class Run:
    task: str
    strategy: str
    backbone: str
    layer: str
    fold: str

    @property
    def path(self) -> str:
        """Run folder relative to the results folder."""
        return f"runs/{self.task}/{self.strategy}/{self.backbone}/{self.layer}/{self.fold}"


def study_runs(cfg: Mapping[str, Any]) -> list[Run]:
    from leukotype.split import fold_ids  # split imports Task from here

    runs = []
    for task in cfg["tasks"]:
        for model in cfg["models"]:
            for strategy in model["strategies"]:
                layers = model["layers"] if strategy == "features_svm" else [STRATEGY_LAYER[strategy]]
                for layer in layers:
                    for fold in fold_ids(cfg["split"]):
                        runs.append(Run(task["name"], strategy, model["backbone"], layer, fold))
    return runs


def penultimate_layer(backbone: str) -> str:
    return BACKBONE_LAYERS[backbone][-1]


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
        and backbone not in SCRATCH_BACKBONES
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
        parts = model["backbone"].split("+")
        for part in parts:
            layers = []
            if "features_svm" in model["strategies"]:
                layers += model["layers"] if len(parts) == 1 else [penultimate_layer(part)]
            if finetune_reuses_features(cfg, model["backbone"]):
                layers.append(penultimate_layer(part))
            if layers:
                bucket = needed.setdefault(part, [])
                bucket.extend(layer for layer in layers if layer not in bucket)
    return needed


def weights_setting(cfg: Mapping[str, Any], backbone: str) -> tuple[str, str | None]:
    """(weights, sha256) for a backbone; a part of a combined backbone inherits its settings."""
    for model in cfg["models"]:
        if model["backbone"] == backbone or backbone in model["backbone"].split("+"):
            return model.get("weights", "imagenet"), model.get("sha256")
    raise LeukotypeError(f"backbone {backbone!r} is not configured")
