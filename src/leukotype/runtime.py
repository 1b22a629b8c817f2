"""How a torch job runs, shared by feature extraction and fine-tuning.

One place for: the device a setting names (:func:`resolve_device`), mixed precision
(:func:`autocast`), intra-op threads (:func:`torch_threads`), GPU determinism
(:func:`deterministic_algorithms`), and the dataset that decodes (image, transform) samples
(:class:`SampleDataset`) with the loader that feeds it in given batches (:func:`sample_loader`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from leukotype.augment import apply_transform, check_transform, is_colour_transform
from leukotype.errors import LeukotypeError
from leukotype.images import load_rgb

PRECISIONS = ("fp32", "bf16")

#: A batch of model input: one tensor, or one per part of a combined backbone.
Inputs = torch.Tensor | tuple[torch.Tensor, ...]


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; an unavailable cuda device is an error."""
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise LeukotypeError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LeukotypeError(
            f"device {device!r} requested but CUDA is not available on this machine; "
            "use device: auto or cpu"
        )
    return resolved


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for ``precision="bf16"``; nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch intra-op threads for the duration (0 leaves the current setting), restored after."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def deterministic_algorithms(device: torch.device) -> Iterator[None]:
    """On GPU: cuDNN benchmark off, deterministic kernels on (warn where none exists).

    Previous flags are restored afterwards. On CPU nothing changes: CPU kernels are already
    deterministic run to run.
    """
    cudnn = torch.backends.cudnn
    old = (
        cudnn.benchmark,
        cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    if device.type == "cuda":
        cudnn.benchmark, cudnn.deterministic = False, True
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = old[0], old[1]
        torch.use_deterministic_algorithms(old[2], warn_only=old[3])


def fork_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """Fork the global RNG (and the device's, on GPU): what runs inside leaves it untouched."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    return torch.random.fork_rng(devices=devices)


def to_device(x: Inputs, device: torch.device) -> Inputs:
    if isinstance(x, (tuple, list)):
        return tuple(t.to(device, non_blocking=True) for t in x)
    return x.to(device, non_blocking=True)


class SampleDataset(Dataset):
    """(image, transform) samples -> ``(normalised tensor, index)``.

    Decodes with :func:`leukotype.images.load_rgb`, applies the lossless transform to the
    full-resolution image (before any resize, so a rotation never interpolates), then
    ``preprocess``. ``prepare(image, abspath, transform)`` (a preprocessing variant:
    ``leukotype.preprocessing.ImagePreparer``) runs first, on the image as decoded; colour
    views (``colourK``) need it.
    """

    def __init__(
        self,
        abspaths: Sequence[str | os.PathLike],
        transforms: Sequence[str],
        preprocess: Callable[[Image.Image], torch.Tensor],
        prepare: Callable[[Image.Image, str, str], Image.Image] | None = None,
    ) -> None:
        if len(abspaths) != len(transforms):
            raise LeukotypeError(
                f"SampleDataset: {len(abspaths)} paths but {len(transforms)} transforms"
            )
        self.abspaths = [str(p) for p in abspaths]
        self.transforms = [check_transform(str(t)) for t in transforms]
        self.preprocess = preprocess
        self.prepare = prepare
        colour = sorted({t for t in self.transforms if is_colour_transform(t)})
        if colour and prepare is None:
            raise LeukotypeError(f"colour views {colour[:3]} need the preprocessing variant that draws them")

    def __len__(self) -> int:
        return len(self.abspaths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = load_rgb(self.abspaths[index])
        if self.prepare is not None:  # a preprocessing variant (leukotype.preprocessing)
            image = self.prepare(image, self.abspaths[index], self.transforms[index])
        image = apply_transform(image, self.transforms[index])
        return self.preprocess(image), index


def sequential_batches(n: int, batch_size: int) -> list[torch.Tensor]:
    """Indices ``0..n-1`` in order, cut into batches of ``batch_size`` (the last may be short)."""
    return list(torch.arange(n).split(batch_size))


def _worker_init(worker_id: int) -> None:
    # Decoding workers must not each grab every core for intra-op parallelism.
    torch.set_num_threads(1)


def sample_loader(
    data: Dataset,
    batches: Sequence[torch.Tensor],
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader yielding ``data``'s items collated in exactly ``batches`` (index tensors).

    It draws nothing from the global RNG (a private generator seeds the workers), so loading
    never shifts a caller's random stream (fine-tuning's dropout stream depends on that).
    """
    return DataLoader(
        data,
        batch_sampler=[b.tolist() for b in batches],
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(0),
    )
