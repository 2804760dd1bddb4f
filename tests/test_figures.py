import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter

from mnist_lab.figures import (
    GAP,
    SCALE,
    TITLE_ROWS,
    confusion_figure,
    count_labels,
    curves_figure,
    digit_grid,
    drawing,
    mistakes_figure,
    plot_curves,
    to_image,
)


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


def test_the_confusion_matrix_prints_every_nonzero_count_where_its_cell_is():
    matrix = torch.tensor([[5, 0], [2, 7]])
    fig = Figure(figsize=(5.4, 5))
    ax = fig.subplots()
    ax.imshow(matrix.numpy(), cmap="Blues")
    chart = to_image(fig)
    labels = count_labels(ax, matrix, chart.height)
    assert [(text, colour) for _, _, text, colour in labels] == [("5", "white"), ("2", "black"), ("7", "white")]
    (x5, y5), (x2, y2) = (labels[0][:2], labels[1][:2])
    assert x2 == pytest.approx(x5) and y2 > y5  # the true label 1 row below row 0, in the same column
    drawn = np.asarray(confusion_figure(matrix)).astype(int)
    plain = Figure(figsize=(5.4, 5))
    ax = plain.subplots()
    ax.imshow(matrix.numpy(), cmap="Blues")
    ax.set(xticks=range(2), yticks=range(2), xlabel="predicted", ylabel="true")
    ax.set_title("confusion matrix (test)", y=1.0)
    plain.subplots_adjust(left=0.1, right=0.97, bottom=0.1, top=0.93)
    changed = np.abs(drawn - np.asarray(to_image(plain)).astype(int)).sum(2) > 0
    ax_labels = count_labels(ax, matrix, drawn.shape[0])
    for x, y, _, _ in ax_labels:  # ink within a few pixels of each nonzero cell's centre, and only there
        assert changed[round(y) - 4 : round(y) + 5, round(x) - 4 : round(x) + 5].any()
    empty_x, empty_y = ax.transData.transform((1, 0))  # the cell of the zero count
    assert not changed[
        round(drawn.shape[0] - empty_y) - 10 : round(drawn.shape[0] - empty_y) + 10,
        round(empty_x) - 10 : round(empty_x) + 10,
    ].any()


def test_digit_grids_show_every_digit_in_its_own_gray_range_under_its_title():
    dim, bright = torch.full((1, 1, 28, 28), -0.4), torch.full((1, 1, 28, 28), 2.8)
    dim[..., :14], bright[..., :14] = -0.5, 2.0  # one digit dark, one bright: each half black, half white
    images = torch.cat([dim, bright, torch.rand(8, 1, 28, 28)])
    grid = np.asarray(digit_grid(images, [f"{i} (true {i})" for i in range(9)] + [""], columns=4))
    rows, cell_h = 3, 28 * SCALE + TITLE_ROWS
    cell_w = grid.shape[1] // 4
    assert grid.shape[0] == rows * cell_h and cell_w >= 28 * SCALE + GAP
    left = (cell_w - 28 * SCALE) // 2
    for i in (0, 1):
        digit = grid[TITLE_ROWS:cell_h, i * cell_w + left : i * cell_w + left + 28 * SCALE]
        assert digit[:, : 14 * SCALE].max() == 0 and digit[:, 14 * SCALE :].min() == 255
    titles = [
        grid[r * cell_h : r * cell_h + TITLE_ROWS, c * cell_w : (c + 1) * cell_w] for r in range(3) for c in range(4)
    ]
    assert [bool((band < 128).any()) for band in titles] == [True] * 9 + [False] * 3  # an empty title, then no digits
    assert (grid[2 * cell_h :, 2 * cell_w :] == 255).all()  # no digit where there are none


def test_a_digit_grids_cells_are_as_wide_as_its_longest_title():
    short = digit_grid(torch.rand(2, 1, 28, 28), ["1", "2"], columns=2)
    long = digit_grid(torch.rand(2, 1, 28, 28), ["1", "9 (100%), true 4 and more"], columns=2)
    assert short.width == 2 * (28 * SCALE + GAP) and long.width > short.width


def test_figures_and_images_become_the_same_kind_of_picture():
    matrix = confusion_figure(torch.eye(3, dtype=torch.long))
    assert matrix.mode == "RGB" and matrix.size == (540, 500)  # 5.4 x 5 inches at 100 dpi
    grid = digit_grid(torch.rand(1, 1, 28, 28), ["7"])
    assert to_image(grid) is grid


def test_figures_are_drawn_with_unhinted_text_and_matplotlibs_settings_are_left_as_they_were():
    before = matplotlib.rcParams["text.hinting"]
    with drawing():
        assert matplotlib.rcParams["text.hinting"] == "none"
    assert matplotlib.rcParams["text.hinting"] == before


def test_a_mistake_made_with_near_certainty_never_reads_100_percent(monkeypatch):
    drawn = []
    monkeypatch.setattr("mnist_lab.figures.digit_grid", lambda images, titles: drawn.extend(titles))
    mistakes_figure(torch.rand(2, 1, 28, 28), torch.tensor([1, 3]), torch.tensor([6, 5]), torch.tensor([0.996, 0.5]))
    assert drawn == ["1 (99%), true 6", "3 (50%), true 5"]
