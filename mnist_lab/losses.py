"""The loss functions of conf/loss/ beyond torch.nn's own: the notebook's, and label smoothing by
its one setting. Each takes the model's logits and the labels."""

import torch
import torch.nn.functional as F
from torch import nn

from mnist_lab.errors import InputError, is_number


class LogSoftmaxNLL(nn.Module):
    """The notebook's loss: its models end in log_softmax and train with F.nll_loss. mnist_lab's
    models return logits, so the log-softmax is taken here; the value is cross-entropy's, in two steps."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(F.log_softmax(logits, dim=1), target)


class LabelSmoothing(nn.CrossEntropyLoss):
    """Cross-entropy against targets that give `smoothing` of their weight to the other classes
    evenly (Szegedy et al. 2016): the model is not pushed to ever larger logits."""

    def __init__(self, smoothing: float = 0.1) -> None:
        if not is_number(smoothing) or not 0 <= smoothing < 1:
            raise InputError(f"loss.smoothing must be in [0, 1), got {smoothing!r}: pass e.g. loss.smoothing=0.1")
        super().__init__(label_smoothing=float(smoothing))
        self.smoothing = float(smoothing)
