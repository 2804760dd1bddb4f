from collections.abc import Sequence
from typing import Any

from torch import nn

from mnist_lab.models.base import ImageClassifier, check_dropout, check_widths


def conv_bn(inputs: int, outputs: int) -> list[nn.Module]:
    # no conv bias: batch norm's shift takes its place
    return [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True)]


class CNN(ImageClassifier):
    """A small modern CNN: per block two 3x3 convolutions with batch norm and ReLU, 2x2 max pooling
    between blocks, then global average pooling, dropout and a linear head."""

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64),
        dropout: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # Pooling between blocks halves 28 x 28 each time: five blocks leave it 1 x 1.
        channels = check_widths(channels, "model.channels", "[16,32,64]", most=5)
        dropout = check_dropout(dropout)
        layers: list[nn.Module] = []
        width = 1
        for i, size in enumerate(channels):
            layers += conv_bn(width, size) + conv_bn(size, size)
            if i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))  # (N, C, 28, 28) -> (N, C, 14, 14) -> (N, C, 7, 7)
            width = size
        # (N, width, 7, 7) -> (N, width) -> (N, num_classes)
        self.net = nn.Sequential(
            *layers,
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(width, self.hparams.num_classes),
        )
