import matplotlib
import torch
from torch.utils.tensorboard import SummaryWriter

from mnist_lab.figures import confusion_figure, curves_figure, digit_grid, drawing, plot_curves


def write_scalars(log_dir, series: dict[str, list[tuple[int, float]]]) -> None:
    with SummaryWriter(str(log_dir)) as writer:
        for tag, points in series.items():
            for step, value in points:
                writer.add_scalar(tag, value, step)


def plotted(ax) -> list[tuple[float, float]]:
    return [tuple(point) for line in ax.get_lines() for point in line.get_xydata().tolist()]


def test_curves_show_the_logged_training_loss_and_validation(tmp_path):
    write_scalars(
        tmp_path,
        {
            "train/loss": [(99, 0.875), (199, 0.5)],
            "train/loss_epoch": [(199, 0.75)],
            "val/loss": [(199, 0.375)],
            "val/acc": [(199, 0.875)],
        },
    )
    training, val_loss, val_acc = curves_figure(tmp_path).axes
    assert plotted(training) == [(99, 0.875), (199, 0.5)]  # the steps' values, not the epoch's mean
    assert plotted(val_loss) == [(199, 0.375)] and plotted(val_acc) == [(199, 0.875)]


def test_a_run_shorter_than_the_logging_interval_shows_its_epochs_training_loss(tmp_path):
    write_scalars(tmp_path, {"train/loss_epoch": [(9, 0.75), (19, 0.5)], "val/acc": [(9, 0.75), (19, 0.875)]})
    training = curves_figure(tmp_path).axes[0]
    assert plotted(training) == [(9, 0.75), (19, 0.5)]
    assert plot_curves(tmp_path).stat().st_size > 1000


def test_the_confusion_matrix_prints_every_nonzero_count():
    matrix = torch.tensor([[5, 0], [2, 7]])
    (ax,) = confusion_figure(matrix).axes  # no colorbar beside it: the counts say it
    assert sorted(text.get_text() for text in ax.texts) == ["2", "5", "7"]


def test_digit_grids_title_every_digit():
    fig = digit_grid(torch.rand(10, 1, 28, 28), [f"{i} (true {i})" for i in range(10)], columns=4)
    assert [text.get_text() for text in fig.axes[0].texts] == [f"{i} (true {i})" for i in range(10)]


def test_figures_are_drawn_with_unhinted_text_and_matplotlibs_settings_are_left_as_they_were():
    before = matplotlib.rcParams["text.hinting"]
    with drawing():
        assert matplotlib.rcParams["text.hinting"] == "none"
    assert matplotlib.rcParams["text.hinting"] == before
