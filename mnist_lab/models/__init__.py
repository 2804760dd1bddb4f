"""One LightningModule per architecture, all sharing ImageClassifier's training and evaluation."""

from mnist_lab.models.base import ImageClassifier
from mnist_lab.models.cnn import CNN
from mnist_lab.models.lenet import LeNet
from mnist_lab.models.mlp import MLP
from mnist_lab.models.softmax import SoftmaxRegression

__all__ = ["CNN", "MLP", "ImageClassifier", "LeNet", "SoftmaxRegression"]
