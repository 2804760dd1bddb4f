from collections.abc import Sequence
from typing import Any

from torch import nn

from mnist_lab.models.base import ImageClassifier, activation_layer, check_dropout, check_widths


class MLP(ImageClassifier):
    """Multilayer perceptron: Linear -> activation -> dropout for each hidden size, then a linear head."""

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (512, 256),
        activation: str = "ReLU",
        dropout: float = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        hidden_sizes = check_widths(hidden_sizes, "model.hidden_sizes", "[512,256]", least=0)
        dropout = check_dropout(dropout)
        layers: list[nn.Module] = [nn.Flatten()]  # (N, 1, 28, 28) -> (N, 784)
        width = 28 * 28
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), activation_layer(activation), nn.Dropout(dropout)]
            width = size
        self.net = nn.Sequential(*layers, nn.Linear(width, self.hparams.num_classes))
