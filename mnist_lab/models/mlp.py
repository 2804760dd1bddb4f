from collections.abc import Sequence

from torch import nn

from mnist_lab.models.base import ImageClassifier, activation_layer


class MLP(ImageClassifier):
    """Multilayer perceptron: Linear -> activation -> dropout for each hidden size, then a linear head."""

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (512, 256),
        activation: str = "ReLU",
        dropout: float = 0.2,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        num_classes: int = 10,
        loss: dict | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler, num_classes, loss)
        layers: list[nn.Module] = [nn.Flatten()]  # (N, 1, 28, 28) -> (N, 784)
        width = 28 * 28
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), activation_layer(activation), nn.Dropout(dropout)]
            width = size
        self.net = nn.Sequential(*layers, nn.Linear(width, num_classes))

