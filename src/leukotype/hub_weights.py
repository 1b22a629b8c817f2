"""Staging timm's published weights (``weights: hub``) on a machine with internet.

A ``timm:<model>`` backbone with ``weights: hub`` reads the file
``<torch_home>/hub/checkpoints/timm/<model>.safetensors`` (:func:`leukotype.weights.hub_weights_path`,
the same torch_home rule as every other staged file). :func:`stage_hub_weights` puts it there:

1. the source is timm's own pretrained config of the model (``hf_hub_id`` and
   ``hf_hub_filename``, else ``url``), never a hand-written address;
2. the file is downloaded with huggingface_hub (``hf_hub_download``) or torch.hub, and its
   sha256 checked against the one the hub publishes (the LFS etag; torch.hub: the digest prefix
   in the file name);
3. it is read without executing code (:func:`leukotype.weights.load_state_dict`), written as a
   tensor-only safetensors file, loaded into the architecture exactly as extraction will load
   it (every tensor placed), and only then moved to its final path, next to a record
   (``<file>.json``: source, source sha256, sha256 of the staged file) that every load checks.

Compute jobs never call this module: they only read the staged file. DinoBloom has no hub
source here (its published weights are ``.pth`` files on Zenodo):
:func:`leukotype.weights.dinobloom_message` says what to download and how to configure it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from leukotype import catalog, weights
from leukotype.errors import LeukotypeError
from leukotype.io import write_json


@dataclass(frozen=True)
class HubSource:
    """Where timm's pretrained config says the weights of a model are published."""

    model: str
    repo_id: str | None = None  # Hugging Face hub repository
    filename: str | None = None
    revision: str | None = None
    url: str | None = None  # a plain download (older timm weights)

    def describe(self) -> str:
        if self.repo_id:
            at = f"@{self.revision}" if self.revision else ""
            return f"hf-hub:{self.repo_id}{at}/{self.filename}"
        return str(self.url)


#: A download: ``(source, folder) -> (downloaded file, published sha256 or None)``.
Downloader = Callable[[HubSource, Path], tuple[Path, "str | None"]]


def hub_source(backbone: str) -> HubSource:
    """The published weights of a ``timm:<model>`` backbone, from timm's pretrained config."""
    import timm.models

    from leukotype.timm_backbones import check_model_name

    info = catalog.get(backbone)
    if info.weights_by_hand:
        raise LeukotypeError(weights.dinobloom_message(backbone))
    if not info.has_hub_weights:
        raise LeukotypeError(
            f"backbone {backbone!r}: 'weights: hub' is for timm:<model> backbones only"
        )
    model = str(info.timm_model)
    check_model_name(model)
    cfg = timm.models.get_pretrained_cfg(model)
    if cfg is not None and cfg.hf_hub_id:
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        return HubSource(
            model, repo_id=repo_id, filename=cfg.hf_hub_filename or "model.safetensors",
            revision=revision or None,
        )
    if cfg is not None and cfg.url:
        return HubSource(model, url=cfg.url)
    raise LeukotypeError(
        f"timm has no published weights for {model!r} (its pretrained config names neither a "
        "hub id nor a URL); set weights to a staged file or to 'none'"
    )


def download(source: HubSource, folder: Path) -> tuple[Path, str | None]:
    """Download ``source`` into ``folder``; return the file and the sha256 the hub publishes."""
    if source.repo_id:
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

        assert source.filename is not None
        meta = get_hf_file_metadata(
            hf_hub_url(source.repo_id, source.filename, revision=source.revision)
        )
        etag = (meta.etag or "").strip('"').lower()
        published = etag if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag) else None
        path = hf_hub_download(
            source.repo_id, source.filename, revision=source.revision, cache_dir=folder
        )
        return Path(path), published
    import torch

    assert source.url is not None
    path = folder / Path(source.url).name
    prefix = weights.hash_prefix_from_filename(path.name)
    torch.hub.download_url_to_file(source.url, str(path), hash_prefix=prefix, progress=True)
    return path, prefix


def _recorded_ok(path: Path) -> bool:
    try:
        weights.verify_hub_record(path)
    except LeukotypeError:
        return False
    return True


def stage_hub_weights(
    backbone: str,
    torch_home: str | os.PathLike | None = None,
    downloader: Downloader | None = None,
) -> Path:
    """Put the published weights of ``backbone`` where ``weights: hub`` reads them; return it.

    Idempotent: a staged file that matches its record is kept. Nothing reaches the final path
    before it passed the published sha256 and loaded into the architecture.
    """
    from leukotype.backbones import build_model, get_spec

    source = hub_source(backbone)
    final = weights.hub_weights_path(backbone, torch_home)
    if final.is_file() and _recorded_ok(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".staging-") as tmp:
        try:
            raw, published = (downloader or download)(source, Path(tmp))
        except Exception as error:  # network, HTTP and hub errors alike
            raise LeukotypeError(
                f"cannot download {source.describe()} for backbone {backbone!r} ({error}). Run "
                f"this on a machine with internet access, or stage a file yourself and set "
                "weights to its path (with sha256)"
            ) from None
        source_sha256 = weights.file_sha256(raw)
        if published and source_sha256[: len(published)] != published:
            raise LeukotypeError(
                f"download of {source.describe()} for {backbone!r} failed its sha256 check: "
                f"published {published}, downloaded {source_sha256}; nothing was staged"
            )
        from safetensors.torch import save_file

        state = weights.load_state_dict(raw)  # refuses pickles: no code from the download runs
        converted = Path(tmp) / final.name
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(converted))
        build_model(get_spec(backbone), converted)  # every tensor placed, as extraction loads it
        record = {
            "backbone": backbone,
            "source": source.describe(),
            "source_sha256": source_sha256,
            "published_sha256": published,
            "sha256": weights.file_sha256(converted),
        }
        os.replace(converted, final)
        write_json(record, weights.hub_record_path(final))
    return final
