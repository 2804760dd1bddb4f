"""mnist_lab: train, compare and sweep small vision models on MNIST-class data."""
