from typing import Any

from torch import nn

from mnist_lab.models.base import ImageClassifier, check_dropout


class SoftmaxRegression(ImageClassifier):
    """Multinomial logistic regression: one linear map from 784 pixels to the class logits.

    `dropout` (off by default) drops input pixels while training, a regularizer for a linear
    model; with it every architecture takes model.dropout, so one search space fits them all.
    """

    def __init__(self, dropout: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        dropout = check_dropout(dropout)
        # (N, 1, 28, 28) -> (N, 784) -> (N, C)
        self.net = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(28 * 28, self.hparams.num_classes))
