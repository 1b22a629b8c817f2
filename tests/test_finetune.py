"""Fine-tuning: freeze policies, fast path == ordinary path, exact resume, early stopping,
class weights, a learnable toy problem, and the output helpers."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from leukotype.errors import LeukotypeError
from leukotype.finetune import (
    CHECKPOINT_NAME,
    HISTORY_COLUMNS,
    FinetuneConfig,
    FinetuneModel,
    ParallelTrunks,
    Samples,
    check_policy,
    class_weights,
    epoch_batches,
    fit,
    load_finetuned,
    lr_at,
    predict_proba,
    save_finetuned,
    seeded_head,
    split_stages,
    valid_policies,
)

N_CLASSES = 3


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on the shared 2-core machine two threads oversubscribe badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------ toy problem


class TensorSamples(Dataset):
    """In-memory stand-in for features.SampleDataset: yields (tensor, index)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.x[index], index


def toy_data(n: int, seed: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c = the colour channel that is brighter (learnable, noisy)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % N_CLASSES
    x = torch.randn(n, 3, size, size, generator=g) * 0.8
    x[torch.arange(n), labels] += 0.6
    return x, labels


def toy_stages(seed: int = 0) -> list[nn.Module]:
    """Two stages like a real backbone: conv+BN, then conv+dropout+pool+flatten -> (N, 8)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [
            nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()),
            nn.Sequential(
                nn.Conv2d(6, 8, 3, padding=1),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.Dropout(0.3),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            ),
        ]


def toy_model(policy: str, seed: int = 0) -> FinetuneModel:
    frozen, trainable = split_stages(toy_stages(seed), policy)
    return FinetuneModel(frozen, trainable, seeded_head(8, N_CLASSES, seed))


def cfg(**overrides) -> FinetuneConfig:
    base = dict(epochs=3, batch_size=8, lr=0.05, seed=3, device="cpu", threads=1)
    base.update(overrides)
    return FinetuneConfig(**base)


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def strip_seconds(history: pd.DataFrame) -> pd.DataFrame:
    return history.drop(columns="seconds")


# ------------------------------------------------------------------------------ policies


@pytest.mark.parametrize(
    ("policy", "frozen_tensors", "trainable_tensors"),
    [
        ("head", 8, 0),
        ("last_block", 4, 4),
        ("all", 0, 8),
    ],
)
def test_split_stages_freezes_exactly_the_policy(policy, frozen_tensors, trainable_tensors) -> None:
    model = toy_model(policy)
    n_frozen = sum(1 for p in model.frozen.parameters() if not p.requires_grad)
    assert n_frozen == len(list(model.frozen.parameters())) == frozen_tensors
    assert sum(1 for p in model.trainable.parameters() if p.requires_grad) == trainable_tensors
    # the head (weight + bias) always trains
    assert len(model.trainable_parameters()) == trainable_tensors + 2
    # frozen part stays in eval mode (BatchNorm keeps its statistics) even after .train()
    model.train()
    assert all(not m.training for m in model.frozen.modules())
    assert all(m.training for m in model.trainable.modules())


def test_frozen_batchnorm_statistics_do_not_move_in_training(tmp_path: Path) -> None:
    model = toy_model("last_block")
    bn = model.frozen[0][1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.weight.clone())
    x, y = toy_data(24, seed=1)
    fit(model, TensorSamples(x), y, cfg(epochs=2, fast_path=False))
    assert all(
        torch.equal(a, b) for a, b in zip(before, (bn.running_mean, bn.running_var, bn.weight))
    )
    trained_bn = model.trainable[0][1]
    assert not torch.equal(trained_bn.running_mean, torch.zeros(8))


def test_split_stages_rejects_bad_policies() -> None:
    with pytest.raises(LeukotypeError, match=r"choose one of \['head', 'last_block', 'all'\]"):
        split_stages(toy_stages(), "everything")
    with pytest.raises(LeukotypeError, match="at least two stages"):
        split_stages(toy_stages()[:1], "last_block")
    with pytest.raises(LeukotypeError, match="no stages"):
        split_stages([], "head")


def test_policy_validity_per_backbone() -> None:
    assert valid_policies("paper_cnn") == ("all",)
    assert valid_policies("inception_v3+resnet101") == ("head",)
    assert valid_policies("resnet101") == ("head", "last_block", "all")
    with pytest.raises(LeukotypeError, match=r"valid policies: \['all'\]"):
        check_policy("paper_cnn", "head")
    with pytest.raises(LeukotypeError, match=r"valid policies: \['head'\]"):
        check_policy("inception_v3+resnet101", "last_block")


def test_config_validation_and_unknown_keys() -> None:
    with pytest.raises(LeukotypeError, match="schedule 'step'"):
        FinetuneConfig(schedule="step")
    with pytest.raises(LeukotypeError, match=r"unknown finetune option\(s\) \['lr_decay'\]"):
        FinetuneConfig.from_mapping({"lr_decay": 0.1})
    assert FinetuneConfig.from_mapping({"epochs": 2}).epochs == 2
    # execution-only settings do not change what a checkpoint must match
    a, b = FinetuneConfig(), FinetuneConfig(device="cuda", fast_path=False, threads=8)
    assert a.result_fields() == b.result_fields()
    assert a.result_fields() != FinetuneConfig(lr=0.01).result_fields()
    # head_init: a choice; at its default it is not in the fingerprint (earlier checkpoints stay valid)
    with pytest.raises(LeukotypeError, match=r"head_init 'linear' is not valid; choose one of \['random', 'probe'\]"):
        FinetuneConfig(head_init="linear")
    assert "head_init" not in a.result_fields()
    assert FinetuneConfig(head_init="probe").result_fields()["head_init"] == "probe"


@pytest.mark.parametrize("n_classes", [2, 4])
def test_probe_head_is_the_logistic_regression_on_raw_features(n_classes: int) -> None:
    """The head's softmax equals the probe's predict_proba on the raw (unscaled) features, for
    a binary probe (one coefficient row) too; a class absent from the labels keeps its row."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from leukotype.finetune.probe import PROBE_C, probe_head

    rng = np.random.default_rng(0)
    y = np.arange(120) % n_classes
    x = rng.normal(size=(120, 6)) * [1, 5, 0.2, 3, 1, 10] + 40 + np.eye(6)[y % 6] * 2
    model = FinetuneModel(nn.Identity(), nn.Sequential(), seeded_head(6, n_classes + 1, seed=1))
    untouched = model.head.weight[n_classes].detach().clone(), float(model.head.bias[n_classes].detach())
    record = probe_head(model, x, y, seed=0)
    scaler = StandardScaler().fit(x)
    reference = LogisticRegression(C=PROBE_C, max_iter=2000).fit(scaler.transform(x), y)
    with torch.no_grad():
        logits = model.head(torch.as_tensor(x, dtype=torch.float32)).double()
    probabilities = torch.softmax(logits[:, :n_classes], dim=1).numpy()
    np.testing.assert_allclose(probabilities, reference.predict_proba(scaler.transform(x)), atol=1e-4)
    assert torch.equal(model.head.weight[n_classes], untouched[0])
    assert float(model.head.bias[n_classes]) == untouched[1]
    assert record["head_init"] == "probe"
    assert record["probe_train_accuracy"] == pytest.approx(reference.score(scaler.transform(x), y))


# ------------------------------------------------------------------------------ helpers


def test_class_weights_are_balanced() -> None:
    weights = class_weights([0, 0, 0, 1, 2, 2], 3)
    # n / (k * n_c) = 6 / (3 * [3, 1, 2])
    assert torch.allclose(weights, torch.tensor([2 / 3, 2.0, 1.0]))
    # weighted class totals are equal: each class carries n / k of the loss
    assert torch.allclose(weights * torch.tensor([3.0, 1.0, 2.0]), torch.full((3,), 2.0))
    with pytest.raises(LeukotypeError, match=r"class index\(es\) \[2\] have no training samples"):
        class_weights([0, 1, 1], 3)


def test_class_weighted_loss_is_used(tmp_path: Path) -> None:
    """With lr ~ 0 the first epoch's train loss is the initial model's weighted cross-entropy."""
    x, _ = toy_data(20, seed=2)
    y = torch.tensor([0] * 14 + [1] * 4 + [2] * 2)
    tiny = cfg(epochs=1, lr=1e-12, batch_size=20, policy="head")
    model = toy_model("head")
    logits = model.eval()(x).detach()
    expected = nn.functional.cross_entropy(logits, y, weight=class_weights(y, N_CLASSES)).item()
    plain = nn.functional.cross_entropy(logits, y).item()
    weighted = fit(
        toy_model("head"), TensorSamples(x), y, dataclasses.replace(tiny, class_weighted=True)
    )
    unweighted = fit(toy_model("head"), TensorSamples(x), y, tiny)
    assert weighted.history.train_loss[0] == pytest.approx(expected, rel=1e-5)
    assert unweighted.history.train_loss[0] == pytest.approx(plain, rel=1e-5)
    assert expected != pytest.approx(plain, rel=1e-3)


def test_lr_schedules() -> None:
    assert [lr_at(cfg(epochs=4), e) for e in range(4)] == [0.05] * 4
    cosine = [lr_at(cfg(epochs=4, schedule="cosine"), e) for e in range(4)]
    assert cosine == pytest.approx(
        [0.05, 0.05 * (1 + np.cos(np.pi / 4)) / 2, 0.025, 0.05 * (1 + np.cos(3 * np.pi / 4)) / 2]
    )


def test_epoch_batches_are_seeded_and_never_leave_a_single_sample() -> None:
    a, b = epoch_batches(17, 8, seed=1, epoch=0), epoch_batches(17, 8, seed=1, epoch=0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert [len(x) for x in a] == [8, 9]  # 8, 8, 1 -> the single joins the previous batch
    assert sorted(torch.cat(a).tolist()) == list(range(17))
    assert not torch.equal(torch.cat(a), torch.cat(epoch_batches(17, 8, seed=1, epoch=1)))


# ------------------------------------------------------------------------------ training


@pytest.mark.parametrize("policy", ["head", "last_block"])
def test_fast_path_matches_ordinary_path(policy: str) -> None:
    x, y = toy_data(40, seed=4)
    xv, yv = toy_data(12, seed=5)
    calls = {"fast": 0, "ordinary": 0}
    results = {}
    for path in ("fast", "ordinary"):
        model = toy_model(policy)
        model.frozen.register_forward_hook(
            lambda m, i, o, p=path: calls.__setitem__(p, calls[p] + len(o))
        )
        results[path] = fit(
            model,
            TensorSamples(x),
            y,
            cfg(policy=policy, epochs=4, fast_path=path == "fast"),
            val_data=TensorSamples(xv),
            val_labels=yv,
        )
    fast, ordinary = results["fast"], results["ordinary"]
    assert fast.fast_path and not ordinary.fast_path
    # the frozen part ran once per sample on the fast path, every epoch on the ordinary one
    assert calls == {"fast": 40 + 12, "ordinary": 4 * (40 + 12)}
    for (name, a), b in zip(fast.model.state_dict().items(), ordinary.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    assert fast.model.state_dict()["head.weight"].abs().sum() > 0
    pd.testing.assert_frame_equal(
        strip_seconds(fast.history), strip_seconds(ordinary.history), atol=1e-5
    )
    probs_fast = predict_proba(fast.model, TensorSamples(xv), len(xv), device="cpu")
    probs_ordinary = predict_proba(ordinary.model, TensorSamples(xv), len(xv), device="cpu")
    assert np.array_equal(probs_fast.argmax(1), probs_ordinary.argmax(1))
    assert np.allclose(probs_fast, probs_ordinary, atol=1e-5)


def test_fast_path_large_cache_goes_to_a_memmap_under_the_checkpoint_dir(tmp_path: Path) -> None:
    x, y = toy_data(30, seed=6)
    small_memory = cfg(policy="last_block", fast_path_memory_mb=0, epochs=2)
    partial = fit(
        toy_model("last_block"),
        TensorSamples(x),
        y,
        small_memory,
        checkpoint_dir=tmp_path,
        max_epochs_this_run=1,
    )
    assert not partial.completed
    cache = np.load(tmp_path / "frozen_train.npy", mmap_mode="r")
    assert cache.shape == (30, 6, 8, 8) and cache.dtype == np.float32
    with torch.no_grad():
        expected = toy_model("last_block").frozen(x).numpy()
    assert np.allclose(cache, expected, atol=1e-6)
    result = fit(
        toy_model("last_block"), TensorSamples(x), y, small_memory, checkpoint_dir=tmp_path
    )
    assert result.resumed_from_epoch == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        CHECKPOINT_NAME
    ]  # cache removed when done
    in_memory = fit(
        toy_model("last_block"),
        TensorSamples(x),
        y,
        dataclasses.replace(small_memory, fast_path_memory_mb=64),
    )
    assert states_equal(result.model, in_memory.model)


@pytest.mark.parametrize("fast_path", [True, False])
def test_interrupted_training_resumes_to_exactly_the_same_model(
    tmp_path: Path, fast_path: bool
) -> None:
    x, y = toy_data(30, seed=7)
    xv, yv = toy_data(9, seed=8)
    config = cfg(
        policy="last_block",
        epochs=4,
        fast_path=fast_path,
        schedule="cosine",
        early_stopping_patience=3,
    )
    data = dict(val_data=TensorSamples(xv), val_labels=yv)
    straight = fit(toy_model("last_block"), TensorSamples(x), y, config, **data)

    # run 1: stopped after two epochs
    first = fit(
        toy_model("last_block"),
        TensorSamples(x),
        y,
        config,
        checkpoint_dir=tmp_path,
        max_epochs_this_run=2,
        **data,
    )
    assert not first.completed and len(first.history) == 2
    assert (tmp_path / CHECKPOINT_NAME).is_file()

    # run 2: a crash (exception in the epoch callback) after epoch 3, checkpoint already written
    def crash(record):
        if record["epoch"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(
            toy_model("last_block"),
            TensorSamples(x),
            y,
            config,
            checkpoint_dir=tmp_path,
            on_epoch_end=crash,
            **data,
        )
    # run 3: a fresh process would rebuild the model from scratch and resume
    resumed = fit(
        toy_model("last_block"), TensorSamples(x), y, config, checkpoint_dir=tmp_path, **data
    )
    assert resumed.resumed_from_epoch == 3 and resumed.completed
    assert states_equal(resumed.model, straight.model)  # bit for bit on CPU
    pd.testing.assert_frame_equal(strip_seconds(resumed.history), strip_seconds(straight.history))

    # a finished checkpoint returns the final model without training again
    seen = []
    again = fit(
        toy_model("last_block"),
        TensorSamples(x),
        y,
        config,
        checkpoint_dir=tmp_path,
        on_epoch_end=seen.append,
        **data,
    )
    assert (
        seen == [] and again.resumed_from_epoch == 4 and states_equal(again.model, straight.model)
    )


def test_checkpoint_for_another_config_is_not_resumed(tmp_path: Path) -> None:
    x, y = toy_data(24, seed=9)
    fit(
        toy_model("head"),
        TensorSamples(x),
        y,
        cfg(epochs=2),
        checkpoint_dir=tmp_path,
        max_epochs_this_run=1,
    )
    checkpoint = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)  # loadable safely
    assert checkpoint["epoch"] == 1 and set(checkpoint["history"][0]) == set(HISTORY_COLUMNS)
    with pytest.warns(UserWarning, match="fingerprint mismatch"):
        other = fit(
            toy_model("head"), TensorSamples(x), y, cfg(epochs=2, lr=0.01), checkpoint_dir=tmp_path
        )
    assert other.resumed_from_epoch == 0 and len(other.history) == 2
    # execution-only settings (here the fast path) do not invalidate a checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = fit(
            toy_model("head"),
            TensorSamples(x),
            y,
            cfg(epochs=2, lr=0.01, fast_path=False),
            checkpoint_dir=tmp_path,
        )
    assert same.resumed_from_epoch == 2


def test_early_stopping_keeps_the_best_epoch() -> None:
    x, y = toy_data(30, seed=10)
    xv, _ = toy_data(12, seed=11)
    yv = (torch.arange(12) + 1) % N_CLASSES  # validation contradicts training: val loss rises
    snapshots = []
    model = toy_model("head")
    result = fit(
        model,
        TensorSamples(x),
        y,
        cfg(policy="head", epochs=30, lr=0.2, early_stopping_patience=2),
        val_data=TensorSamples(xv),
        val_labels=yv,
        on_epoch_end=lambda record: snapshots.append(model.trainable_state()),
    )
    val_loss = result.history.val_loss.to_numpy()
    best = int(np.argmin(val_loss)) + 1
    assert result.stopped_early and result.completed
    assert result.best_epoch == best
    assert len(result.history) == best + 2  # patience 2
    assert len(result.history) < 30
    best_state = snapshots[best - 1]
    assert torch.equal(result.model.head.weight, best_state["head"]["weight"])
    assert not torch.equal(result.model.head.weight, snapshots[-2]["head"]["weight"])
    # and the returned model really has the best validation loss
    logits = result.model.eval()(xv).detach()
    assert nn.functional.cross_entropy(logits, yv).item() == pytest.approx(val_loss.min(), rel=1e-5)


def test_bf16_autocast_trains() -> None:
    x, y = toy_data(48, seed=15)
    result = fit(
        toy_model("last_block"),
        TensorSamples(x),
        y,
        cfg(policy="last_block", epochs=4, precision="bf16"),
    )
    losses = result.history.train_loss.to_numpy()
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert result.model.head.weight.dtype == torch.float32  # master weights stay fp32


def test_early_stopping_without_validation_data_is_an_error() -> None:
    x, y = toy_data(6, seed=0)
    with pytest.raises(LeukotypeError, match="no validation samples"):
        fit(toy_model("head"), TensorSamples(x), y, cfg(early_stopping_patience=2))


def test_paper_cnn_learns_a_toy_problem_to_high_accuracy() -> None:
    """Class = quadrant of a bright square on noise; 32-px PaperCNN from scratch."""
    from leukotype.paper_cnn import PaperCNN

    def squares(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % 4
        x = torch.randn(n, 3, 32, 32, generator=g) * 0.5
        for i, c in enumerate(labels.tolist()):
            r, col = (c // 2) * 16 + 4, (c % 2) * 16 + 4
            x[i, :, r : r + 8, col : col + 8] += 1.5
        return x, labels

    x, y = squares(160, seed=0)
    xt, yt = squares(80, seed=1)
    net = PaperCNN(num_classes=4, input_size=32, seed=0)
    frozen, trainable = split_stages([net.features], "all")
    model = FinetuneModel(frozen, trainable, seeded_head(net.feature_dim, 4, seed=0))
    result = fit(model, TensorSamples(x), y, cfg(policy="all", epochs=4, batch_size=16, lr=0.01))
    accuracy = (
        predict_proba(result.model, TensorSamples(xt), len(xt), device="cpu").argmax(1)
        == yt.numpy()
    ).mean()
    assert result.history.train_loss.iloc[-1] < result.history.train_loss.iloc[0] / 3
    assert accuracy >= 0.95, accuracy


# ------------------------------------------------------------------------------ combined, outputs


def test_parallel_trunks_concatenate_part_features() -> None:
    a, b = toy_stages(0), toy_stages(1)
    trunks = ParallelTrunks([nn.Sequential(*a), nn.Sequential(*b)])
    model = FinetuneModel(trunks, nn.Sequential(), seeded_head(16, N_CLASSES, 0)).eval()
    x1, _ = toy_data(4, 0, size=8)
    x2, _ = toy_data(4, 1, size=12)  # each part has its own input size
    features = model.features((x1, x2))
    assert features.shape == (4, 16)
    assert torch.allclose(features[:, :8], nn.Sequential(*a).eval()(x1))
    assert torch.allclose(features[:, 8:], nn.Sequential(*b).eval()(x2))
    assert model(x1).shape == (4, N_CLASSES)  # one tensor goes to every trunk
    assert len(model.trainable_parameters()) == 2  # only the shared head


def test_save_and_reload_finetuned_model_weights_only(tmp_path: Path) -> None:
    x, y = toy_data(12, seed=12)
    model = fit(toy_model("last_block"), TensorSamples(x), y, cfg(epochs=1)).model
    save_finetuned(model, tmp_path / "model.pt")
    reloaded = load_finetuned(toy_model("last_block"), tmp_path / "model.pt")
    assert states_equal(model, reloaded)
    assert list(tmp_path.iterdir()) == [tmp_path / "model.pt"]  # no temp files left


def test_learning_curve_figure(tmp_path: Path) -> None:
    x, y = toy_data(12, seed=13)
    xv, yv = toy_data(6, seed=14)
    history = fit(
        toy_model("head"),
        TensorSamples(x),
        y,
        cfg(epochs=2),
        val_data=TensorSamples(xv),
        val_labels=yv,
    ).history
    assert list(history.columns) == list(HISTORY_COLUMNS) and history.epoch.tolist() == [1, 2]
    from leukotype.report import plot_learning_curve

    plot_learning_curve(history, tmp_path / "curve.png", title="toy")
    assert Image.open(tmp_path / "curve.png").size[0] > 100


# ------------------------------------------------------------------------------ real backbones


@pytest.fixture(scope="module")
def resnet101_stages() -> list[nn.Module]:
    from leukotype import backbones

    spec = backbones.get_spec("resnet101")
    return backbones.stages(spec, backbones.build_model(spec, None, seed=0))


@pytest.mark.parametrize(
    ("policy", "trainable", "frozen"),
    [
        # resnet101 without fc: 312 parameter tensors
        # (conv1+bn1: 3, 33 bottlenecks x 9, 4 downsamples x 3);
        # its last stage is the last bottleneck of layer4 (3 convs + 3 BatchNorms = 9 tensors)
        ("head", 0, 312),
        ("last_block", 9, 303),
        ("all", 312, 0),
    ],
)
def test_resnet101_freeze_policy_parameter_counts(
    resnet101_stages, policy, trainable, frozen
) -> None:
    model = FinetuneModel(*split_stages(resnet101_stages, policy), seeded_head(2048, 5, seed=0))
    requires_grad = [p.requires_grad for p in model.parameters()]
    assert sum(requires_grad) == trainable + 2  # + the new head's weight and bias
    assert len(requires_grad) - sum(requires_grad) == frozen
    assert len(model.trainable_parameters()) == trainable + 2


@pytest.mark.parametrize("policy", ["head", "last_block", "all"])
def test_efficientnet_lite0_freeze_policy_parameter_counts(policy: str) -> None:
    from leukotype import backbones
    from leukotype.finetune import build_finetune_model

    reference = backbones.build_model(backbones.get_spec("efficientnet_lite0"), None, seed=0)
    n_backbone = len(list(reference.parameters())) - len(list(reference._fc.parameters()))
    n_last = sum(
        len(list(m.parameters()))
        for m in (reference._blocks[-1], reference._conv_head, reference._bn1)
    )
    expected = {"head": 0, "last_block": n_last, "all": n_backbone}[policy]
    model, _ = build_finetune_model("efficientnet_lite0", 4, policy, weights=None, seed=0)
    assert len(model.trainable_parameters()) == expected + 2
    assert sum(1 for p in model.parameters() if not p.requires_grad) == n_backbone - expected
    assert model.head.in_features == 1280 and model.head.out_features == 4


def write_cells(root: Path, n_per_class: int) -> pd.DataFrame:
    """Tiny synthetic 'cells': class a = reddish disc, class b = bluish disc."""
    rows = []
    rng = np.random.default_rng(0)
    for label, colour in (("a", (200, 60, 80)), ("b", (70, 60, 200))):
        for i in range(n_per_class):
            yy, xx = np.mgrid[:40, :48]
            disc = (yy - 20) ** 2 + (xx - 24 - i) ** 2 < 150
            pixels = rng.integers(180, 255, size=(40, 48, 3))
            pixels[disc] = np.asarray(colour) + rng.integers(-20, 20, size=(int(disc.sum()), 3))
            path = root / f"{label}{i}.png"
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
            rows.append({"image_id": f"img{len(rows):06d}", "abspath": str(path), "label": label})
    return pd.DataFrame(rows)


def test_image_samples_end_to_end_with_efficientnet_lite0(tmp_path: Path) -> None:
    """train -> predict -> finetuned features on decoded images, fast path == ordinary path."""
    from leukotype.finetune import build_finetune_model, predict, train, write_finetuned_features

    from torchvision import transforms as T

    cells = write_cells(tmp_path, n_per_class=3)
    classes = ["a", "b"]
    train_frame = pd.concat([cells.assign(transform="identity"), cells.assign(transform="rot90")])
    train_samples = Samples.from_frame(train_frame, classes)
    test_samples = Samples.from_frame(cells.assign(transform="identity"), classes)
    config = cfg(policy="last_block", epochs=2, batch_size=4, lr=0.01)
    fitted = {}
    for fast in (True, False):
        model, preprocess = build_finetune_model("efficientnet_lite0", 2, "last_block", seed=0)
        assert preprocess(Image.open(cells.abspath[0])).shape == (3, 224, 224)
        # 64 px instead of 224 px keeps the test fast; the convolutions accept any size
        preprocess = T.Compose(
            [T.Resize(64), T.CenterCrop(64), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]
        )
        fitted[fast] = train(
            model,
            train_samples,
            dataclasses.replace(config, fast_path=fast),
            preprocess=preprocess,
            checkpoint_dir=tmp_path / f"ckpt{fast}",
        )
    for (name, a), b in zip(
        fitted[True].model.state_dict().items(), fitted[False].model.state_dict().values()
    ):
        assert torch.allclose(a.float(), b.float(), atol=1e-4), name
    model = fitted[True].model
    predictions = predict(model, test_samples, preprocess, classes, device="cpu", batch_size=4)
    assert list(predictions.columns) == [
        "image_id",
        "transform",
        "true",
        "pred",
        "prob_a",
        "prob_b",
    ]
    assert predictions.true.tolist() == ["a"] * 3 + ["b"] * 3
    assert np.allclose(predictions[["prob_a", "prob_b"]].sum(axis=1), 1.0, atol=1e-6)
    other = predict(
        fitted[False].model, test_samples, preprocess, classes, device="cpu", batch_size=4
    )
    assert predictions.pred.tolist() == other.pred.tolist()

    array = write_finetuned_features(
        tmp_path / "features", model, test_samples, preprocess, device="cpu"
    )
    assert array.shape == (6, 1280)
    assert np.array_equal(np.load(tmp_path / "features" / "finetuned.npy"), array)
    index = pd.read_csv(tmp_path / "features" / "index.tsv", sep="\t", dtype=str)
    assert index.image_id.tolist() == test_samples.index_frame().image_id.tolist()
    # the features are the head's input: the head applied to them gives the predictions
    logits = model.head(torch.from_numpy(array)).detach()
    assert np.allclose(torch.softmax(logits, 1)[:, 0].numpy(), predictions.prob_a, atol=1e-5)


def test_combined_backbone_two_frozen_trunks_one_head(tmp_path: Path) -> None:
    from leukotype.finetune import build_finetune_model

    with pytest.raises(LeukotypeError, match=r"valid policies: \['head'\]"):
        build_finetune_model("inception_v3+resnet101", 3, "all")
    model, preprocess = build_finetune_model("inception_v3+resnet101", 3, "head", seed=0)
    image = Image.fromarray(np.full((60, 50, 3), 128, dtype=np.uint8))
    inputs = preprocess(image)
    assert [tuple(t.shape) for t in inputs] == [(3, 299, 299), (3, 224, 224)]
    assert model.head.in_features == 4096 and len(model.trainable_parameters()) == 2
    assert not any(p.requires_grad for p in model.frozen.parameters())
    # through the sample pipeline (tuples collated per part), with small inputs to stay fast
    from torchvision import transforms as T

    from leukotype.finetune import CombinedPreprocess, finetuned_features

    small = CombinedPreprocess(
        [
            T.Compose([T.Resize((80, 80)), T.ToTensor()]),
            T.Compose([T.Resize((64, 64)), T.ToTensor()]),
        ]
    )
    samples = Samples.from_frame(write_cells(tmp_path, 1).assign(transform="identity"))
    features = finetuned_features(model, samples, small, device="cpu")
    assert features.shape == (2, 4096) and np.isfinite(features).all()


def test_scratch_cnn_fast_path_decodes_each_sample_once_and_trains_the_same_model(
    tmp_path: Path,
) -> None:
    """Nothing frozen (paper CNN): the fast path caches preprocessed inputs in RAM, bit-identically."""
    from leukotype.finetune import build_finetune_model, train

    cells = write_cells(tmp_path, n_per_class=3)
    classes = ["a", "b"]
    frame = pd.concat([cells.assign(transform=t) for t in ("identity", "rot90", "flip_h")])
    samples = Samples.from_frame(frame, classes)
    config = cfg(policy="all", epochs=3, batch_size=4, lr=0.01)
    runs = {}
    for label, overrides in {
        "fast": {},
        "ordinary": {"fast_path": False},
        "too_big_for_ram": {"fast_path_memory_mb": 0},
    }.items():
        model, preprocess = build_finetune_model("paper_cnn", 2, "all", seed=0)
        calls = {"n": 0}

        def counting(image, preprocess=preprocess, calls=calls):
            calls["n"] += 1
            return preprocess(image)

        result = train(
            model,
            samples,
            dataclasses.replace(config, **overrides),
            preprocess=counting,
            checkpoint_dir=tmp_path / f"ckpt_{label}",
        )
        runs[label] = (result, calls["n"])
        # inputs are never cached on disk: only the checkpoint is written
        assert sorted(p.name for p in (tmp_path / f"ckpt_{label}").iterdir()) == [CHECKPOINT_NAME]
    n = len(frame)
    # one decode per sample, plus one of the first sample to size the cache
    assert runs["fast"][0].fast_path and runs["fast"][1] == n + 1
    assert not runs["ordinary"][0].fast_path and runs["ordinary"][1] == 3 * n  # once per epoch
    assert not runs["too_big_for_ram"][0].fast_path and runs["too_big_for_ram"][1] == 3 * n + 1
    for label in ("ordinary", "too_big_for_ram"):
        assert states_equal(runs["fast"][0].model, runs[label][0].model)


def test_run_finetune_checks_a_user_weight_files_sha256(tmp_path: Path) -> None:
    """A user weight file's sha256 is checked by fine-tuning as by extraction (issue 15)."""
    from leukotype import backbones
    from leukotype.stages import FinetuneOutputs, run_finetune
    from leukotype.weights import file_sha256

    cells = write_cells(tmp_path, n_per_class=3)
    cells.assign(status="ok").to_csv(tmp_path / "validated.tsv", sep="\t", index=False)
    samples = cells.assign(transform="identity", group=cells.image_id, fold="holdout")
    samples["part"] = ["train", "train", "test", "train", "train", "test"]
    samples.drop(columns="abspath").to_csv(tmp_path / "samples.tsv", sep="\t", index=False)
    net = backbones.build_model(backbones.get_spec("paper_cnn"), None, seed=5)
    weights = tmp_path / "mine.pt"
    torch.save(net.state_dict(), weights)

    def run(sha256: str, out: Path) -> pd.DataFrame:
        out.mkdir()
        return run_finetune(
            tmp_path / "samples.tsv",
            tmp_path / "validated.tsv",
            {"name": "t", "column": "label", "classes": ["a", "b"]},
            "paper_cnn",
            "holdout",
            str(weights),
            None,
            {"policy": "all", "epochs": 1, "batch_size": 4, "lr": 1e-9, "device": "cpu"},
            out / "ckpt",
            FinetuneOutputs(
                model=out / "model.pt",
                history=out / "history.tsv",
                curve=out / "curve.png",
                predictions=out / "predictions.tsv",
                features=out / "features",
            ),
            sha256=sha256,
        )

    with pytest.raises(LeukotypeError, match="sha256 mismatch for weights file"):
        run("0" * 64, tmp_path / "wrong")
    assert not (tmp_path / "wrong" / "model.pt").exists()
    predictions = run(file_sha256(weights)[:12], tmp_path / "right")
    assert len(predictions) == 2 and (tmp_path / "right" / "model.pt").is_file()
    # training (lr ~ 0) started from the user's weights, not from the default initialisation
    trained = torch.load(tmp_path / "right" / "model.pt", weights_only=True)
    default = backbones.build_model(backbones.get_spec("paper_cnn"), None, seed=0)
    first_conv = trained["trainable.0.0.weight"]  # paper_cnn's features.0 (the first conv)
    assert torch.allclose(first_conv, net.state_dict()["features.0.weight"], atol=1e-6)
    assert not torch.allclose(first_conv, default.state_dict()["features.0.weight"])


# ------------------------------------------------------------------------------ one job, one pass


def fold_of_cells(root: Path, classes: list[str], n_train: int = 5, n_val: int = 1, n_test: int = 2):
    """Training images x 3 transforms, validation images x 2, test images (identity)."""
    from leukotype.finetune import FoldSamples

    cells = write_cells(root, n_per_class=(n_train + n_val + n_test + 1) // 2)
    order = [i for pair in zip(range(len(cells) // 2), range(len(cells) // 2, len(cells))) for i in pair]
    train = cells.iloc[order[:n_train]]
    train = pd.concat([train.assign(transform=t) for t in ("identity", "rot90", "rot180")])
    val = cells.iloc[order[n_train : n_train + n_val]]
    val = pd.concat([val.assign(transform=t) for t in ("identity", "flip_h")])
    test = cells.iloc[order[n_train + n_val : n_train + n_val + n_test]].assign(transform="identity")
    return FoldSamples(
        train=Samples.from_frame(train, classes),
        val=Samples.from_frame(val, classes) if n_val else None,
        test=Samples.from_frame(test, classes),
    )


def small_input(size: int):
    from torchvision import transforms as T

    return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])


@pytest.mark.parametrize(
    ("backbone", "batch_size", "n_val", "repeated"),
    [
        # batches of 4 over the job's 19 samples (0-3, ..., 16-18): the training part's last
        # batch (12-14), the validation (15-16) and the test part (17-18) are not among them
        ("toy", 4, 1, 3 + 2 + 2),
        # batches of 16 over 32 samples: rows 16-31 mix training (16-29) and test (30-31)
        # samples; at 64 px this CPU's kernels give other bits for a batch of 16 than of 14
        ("efficientnet_lite0", 16, 0, 14 + 2),
    ],
)
def test_fold_job_runs_the_frozen_layers_once_with_the_two_pass_results(
    tmp_path: Path, backbone: str, batch_size: int, n_val: int, repeated: int
) -> None:
    """Frozen layers once per sample of the job (plus the samples of a part's batches that are
    not the job's); model, predictions and features bit-identical to training, then predicting
    and extracting from the images again."""
    from leukotype.finetune import build_finetune_model, finetune_fold
    from leukotype.finetune.job import finetune_fold_from_images

    classes = ["a", "b", "c"]  # N_CLASSES outputs; no image is a "c"
    fold = fold_of_cells(tmp_path, classes, n_train=5 if n_val else 10, n_val=n_val)
    config = cfg(
        policy="last_block",
        epochs=2,
        batch_size=batch_size,
        lr=0.01,
        early_stopping_patience=2 if n_val else None,
    )
    n_train, n_test = len(fold.train), len(fold.test)
    n_val = len(fold.val) if fold.val is not None else 0
    jobs, calls = {}, {}
    for name, job in (("one_pass", finetune_fold), ("two_pass", finetune_fold_from_images)):
        if backbone == "toy":
            model, preprocess = toy_model("last_block"), small_input(8)
        else:  # 64 px instead of 224 keeps it fast; the convolutions accept any size
            model, _ = build_finetune_model(backbone, N_CLASSES, "last_block", seed=0)
            preprocess = small_input(64)
        calls[name] = 0

        def count(module, inputs, output, name=name):
            calls[name] += len(output)

        model.frozen.register_forward_hook(count)
        jobs[name] = job(model, preprocess, fold, classes, config, checkpoint_dir=tmp_path / name)
    one, two = jobs["one_pass"], jobs["two_pass"]
    n_all = n_train + n_val + n_test
    assert calls == {"one_pass": n_all + repeated, "two_pass": 2 * n_all}
    assert states_equal(one.train.model, two.train.model)
    pd.testing.assert_frame_equal(one.predictions, two.predictions, check_exact=True)
    assert one.features.shape == (n_train + n_val + n_test, one.train.model.head.in_features)
    assert np.array_equal(one.features, two.features)
    pd.testing.assert_frame_equal(one.feature_index, two.feature_index)
    pd.testing.assert_frame_equal(strip_seconds(one.train.history), strip_seconds(two.train.history))
    assert one.train.cache_seconds > 0
    # the job's activation cache is removed when the job is done; the checkpoint stays
    assert sorted(p.name for p in (tmp_path / "one_pass").iterdir()) == [CHECKPOINT_NAME]


def test_head_init_probe_starts_both_job_paths_from_the_same_probe(tmp_path: Path) -> None:
    """``head_init: probe``: the one-pass and two-pass jobs train bit-identical models, both from
    the probe fitted on the pretrained features of the training samples (with a learning rate
    too small to move it, the trained head is that probe); a random head trains another model."""
    from leukotype.finetune import finetune_fold
    from leukotype.finetune.job import finetune_fold_from_images
    from leukotype.finetune.outputs import finetuned_features
    from leukotype.finetune.probe import probe_head

    classes = ["a", "b", "c"]
    fold = fold_of_cells(tmp_path, classes, n_train=10, n_val=0)
    config = cfg(policy="last_block", epochs=1, batch_size=4, lr=1e-9, head_init="probe")
    jobs = {
        name: job(toy_model("last_block"), small_input(8), fold, classes, config)
        for name, job in (("one_pass", finetune_fold), ("two_pass", finetune_fold_from_images))
    }
    one, two = jobs["one_pass"], jobs["two_pass"]
    assert states_equal(one.train.model, two.train.model)
    pd.testing.assert_frame_equal(one.predictions, two.predictions, check_exact=True)
    assert one.train.head_init == two.train.head_init
    assert one.train.head_init["head_init"] == "probe" and one.train.head_init["probe_train_accuracy"] > 0.5

    expected = toy_model("last_block")
    features = finetuned_features(expected, fold.train, small_input(8), batch_size=4, device="cpu")
    probe_head(expected, features.astype(np.float64), fold.train.labels, seed=config.seed)
    assert torch.allclose(one.train.model.head.weight, expected.head.weight, atol=1e-6)
    assert torch.allclose(one.train.model.head.bias, expected.head.bias, atol=1e-6)
    random_head = finetune_fold(toy_model("last_block"), small_input(8), fold, classes, cfg(
        policy="last_block", epochs=1, batch_size=4, lr=1e-9))
    assert random_head.train.head_init == {"head_init": "random"}
    assert not torch.allclose(random_head.train.model.head.weight, expected.head.weight, atol=1e-3)


def test_head_init_probe_on_stored_features_for_the_head_policy(tmp_path: Path) -> None:
    """The ``head`` policy trains on the extraction job's stored features: with ``probe`` the
    head starts as the probe on those features (a learning rate too small to move it keeps it)."""
    from leukotype.feature_store import write_feature_matrix
    from leukotype.finetune.job import train_head_on_features
    from leukotype.finetune.probe import probe_head

    classes = ["a", "b", "c"]
    fold = fold_of_cells(tmp_path, classes, n_train=10, n_val=0)
    every = fold.all()
    rng = np.random.default_rng(0)
    stored = rng.normal(size=(len(every), 8)) + 3 * np.eye(8)[np.asarray(every.labels) % 8]
    write_feature_matrix(tmp_path / "features", "penultimate", every.index_frame(), stored)
    config = cfg(policy="head", epochs=1, batch_size=4, lr=1e-9, head_init="probe")
    job = train_head_on_features(toy_model("head"), fold, classes, config,
                                 feature_dirs=[tmp_path / "features"], layer="penultimate")
    expected = toy_model("head")
    train_rows = np.asarray(stored[: len(fold.train)], dtype=np.float32).astype(np.float64)
    record = probe_head(expected, train_rows, fold.train.labels, seed=config.seed)
    assert job.train.head_init == record
    assert torch.allclose(job.train.model.head.weight, expected.head.weight, atol=1e-6)
    assert torch.allclose(job.train.model.head.bias, expected.head.bias, atol=1e-6)


def test_fold_activations_spill_to_memmaps_above_the_budget_and_are_reused(tmp_path: Path) -> None:
    from leukotype.finetune import compute_activation_cache
    from leukotype.finetune.job import fold_activations

    classes = ["a", "b", "c"]
    fold = fold_of_cells(tmp_path, classes)
    model, preprocess = toy_model("last_block"), small_input(8)
    runs = {"n": 0}
    model.frozen.register_forward_hook(lambda m, i, o: runs.__setitem__("n", runs["n"] + len(o)))
    config = cfg(policy="last_block", batch_size=4)
    in_ram = fold_activations(model, preprocess, fold, config)
    # each part's rows are what that part alone gives in its own batches, bit for bit
    for name, part in fold.parts().items():
        alone = compute_activation_cache(
            model, part.dataset(preprocess), len(part), batch_size=4, device=torch.device("cpu"),
            precision="fp32", num_workers=0, memory_limit_bytes=2**30,
        )
        assert np.array_equal(in_ram[name].array, alone.array), name
    runs["n"] = 0
    on_disk_cfg = dataclasses.replace(config, fast_path_memory_mb=0)
    on_disk = fold_activations(model, preprocess, fold, on_disk_cfg, cache_dir=tmp_path / "c")
    assert runs["n"] == len(fold.all()) + 3 + len(fold.val) + len(fold.test)
    assert not isinstance(in_ram["all"].array, np.memmap)
    assert isinstance(on_disk["all"].array, np.memmap)
    assert sorted(p.name for p in (tmp_path / "c").glob("*.npy")) == [
        "frozen_all.npy", "frozen_repeated.npy"
    ]
    for name in ("all", "train", "val", "test"):
        assert np.array_equal(in_ram[name].array, on_disk[name].array), name
    # a resumed job finds them: the frozen layers do not run again
    before = runs["n"]
    again = fold_activations(model, preprocess, fold, on_disk_cfg, cache_dir=tmp_path / "c")
    assert runs["n"] == before and np.array_equal(again["test"].array, in_ram["test"].array)


def _noisy_cells(root: Path, n_groups: int, per_group: int, seed: int) -> pd.DataFrame:
    """64 px 'cells' of two classes told apart by a tint, with one label in each group flipped:
    a network trained from scratch memorises the flipped training labels too and is then
    over-confident on new cells (it is right on about 3 in 4 but says so with near certainty)."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, other, tint in (("a", "b", (12, 0, -12)), ("b", "a", (-12, 0, 12))):
        for g in range(n_groups):
            for i in range(per_group):
                pixels = rng.normal(150, 45, size=(64, 64, 3)) + np.asarray(tint)
                path = root / f"{label}{g}_{i}.png"
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
                rows.append({"image_id": f"img{len(rows):06d}", "abspath": str(path),
                             "label": other if i == 0 else label, "group": f"{label}-p{g}"})
    return pd.DataFrame(rows)


def test_paper_cnn_without_validation_part_is_calibrated_on_a_held_out_slice_of_the_training_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No validation part, network trained from scratch: the temperature comes from a
    group-aware calibration slice of the training part that no gradient step saw (never the
    test part), and it lowers NLL and ECE of the over-confident network on the test part."""
    import json

    from leukotype.calibration import expected_calibration_error, negative_log_likelihood, softmax
    from leukotype.finetune import job, training
    from leukotype.stages import FinetuneOutputs, run_finetune

    cells = _noisy_cells(tmp_path, n_groups=10, per_group=4, seed=0)
    cells.assign(status="ok").to_csv(tmp_path / "validated.tsv", sep="\t", index=False)
    test_groups = {"a-p0", "a-p1", "a-p2", "b-p0", "b-p1", "b-p2"}
    samples = cells.assign(transform="identity", fold="holdout",
                           part=np.where(cells["group"].isin(test_groups), "test", "train"))
    samples.drop(columns="abspath").to_csv(tmp_path / "samples.tsv", sep="\t", index=False)
    trained_on: list[int] = []
    original_fit = training.fit

    def recording_fit(model, train_data, train_labels, cfg, **kwargs):
        trained_on.append(len(train_labels))
        return original_fit(model, train_data, train_labels, cfg, **kwargs)

    monkeypatch.setattr(training, "fit", recording_fit)
    monkeypatch.setattr(job, "fit", recording_fit)
    out = tmp_path / "run"
    predictions = run_finetune(
        tmp_path / "samples.tsv", tmp_path / "validated.tsv",
        {"name": "t", "column": "label", "classes": ["a", "b"]}, "paper_cnn", "holdout", "none", None,
        {"policy": "all", "epochs": 40, "batch_size": 8, "lr": 0.01, "device": "cpu", "seed": 3,
         "calibration_fraction": 0.25},
        out / "ckpt",
        FinetuneOutputs(model=out / "model.pt", history=out / "history.tsv", curve=out / "curve.png",
                        predictions=out / "predictions.tsv", features=out / "features",
                        calibration=out / "calibration.json"),
    )
    record = json.loads((out / "calibration.json").read_text())
    train_ids = set(samples.loc[samples["part"] == "train", "image_id"])
    test_ids = set(samples.loc[samples["part"] == "test", "image_id"])
    held = set(record["image_ids"])
    assert record["held_out"] == "calibration" and "calibration slice" in record["fitted_on"]
    assert held < train_ids and not held & test_ids and record["n"] == len(held)
    held_groups = set(samples.set_index("image_id").loc[sorted(held), "group"])
    assert {g[0] for g in held_groups} == {"a", "b"}  # whole groups of every class
    assert set(samples.loc[samples["group"].isin(held_groups), "image_id"]) == held
    assert trained_on == [len(train_ids) - len(held)]  # the slice took no gradient step
    assert set(predictions["image_id"]) == test_ids

    # it learnt (memorised every training label, flipped ones too; right on most new cells),
    # is over-confident on new cells, and the slice's temperature tempers it
    history = pd.read_csv(out / "history.tsv", sep="\t")
    assert history["train_acc"].iloc[-1] == 1.0 and history["val_loss"].notna().all()
    assert (predictions["true"] == predictions["pred"]).mean() >= 0.65
    assert record["temperature"] > 1.5
    labels = (predictions["true"] == "b").astype(int).to_numpy()
    calibrated = predictions[["prob_a", "prob_b"]].to_numpy()
    logits = np.log(np.clip(calibrated, 1e-300, None)) * record["temperature"]  # up to a shift per row
    nll_after, nll_before = (negative_log_likelihood(logits, labels, t) for t in (record["temperature"], 1.0))
    assert nll_after < 0.8 * nll_before
    assert expected_calibration_error(calibrated, labels) < 0.6 * expected_calibration_error(softmax(logits), labels)
