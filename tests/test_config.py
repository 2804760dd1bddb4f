import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mnist_lab.defaults import MNIST_MEAN, MNIST_STD, default_data_dir
from tests.conftest import ARCHITECTURES, ROOT, run_train

GROUPS = [
    "data",
    "augment",
    "model",
    "optimizer",
    "loss",
    "scheduler",
    "trainer",
    "logger",
    "callbacks",
    "experiment",
    "sweep",
]
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((ROOT / "conf" / group).glob("*.yaml"))]


def test_every_group_has_options():
    assert {group for group, _ in OPTIONS} == set(GROUPS)


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_builds(group, option, make_cfg, synthetic_dir, tmp_path):
    cfg = make_cfg(f"{group}={option}", f"data.data_dir={synthetic_dir}")
    OmegaConf.resolve(cfg)  # every interpolation resolves
    instantiate(cfg.data, _recursive_=False, _convert_="all")  # as mnist_lab.recipe.run does
    model = instantiate(
        cfg.model, optimizer=cfg.optimizer, scheduler=cfg.scheduler, loss=cfg.loss, _recursive_=False, _convert_="all"
    )
    assert isinstance(model.hparams.optimizer, dict) and isinstance(model.hparams.scheduler, dict)
    assert isinstance(model.hparams.loss, dict) and model.criterion(torch.randn(4, 10), torch.arange(4)).ndim == 0
    from pytorch_lightning.loggers import TensorBoardLogger

    from mnist_lab.loggers import build_loggers

    assert isinstance(build_loggers(cfg, tmp_path, {}, "run")[0], TensorBoardLogger)
    for callback in cfg.callbacks.values():
        instantiate(callback)
    if cfg.trainer.accelerator != "gpu" or torch.cuda.is_available():  # trainer=gpu's refusal: test_train.py
        instantiate(cfg.trainer, logger=False)


def test_defaults_are_the_tuned_ones(make_cfg):
    cfg = make_cfg()
    assert cfg.model._target_ == "mnist_lab.models.LeNet"
    assert (cfg.data.batch_size, cfg.data.eval_batch_size, cfg.data.val_size) == (64, 500, 5000)
    assert (cfg.data.mean, cfg.data.std, cfg.seed) == (MNIST_MEAN, MNIST_STD, 1)  # the code's defaults, one source
    assert cfg.data.data_dir == str(default_data_dir())
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.lr == 0.05
    assert cfg.scheduler.max_lr == cfg.optimizer.lr
    assert cfg.trainer.log_every_n_steps == 100


def test_notebook_experiment_has_the_notebooks_settings(make_cfg):
    cfg = make_cfg("experiment=notebook")
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.nesterov, cfg.optimizer.weight_decay) == (
        0.001,
        0.5,
        False,
        0.0,
    )
    assert (cfg.data.batch_size, cfg.data.eval_batch_size, cfg.seed) == (64, 1000, 1)
    assert cfg.scheduler.factor == 1.0  # a constant learning rate
    assert (cfg.trainer.max_epochs, cfg.trainer.log_every_n_steps) == (10, 100)
    assert cfg.loss._target_ == "mnist_lab.losses.LogSoftmaxNLL"  # log_softmax then F.nll_loss


def test_data_dir_defaults_to_the_environment_variable(make_cfg, monkeypatch):
    monkeypatch.setenv("MNIST_LAB_DATA", "/somewhere/datasets")
    assert make_cfg().data.data_dir == "/somewhere/datasets"
    monkeypatch.delenv("MNIST_LAB_DATA")
    assert make_cfg().data.data_dir == "data"
    assert make_cfg("data.data_dir=/else").data.data_dir == "/else"


def test_help_lists_the_groups():
    result = run_train("--help")
    assert result.returncode == 0
    for line in [
        "model: cnn, lenet, mlp, softmax",
        "augment: affine, none",
        "optimizer: adadelta, adam, adamw, rmsprop, sgd",
        "scheduler: cosine, none, onecycle, step",
        "trainer: cpu, ddp, ddp_cpu, default, gpu",
        "data: fashion_mnist, mnist",
    ]:
        assert line in result.stdout


@pytest.mark.parametrize(
    "override, line",
    [
        ("model=foo", f"Error: model=foo: no such option in conf/model/ (the options: {', '.join(ARCHITECTURES)})"),
        (
            "optimizer=adamx",
            "Error: optimizer=adamx: no such option in conf/optimizer/; did you mean optimizer=adam? "
            "(the options: adadelta, adam, adamw, rmsprop, sgd)",
        ),
    ],
)
def test_unknown_option_lists_the_valid_ones(override, line, tmp_path):
    result = run_train(override, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 1
    assert result.stderr.strip() == line  # one line, no traceback
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    "override, line",
    [
        ("trainer.max_epoch=1", "Error: trainer.max_epoch: no such option; did you mean trainer.max_epochs?"),
        ("data.batchsize=8", "Error: data.batchsize: no such option; did you mean data.batch_size?"),
        (
            "model.widht=8",
            "Error: model.widht: no such option (model has activation, dropout); "
            "python train.py --cfg job shows the whole config",
        ),
        (
            "model=[a",
            "Error: model=[a: not an override that Hydra's grammar reads (no viable alternative at input '[a'): "
            "quote values that hold brackets, commas or spaces, e.g. 'model.channels=[8,16]'",
        ),
    ],
)
def test_a_misspelled_option_gets_the_nearest_real_one_not_hydras_plus(override, line, capsys):
    from mnist_lab.api import main

    with pytest.raises(SystemExit) as exited:
        main([override])
    assert exited.value.code == line
    assert "+" not in line
