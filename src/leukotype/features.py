"""Streaming feature extraction into the format of :mod:`leukotype.feature_store`.

Extraction streams batches into ``numpy.lib.format.open_memmap`` files, so memory stays flat
however many samples there are, and every file appears under its final name only once the whole
extraction succeeded (temporary names, ``os.replace`` at the end).

Inference optimisation (:func:`optimize_for_inference`, on by default, ``optimize=False`` runs
the plain eager extractor): the extractor is traced with :mod:`torch.fx`, every BatchNorm that
directly follows a convolution is folded into it, and on CPU each ``nn.Conv2d`` becomes one
oneDNN call with prepacked weights that also applies the following ReLU, or the residual add
plus ReLU (ResNet). Features equal the eager model's up to float rounding (tests assert it).
In ``bf16`` precision the optimised model holds bf16 weights (no autocast re-casting them every
batch).
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import fx, nn
from torch.nn import functional as F

from leukotype.allocator import keep_freed_memory
from leukotype.backbones import (
    FeatureExtractor,
    build_model,
    get_spec,
    preprocess,
    resolve_layer,
)
from leukotype.errors import LeukotypeError
from leukotype.feature_store import SAMPLE_KEY, _index_table, canonical_samples
from leukotype.hardware import resolve_precision
from leukotype.io import atomic_path, provenance, write_json, write_tsv
from leukotype.runtime import (  # noqa: F401 - SampleDataset, resolve_device: public here too
    PRECISIONS,
    SampleDataset,
    autocast,
    resolve_device,
    sample_loader,
    sequential_batches,
    torch_threads,
)
from leukotype.weights import file_sha256


# --------------------------------------------------------------------------------------------
# Inference optimisation (see module doc)

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


class _ConvLeafTracer(fx.Tracer):
    """Keeps every ``nn.Conv2d`` (subclasses too, e.g. static-"same"-padding convs) a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, nn.Conv2d) or super().is_leaf_module(m, module_qualified_name)


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _call_sites(graph: fx.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1
    if node.op == "call_method":
        return node.target in ("relu", "relu_") and len(node.args) == 1 and not node.kwargs
    return False


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS and len(node.args) == 2 and not node.kwargs
    if node.op == "call_method":
        return node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs
    return False


def _fold_batchnorms(gm: fx.GraphModule) -> int:
    """Fold each eval-mode BatchNorm2d whose input is a conv used only by it (count folded)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    modules = dict(gm.named_modules())
    sites = _call_sites(gm.graph)
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        bn = modules[node.target]
        conv_node = node.args[0]
        if (
            type(bn) is not nn.BatchNorm2d
            or bn.training
            or bn.running_mean is None
            or not isinstance(conv_node, fx.Node)
            or conv_node.op != "call_module"
            or not isinstance(modules[conv_node.target], nn.Conv2d)
            or len(conv_node.users) != 1
            or sites[conv_node.target] != 1  # a conv module called twice cannot be folded
        ):
            continue
        fused = fuse_conv_bn_eval(modules[conv_node.target], bn)  # a copy: the model is intact
        _set_submodule(gm, conv_node.target, fused)
        modules[conv_node.target] = fused
        node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(node)
        folded += 1
    return folded


@functools.cache
def _onednn_conv_available(dtype: torch.dtype) -> bool:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops, "mkldnn")):
        return False
    try:
        torch.ops.mkldnn._convolution_pointwise.default  # noqa: B018 - presence check
        torch.ops.mkldnn._reorder_convolution_weight.default  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


class OneDNNConv2d(nn.Module):
    """``nn.Conv2d`` (+ optional ReLU, or + residual add and optional ReLU) as one oneDNN call.

    The weight is prepacked into oneDNN's blocked layout on the first CPU call (for that
    input shape, batch included; other shapes stay correct) and repacked whenever the weight
    changes dtype, device or storage. Off CPU, or for dtypes oneDNN does not take, it runs the
    same computation with ordinary ops. For inference only (no autograd through the packing).
    """

    def __init__(self, conv: nn.Conv2d, relu: bool, add: bool) -> None:
        super().__init__()
        if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(
            conv.padding, str
        ):
            raise ValueError("OneDNNConv2d takes a plain zero-padded nn.Conv2d")
        # Shares the conv's storage (no copy); the packed weight is oneDNN's own copy.
        self.register_buffer("weight", conv.weight.detach())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach())
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.relu, self.add = relu, add
        self._packed: torch.Tensor | None = None
        self._packed_key: tuple | None = None

    def extra_repr(self) -> str:
        w = self.weight
        return (
            f"{w.shape[1] * self.groups}, {w.shape[0]}, kernel_size={tuple(w.shape[2:])}, "
            f"stride={self.stride}, padding={self.padding}, relu={self.relu}, add={self.add}"
        )

    def _eager(self, x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                     self.groups)
        if other is not None:
            y = y + other
        return torch.relu(y) if self.relu else y

    def _out_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        k = self.weight.shape[2:]
        spatial = tuple(
            (x.shape[2 + i] + 2 * self.padding[i] - self.dilation[i] * (k[i] - 1) - 1)
            // self.stride[i] + 1
            for i in range(2)
        )
        return (x.shape[0], self.weight.shape[0], *spatial)

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight
        if (
            x.device.type != "cpu"
            or torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
            or x.dtype != w.dtype
            or x.dim() != 4
            or not _onednn_conv_available(w.dtype)
            or (self.bias is not None and self.bias.dtype != w.dtype)
            or (other is not None and (other.dtype != w.dtype or other.device != x.device
                                       or tuple(other.shape) != self._out_shape(x)))
        ):
            return self._eager(x, other)
        key = (w.dtype, w.data_ptr(), w._version)
        if self._packed is None or self._packed_key != key:
            self._packed = torch.ops.mkldnn._reorder_convolution_weight(
                w, self.padding, self.stride, self.dilation, self.groups, list(x.shape)
            )
            self._packed_key = key
        if other is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, self._packed, self.bias, self.padding, self.stride, self.dilation, self.groups,
                "relu" if self.relu else "none", [], "",
            )
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, self._packed, self.bias, self.padding, self.stride, self.dilation,
            self.groups, "add", None, "relu" if self.relu else None, [], "",
        )


def _fuse_onednn_convs(gm: fx.GraphModule) -> int:
    """Replace plain convs (+ReLU / +add(+ReLU)) by :class:`OneDNNConv2d` (count replaced)."""
    modules = dict(gm.named_modules())
    sites = _call_sites(gm.graph)
    replaced = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.kwargs or len(node.args) != 1:
            continue
        conv = modules[node.target]
        if (
            type(conv) is not nn.Conv2d
            or conv.padding_mode != "zeros"
            or isinstance(conv.padding, str)
            or sites[node.target] != 1
        ):
            continue
        tail, other, relu = node, None, False
        users = list(node.users)
        if len(users) == 1 and _is_add(users[0]) and users[0].args.count(node) == 1:
            add = users[0]
            candidate = add.args[1] if add.args[0] is node else add.args[0]
            if isinstance(candidate, fx.Node):
                tail, other = add, candidate
                users = list(add.users)
        if len(users) == 1 and _is_relu(users[0], modules):
            tail, relu = users[0], True
        with gm.graph.inserting_after(tail):
            args = (node.args[0],) if other is None else (node.args[0], other)
            new = gm.graph.call_module(node.target, args)
        tail.replace_all_uses_with(new)
        new_module = OneDNNConv2d(conv, relu=relu, add=other is not None)
        _set_submodule(gm, node.target, new_module)
        modules[node.target] = new_module
        # Erase the replaced chain (relu, add, conv), last first.
        chain = [node]
        if other is not None:
            chain.append(next(iter(node.users)))
        if relu:
            chain.append(tail)
        for old in reversed(chain):
            gm.graph.erase_node(old)
        replaced += 1
    return replaced


def optimize_for_inference(
    extractor: nn.Module, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """An inference-only version of ``extractor`` that computes the same outputs faster.

    BatchNorm folded into the preceding convolution (any device); on CPU, convolutions fused
    with their ReLU / residual add into prepacked oneDNN calls (:class:`OneDNNConv2d`). The
    result is in eval mode with ``dtype`` weights and must be called on ``device``, with input
    of ``dtype``. It shares the extractor's unfused modules (it may convert them to ``dtype``),
    so use it *instead of* the extractor. When tracing fails, the extractor itself (in eval
    mode, converted to ``dtype``) is returned, with a warning.
    """
    extractor = extractor.eval()
    device = torch.device(device)
    try:
        tracer = _ConvLeafTracer()
        graph = tracer.trace(extractor)
        gm = fx.GraphModule(tracer.root, graph, extractor.__class__.__name__)
        _fold_batchnorms(gm)
        gm = gm.to(dtype=dtype)
        if device.type == "cpu" and _onednn_conv_available(dtype):
            _fuse_onednn_convs(gm)
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
        return gm.eval()
    except Exception as error:  # noqa: BLE001 - any tracing failure falls back to eager
        warnings.warn(
            f"optimize_for_inference: running the eager extractor ({type(error).__name__}: "
            f"{error})",
            RuntimeWarning,
            stacklevel=2,
        )
        return extractor.to(dtype=dtype)


def _progress(total: int, enabled: bool, desc: str):  # -> tqdm
    from tqdm import tqdm

    # In a log file (not a TTY) a refresh every few seconds is plenty.
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit="img",
        file=sys.stderr,
        disable=not enabled,
        mininterval=0.5 if interactive else 10.0,
        dynamic_ncols=interactive,
    )


def extract_features(
    samples: pd.DataFrame,
    backbone: str,
    weights_path: str | os.PathLike | None,
    layers: Sequence[str],
    out_dir: str | os.PathLike,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str = "auto",
    threads: int = 1,
    precision: str = "fp32",
    progress: bool = True,
    seed: int = 0,
    optimize: bool = True,
    adapt_batchnorm: bool = False,
    prepare: Callable[[Any, str, str], Any] | None = None,
) -> None:
    """Extract ``layers`` of ``backbone`` for every sample into ``out_dir`` (see module doc).

    Args:
        samples: columns ``image_id, transform, abspath`` (others ignored).
        weights_path: resolved weights file (:func:`leukotype.weights.resolve_weights`) or None
            for random weights drawn from ``seed``.
        layers: feature layers, all computed in one forward pass per batch.
        device: ``auto`` (cuda if available), ``cpu``, ``cuda``, ``cuda:N``.
        threads: torch intra-op threads for this call (restored afterwards).
        precision: ``fp32`` or ``bf16`` (features are stored as float32 either way). With
            ``optimize`` the bf16 model holds bf16 weights, otherwise bf16 is autocast.
        optimize: run :func:`optimize_for_inference`'s version of the extractor (same features
            up to float rounding); False runs the plain eager extractor.
        adapt_batchnorm: first re-estimate every BatchNorm's statistics on these samples
            (unlabelled; :func:`leukotype.adaptation.adapt_batchnorm`), then extract.
        prepare: a preprocessing variant, ``(image, abspath, transform) -> image``
            (:class:`leukotype.preprocessing.ImagePreparer`), applied to every decoded image;
            its record goes into meta.json.
    """
    # Batches re-allocate the same activations: keep freed blocks instead of page-faulting
    # them in again every batch (a third of the job's CPU in sys otherwise; see allocator).
    keep_freed_memory()
    spec = get_spec(backbone)
    if spec.is_combined:
        raise LeukotypeError(
            f"backbone {backbone!r} is not extracted itself: extract {', '.join(spec.parts)} "
            "and load their folders together with load_features"
        )
    if precision not in PRECISIONS:
        raise LeukotypeError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if batch_size < 1:
        raise LeukotypeError(f"batch_size must be >= 1, got {batch_size}")
    layers = list(dict.fromkeys(resolve_layer(spec, layer) for layer in layers))
    if "abspath" not in samples.columns:
        raise LeukotypeError("sample table lacks column 'abspath' (absolute image paths)")
    table = canonical_samples(samples)
    if table.empty:
        raise LeukotypeError("no samples to extract features for")
    index = _index_table(table)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_device = resolve_device(device)
    precision_choice = resolve_precision(precision, torch_device)  # bf16 only where native
    precision = precision_choice.effective

    with torch_threads(max(1, int(threads))):
        model = build_model(spec, Path(weights_path) if weights_path else None, seed=seed)
        model = model.to(torch_device, memory_format=torch.channels_last)
        extractor = FeatureExtractor(spec, model, layers).eval()
        if adapt_batchnorm:
            from torch.utils.data import DataLoader

            from leukotype.adaptation import adapt_batchnorm as _adapt

            adapt_data = SampleDataset(table["abspath"].tolist(), table["transform"].tolist(), preprocess(spec), prepare)
            _adapt(extractor, DataLoader(adapt_data, batch_size=batch_size, num_workers=num_workers), torch_device)
        input_dtype = torch.float32
        if optimize:
            input_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            extractor = optimize_for_inference(extractor, torch_device, input_dtype)
        autocast_precision = "fp32" if optimize else precision
        dataset = SampleDataset(
            table["abspath"].tolist(), table["transform"].tolist(), preprocess(spec), prepare
        )
        n_rows = len(dataset)
        loader = sample_loader(
            dataset,
            sequential_batches(n_rows, batch_size),
            num_workers,
            pin_memory=torch_device.type == "cuda",
        )
        with contextlib.ExitStack() as finals:
            # Entered first, so replaced last: meta.json appears only when everything is there.
            meta_tmp = finals.enter_context(atomic_path(out_dir / "meta.json"))
            index_tmp = finals.enter_context(atomic_path(out_dir / "index.tsv"))
            matrices = {
                layer: np.lib.format.open_memmap(
                    finals.enter_context(atomic_path(out_dir / f"{layer}.npy")),
                    mode="w+",
                    dtype=np.float32,
                    shape=(n_rows, spec.layers[layer]),
                )
                for layer in layers
            }
            with _progress(n_rows, progress, f"{backbone} features") as bar, torch.inference_mode():
                for batch, rows in loader:
                    batch = batch.to(torch_device, non_blocking=True)
                    batch = batch.to(input_dtype).contiguous(memory_format=torch.channels_last)
                    with autocast(torch_device, autocast_precision):
                        outputs = extractor(batch)
                    rows = rows.numpy()
                    for layer, values in outputs.items():
                        values = values.float().cpu().numpy()
                        if not np.isfinite(values).all():
                            raise LeukotypeError(
                                f"{backbone} {layer}: non-finite features for samples "
                                f"{index.iloc[rows][SAMPLE_KEY].values.tolist()[:3]} "
                                f"(precision {precision}); try precision fp32"
                            )
                        matrices[layer][rows] = values
                    bar.update(len(rows))
            for matrix in matrices.values():
                matrix.flush()
            del matrices  # release the memmaps before the files are moved into place
            write_tsv(index, index_tmp)
            weights_file = Path(weights_path).resolve() if weights_path else None
            meta = {
                "backbone": backbone,
                "layers": layers,
                "dims": {layer: spec.layers[layer] for layer in layers},
                "n_rows": n_rows,
                "weights": {
                    "path": str(weights_file) if weights_file else None,
                    "sha256": file_sha256(weights_file) if weights_file else None,
                },
                "preprocess": {
                    "resize_size": spec.resize_size,
                    "input_size": spec.input_size,
                    "interpolation": spec.interpolation.value,
                    "mean": list(spec.mean),
                    "std": list(spec.std),
                },
                **precision_choice.meta(),
                "optimized": bool(optimize),
                "adapted_batchnorm": bool(adapt_batchnorm),
                "image_steps": prepare.record() if hasattr(prepare, "record") else None,
                "device": str(torch_device),
                "batch_size": batch_size,
                "provenance": provenance(seed=seed),
            }
            write_json(meta, meta_tmp)
