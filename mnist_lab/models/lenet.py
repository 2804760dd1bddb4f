from typing import Any

from torch import nn

from mnist_lab.models.base import ImageClassifier, activation_layer, check_dropout


class LeNet(ImageClassifier):
    """LeNet-5 (LeCun et al. 1998), with the 32x32 input replaced by 28x28 padded by 2 in the first conv.

    Max pooling and a configurable activation stand in for the paper's trainable subsampling and
    scaled tanh; dropout, off by default, applies before each fully connected layer after the first.
    """

    def __init__(
        self,
        activation: str = "ReLU",
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        dropout = check_dropout(dropout)
        self.net = nn.Sequential(
            # (N, 1, 28, 28) -> (N, 6, 14, 14)
            nn.Conv2d(1, 6, 5, padding=2), activation_layer(activation), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), activation_layer(activation), nn.MaxPool2d(2),  # -> (N, 16, 5, 5)
            nn.Flatten(),  # -> (N, 400)
            nn.Linear(16 * 5 * 5, 120), activation_layer(activation),
            nn.Dropout(dropout), nn.Linear(120, 84), activation_layer(activation),
            nn.Dropout(dropout), nn.Linear(84, self.hparams.num_classes),
        )  # fmt: skip
