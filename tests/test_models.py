import re

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mnist_lab.errors import InputError
from mnist_lab.models import CNN, MLP, LeNet, SoftmaxRegression

# Parameter counts worked out by hand from the layer sizes.
ARCHITECTURES = [
    (SoftmaxRegression, {}, 784 * 10 + 10),
    (MLP, {}, (784 * 512 + 512) + (512 * 256 + 256) + (256 * 10 + 10)),
    (MLP, {"hidden_sizes": [100]}, (784 * 100 + 100) + (100 * 10 + 10)),
    # conv 6@5x5, conv 16@5x5 on 6 channels, then 400 -> 120 -> 84 -> 10
    (LeNet, {}, (6 * 25 + 6) + (16 * 6 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)),
    # per block two 3x3 convs without bias, each followed by batch norm (2 parameters a channel)
    (
        CNN,
        {"channels": [8, 16]},
        (1 * 8 * 9 + 16) + (8 * 8 * 9 + 16) + (8 * 16 * 9 + 32) + (16 * 16 * 9 + 32) + (16 * 10 + 10),
    ),
]


@pytest.mark.parametrize("cls, kwargs, n_params", ARCHITECTURES)
def test_shapes_parameters_and_gradients(cls, kwargs, n_params):
    torch.manual_seed(0)
    model = cls(**kwargs)
    assert sum(p.numel() for p in model.parameters()) == n_params
    x = torch.randn(5, 1, 28, 28)
    logits = model(x)
    assert logits.shape == (5, 10)
    nn.functional.cross_entropy(logits, torch.arange(5)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_lenet_layers_follow_lecun_1998():
    convs = [m for m in LeNet().modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 6, (5, 5), (2, 2)),
        (6, 16, (5, 5), (0, 0)),
    ]
    linears = [m for m in LeNet().modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(400, 120), (120, 84), (84, 10)]


@pytest.mark.parametrize("cls", [MLP, LeNet])
def test_activation_and_dropout_are_configurable(cls):
    model = cls(activation="Tanh", dropout=0.3)
    assert any(isinstance(m, nn.Tanh) for m in model.modules())
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.3}


def test_unknown_activation_is_refused():
    with pytest.raises(InputError, match="model.activation=Swoosh: not a torch.nn activation"):
        LeNet(activation="Swoosh")


@pytest.mark.parametrize("lr", [0, -0.1])
def test_learning_rate_must_be_positive(lr):
    with pytest.raises(InputError, match="optimizer.lr must be > 0"):
        LeNet(optimizer={"_target_": "torch.optim.SGD", "lr": lr})


def test_hyperparameters_are_plain_data():
    model = MLP(hidden_sizes=[64, 32], optimizer={"_target_": "torch.optim.Adam", "lr": 0.01})
    assert dict(model.hparams) == {
        "hidden_sizes": [64, 32],
        "activation": "ReLU",
        "dropout": 0.2,
        "num_classes": 10,
        "optimizer": {"_target_": "torch.optim.Adam", "lr": 0.01},
        "scheduler": None,
        "loss": None,
    }


def test_cnn_blocks_pool_between_them_and_normalize_every_conv():
    model = CNN(channels=[16, 32, 64], dropout=0.2)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (1, 16),
        (16, 16),
        (16, 32),
        (32, 32),
        (32, 64),
        (64, 64),
    ]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 6
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2  # 28 -> 14 -> 7
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.2]


def test_on_a_cpu_convolution_weights_turn_channels_last_and_the_outputs_stay_the_same():
    model = LeNet().eval()
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.validate(
        model, DataLoader(TensorDataset(x, torch.zeros(16, dtype=torch.long)), batch_size=16), verbose=False
    )
    assert model.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model.net[7].weight.is_contiguous()  # a Linear's weights stay as they are
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


@pytest.mark.parametrize(
    "model, override, message",
    [
        ("softmax", "model.dropout=1.0", "model.dropout=1.0: give a probability from 0 up to, not including, 1"),
        ("softmax", "model.dropout=nan", "model.dropout=nan: give a probability"),
        ("lenet", "model.dropout=-0.1", "model.dropout=-0.1: give a probability"),
        ("cnn", "model.dropout=abc", "model.dropout=abc: give a probability"),
        ("mlp", "model.hidden_sizes=[0]", "model.hidden_sizes=[0]: give a list of 0 to 32 whole numbers from 1 to"),
        ("mlp", "model.hidden_sizes=[1.5]", "model.hidden_sizes=[1.5]: give a list"),
        ("mlp", "model.hidden_sizes=512", "model.hidden_sizes=512: give a list"),
        ("mlp", "model.hidden_sizes=[100000000]", "model.hidden_sizes=[100000000]: give a list"),
        ("mlp", "model.activation=Module", "model.activation=Module: not a torch.nn activation"),
        ("mlp", "model.activation=Linear", "model.activation=Linear: not a torch.nn activation"),
        ("lenet", "model.activation=Threshold", "model.activation=Threshold needs arguments"),
        ("mlp", "model.activation=Softmax2d", "model.activation=Softmax2d does not work on a layer's outputs"),
        ("lenet", "model.activation=GLU", "model.activation=GLU does not work on a layer's outputs"),
        ("lenet", "model.activation=3", "model.activation=3: not a torch.nn activation"),
        ("cnn", "model.channels=[]", "model.channels=[]: give a list of 1 to 5 whole numbers"),
        ("cnn", "model.channels=[8,8,8,8,8,8]", "model.channels=[8, 8, 8, 8, 8, 8]: give a list of 1 to 5"),
        ("cnn", "model.channels=[-1]", "model.channels=[-1]: give a list"),
        ("softmax", "+model.num_classes=5", "model.num_classes=5, but MNIST has 10 classes"),
        ("softmax", "+model.num_classes=1", "model.num_classes=1: give the data set's number of classes"),
    ],
)
def test_every_model_option_out_of_range_is_refused_in_one_line_naming_it(model, override, message, make_cfg):
    from mnist_lab.recipe import build

    with pytest.raises(InputError, match=re.escape(message)) as refused:
        build(make_cfg(f"model={model}", override))
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("override", ["model.hidden_sizes=[]", "model.activation=GELU", "model.dropout=0.99"])
def test_unusual_but_sound_model_options_are_taken(override, make_cfg):
    from mnist_lab.recipe import build

    build(make_cfg("model=mlp", override))
