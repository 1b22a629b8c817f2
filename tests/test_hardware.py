"""Native bf16 detection and the precision a job really runs in (leukotype.hardware)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from leukotype import hardware
from leukotype.features import extract_features
from leukotype.metrics import fold_summary
from leukotype.report import PRECISION_COLUMN, paper_table

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_cpu_flags_are_read_from_cpuinfo():
    assert "avx512_bf16" in hardware.cpu_flags(ZEN4)
    assert "avx2" in hardware.cpu_flags(AVX2_ONLY) and "avx512_bf16" not in hardware.cpu_flags(AVX2_ONLY)
    assert "bf16" in hardware.cpu_flags(ARM)
    assert hardware.cpu_flags("") == frozenset()


@pytest.fixture
def cpu(monkeypatch):
    """Set the CPU flags that detection sees: cpu('avx2') etc."""

    def set_flags(text: str) -> None:
        monkeypatch.setattr(hardware, "_this_cpu_flags", lambda: hardware.cpu_flags(text))

    return set_flags


@pytest.mark.parametrize("cpuinfo, native", [(ZEN4, True), (ARM, True), (AVX2_ONLY, False)])
def test_bf16_runs_only_where_native(cpu, cpuinfo, native, caplog):
    cpu(cpuinfo)
    with caplog.at_level(logging.WARNING, logger="leukotype"):
        choice = hardware.resolve_precision("bf16", "cpu")
    assert choice.requested == "bf16"
    assert choice.effective == ("bf16" if native else "fp32")
    assert choice.substituted is (not native)
    if not native:
        assert "no native bf16" in choice.reason and "ran fp32" in choice.reason
        assert "set precision: fp32" in caplog.text
    assert hardware.resolve_precision("fp32", "cpu") == hardware.PrecisionChoice("fp32", "fp32")


def test_gpu_bf16_follows_the_device(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device", lambda index: __import__("contextlib").nullcontext())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    # A V100 "supports" bf16 only by emulation: detection must ask for native support.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    choice = hardware.resolve_precision("bf16", torch.device("cuda"))
    assert choice.effective == "fp32" and "Tesla V100 has no native bf16" in choice.reason
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert hardware.resolve_precision("bf16", torch.device("cuda")).effective == "bf16"


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> pd.DataFrame:
    folder = tmp_path_factory.mktemp("cells")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        path = folder / f"c{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        rows.append({"image_id": f"img{i:06d}", "abspath": str(path), "transform": "identity"})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("cpuinfo", [AVX2_ONLY, ZEN4])
def test_extraction_records_requested_and_effective_precision(cpu, cpuinfo, samples, tmp_path):
    cpu(cpuinfo)
    extract_features(samples, "paper_cnn", None, ["flatten"], tmp_path, precision="bf16", device="cpu", progress=False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["precision_requested"] == "bf16"
    if cpuinfo is AVX2_ONLY:
        assert meta["precision"] == "fp32"
        assert "no native bf16" in meta["precision_reason"]
        # fp32 really ran: the features equal a plain fp32 extraction's
        extract_features(samples, "paper_cnn", None, ["flatten"], tmp_path / "ref", device="cpu", progress=False)
        np.testing.assert_array_equal(np.load(tmp_path / "flatten.npy"), np.load(tmp_path / "ref" / "flatten.npy"))
        assert hardware.run_precision([tmp_path]) == "fp32 (bf16 requested)"
    else:
        assert meta["precision"] == "bf16" and meta["precision_reason"] == ""
        assert hardware.run_precision([tmp_path]) == "bf16"


def _record(model: str, precision: str) -> dict:
    return {
        "task": "t", "strategy": "features_svm", "model": model, "backbone": model, "layer": "pool",
        "fold": "holdout", "classes": ["a", "b"], "n_test": 4, "precision": precision,
        "metrics": {"accuracy": 0.5}, "ci": {"accuracy": [0.2, 0.8]},
    }


def test_tables_show_the_substitution():
    summary = fold_summary([_record("alexnet", "fp32 (bf16 requested)"), _record("vgg16", "bf16")])
    table = paper_table(summary, "t")
    assert dict(zip(table["Model"], table[PRECISION_COLUMN])) == {
        "AlexNet": "fp32 (bf16 requested)", "VGG16": "bf16"
    }
    plain = paper_table(fold_summary([_record("alexnet", "fp32")]), "t")
    assert PRECISION_COLUMN not in plain.columns  # the default table keeps its shape


@pytest.mark.parametrize("cpuinfo, effective", [(AVX2_ONLY, "fp32"), (ZEN4, "bf16")])
def test_finetuning_precision_follows_native_support(cpu, cpuinfo, effective):
    from leukotype.finetune import FinetuneConfig
    from leukotype.stages import _native_precision

    cpu(cpuinfo)
    choice = _native_precision(FinetuneConfig(precision="bf16", device="cpu"))
    assert (choice.requested, choice.effective) == ("bf16", effective)
