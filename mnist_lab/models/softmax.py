from torch import nn

from mnist_lab.models.base import ImageClassifier


class SoftmaxRegression(ImageClassifier):
    """Multinomial logistic regression: one linear map from 784 pixels to the class logits."""

    def __init__(self, optimizer: dict | None = None, scheduler: dict | None = None, num_classes: int = 10) -> None:
        super().__init__(optimizer, scheduler, num_classes)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, num_classes))  # (N, 1, 28, 28) -> (N, 784) -> (N, C)
