"""The paper's small CNN: architecture, output shapes, feature_dim and seeded init."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leukotype.errors import LeukotypeError
from leukotype.paper_cnn import PaperCNN, min_input_size, paper_cnn_feature_dim


@pytest.mark.parametrize(
    ("size", "side"),
    [
        (24, 1),  # 24 -conv9-> 16 -pool-> 8 -conv7-> 2 -pool-> 1
        (32, 3),  # 32 -> 24 -> 12 -> 6 -> 3
        (48, 7),  # 48 -> 40 -> 20 -> 14 -> 7
        (64, 11),  # 64 -> 56 -> 28 -> 22 -> 11 (the backbone registry's 5808)
        (65, 11),  # odd sizes floor in the pooling
    ],
)
def test_output_shapes_and_feature_dim(size: int, side: int) -> None:
    model = PaperCNN(num_classes=5, input_size=size).eval()
    x = torch.zeros(2, 3, size, size)
    assert model.feature_dim == paper_cnn_feature_dim(size) == 48 * side * side
    assert model.features(x).shape == (2, 48 * side * side)
    assert model(x).shape == (2, 5)
    assert model.classifier.in_features == model.feature_dim


def test_architecture_is_the_papers() -> None:
    model = PaperCNN(num_classes=3, input_size=32)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (3, 24, (9, 9)),
        (24, 48, (7, 7)),
    ]
    kinds = [type(m).__name__ for m in model.features]
    assert kinds == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Flatten"]
    assert all(m.kernel_size == 2 for m in model.features if isinstance(m, nn.MaxPool2d))
    assert isinstance(model.classifier, nn.Linear) and model.classifier.out_features == 3


def test_too_small_input_is_an_actionable_error() -> None:
    assert min_input_size() == 24
    with pytest.raises(LeukotypeError, match="at least 24 pixels"):
        PaperCNN(num_classes=2, input_size=23)


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = PaperCNN(4, 32, seed=7), PaperCNN(4, 32, seed=7), PaperCNN(4, 32, seed=8)
    assert torch.equal(torch.get_rng_state(), before)
    for (name, ta), tb, tc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values()
    ):
        assert torch.equal(ta, tb), name
        assert not torch.equal(ta, tc), name
    a.reset_parameters(8)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
