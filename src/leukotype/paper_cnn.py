"""The small CNN described by Khan & Tehsin (2022), trained from scratch.

The paper (section 3): "two convolutional layers with 24 (9x9) and 48 (7x7) filters
respectively. The convolutional layers are followed by ReLU and the max-pooling layers. The
last layer is fully connected for classification purpose." Stride, padding and pooling size are
not given; we use MATLAB's ``convolution2dLayer`` defaults (stride 1, no padding) and the usual
2x2 max-pooling with stride 2.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import LeukotypeError

CONV1_FILTERS, CONV1_KERNEL = 24, 9
CONV2_FILTERS, CONV2_KERNEL = 48, 7
POOL = 2


def _after_conv_and_pool(size: int, kernel: int) -> int:
    """Spatial size after a valid (unpadded, stride-1) convolution and a 2x2/2 max-pool."""
    return (size - kernel + 1) // POOL


def min_input_size() -> int:
    """Smallest square input for which both conv/pool stages leave at least one pixel."""
    size = 1
    while _after_conv_and_pool(_after_conv_and_pool(size, CONV1_KERNEL), CONV2_KERNEL) < 1:
        size += 1
    return size


def paper_cnn_feature_dim(input_size: int) -> int:
    """Length of the flattened feature vector for a square ``input_size`` input."""
    if input_size < min_input_size():
        raise LeukotypeError(
            f"paper_cnn input_size {input_size} is too small: the 9x9 and 7x7 convolutions with "
            f"2x2 pooling need at least {min_input_size()} pixels per side"
        )
    side = _after_conv_and_pool(_after_conv_and_pool(input_size, CONV1_KERNEL), CONV2_KERNEL)
    return CONV2_FILTERS * side * side


class PaperCNN(nn.Module):
    """conv 24@9x9 -> ReLU -> maxpool 2 -> conv 48@7x7 -> ReLU -> maxpool 2 -> flatten -> fc.

    Attributes:
        features: ``nn.Sequential`` mapping (N, 3, S, S) to the flattened (N, feature_dim) vector.
        classifier: ``nn.Linear(feature_dim, num_classes)``.
        feature_dim: computed from ``input_size``.

    ``seed`` makes the initialisation reproducible without touching the caller's global RNG.
    """

    def __init__(self, num_classes: int, input_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        if num_classes < 1:
            raise LeukotypeError(f"paper_cnn needs num_classes >= 1, got {num_classes}")
        self.input_size = int(input_size)
        self.feature_dim = paper_cnn_feature_dim(self.input_size)
        # Layers draw their default init from the global RNG when constructed: fork it so that
        # construction is seeded and the caller's random stream is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.features = nn.Sequential(
                nn.Conv2d(3, CONV1_FILTERS, kernel_size=CONV1_KERNEL),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(POOL),
                nn.Conv2d(CONV1_FILTERS, CONV2_FILTERS, kernel_size=CONV2_KERNEL),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(POOL),
                nn.Flatten(),
            )
            self.classifier = nn.Linear(self.feature_dim, num_classes)

    def reset_parameters(self, seed: int) -> None:
        """Re-initialise every layer with PyTorch's default scheme from ``seed``.

        The global RNG is forked, so the caller's random stream is left as it was.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in self.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    module.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
