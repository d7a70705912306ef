import math

import numpy as np
import pytest
from PIL import Image

from engine.plots import (GRID_DPI, LEGEND_ROW_INCHES, PANEL_INCHES, TITLE_INCHES, colorize, legend_columns,
                             per_class_iou_figure, save_segmentation_grid)

COLORS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
NAMES = ["sky", "tree", "road"]


def grid_row(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(-1, 3, (12, 16))
    return {"image": rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), "ground truth": labels,
            "cluster": labels, "cluster + CRF": labels}


def test_colorize_paints_each_class_with_its_palette_colour():
    assert colorize(np.array([[0, 1, 2]]), COLORS).tolist() == [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]]


def test_colorize_draws_minus_one_and_out_of_range_ids_black():
    assert colorize(np.array([[-1, 3, 7]]), COLORS).tolist() == [[[0, 0, 0]] * 3]


def test_segmentation_grid_is_a_png_of_the_expected_size(tmp_path):
    path = tmp_path / "grid.png"
    save_segmentation_grid(path, [grid_row(0), grid_row(1)], NAMES, COLORS)
    legend_rows = -(-len(NAMES) // legend_columns(4))
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == (round(4 * PANEL_INCHES * GRID_DPI),
                            round((TITLE_INCHES + 2 * PANEL_INCHES + legend_rows * LEGEND_ROW_INCHES) * GRID_DPI))


def test_segmentation_grid_rejects_rows_with_different_entries(tmp_path):
    other = grid_row(1)
    del other["cluster"]
    with pytest.raises(ValueError, match="every row"):
        save_segmentation_grid(tmp_path / "grid.png", [grid_row(0), other], NAMES, COLORS)


def test_curves_of_a_run_are_drawn_from_its_log(tmp_path):
    from engine.plots import save_curves

    records = [{"type": "train", "iter": i, "loss": 10.0 - i, "ppap": 9.0 - i, "linear": 1.0, "cluster": -0.1,
                "num_pos": 5.0, "num_neg": 50.0, "lr": 1e-3, "grad_norm": None if i == 3 else 2.0} for i in range(1, 6)]
    records.append({"type": "val", "iter": 5, "Cluster_mIoU": 20.0, "Cluster_Accuracy": 50.0, "Linear_mIoU": 25.0,
                    "Linear_Accuracy": 60.0})
    save_curves(records, tmp_path / "curves.png")  # null values (a skipped fp16 step's gradient norm) are left out
    image = np.asarray(Image.open(tmp_path / "curves.png"))
    assert image.shape[0] > 500 and image.shape[1] > 600 and image.std() > 0


def test_per_class_iou_bars_are_the_values_before_and_after_crf():
    no_crf = {"cluster": {"sky": 80.0, "road": math.nan}, "linear": {"sky": 60.0, "road": 40.0}}
    crf = {"cluster": {"sky": 85.0, "road": 10.0}, "linear": {"sky": 62.0, "road": 44.0}}
    fig = per_class_iou_figure(no_crf, crf)
    ax = fig.axes[0]
    heights = [round(p.get_height(), 6) for p in ax.patches]  # bars by series, each over the classes
    assert heights == [80.0, 0.0, 85.0, 10.0, 60.0, 40.0, 62.0, 44.0]  # a class without IoU has no bar
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["cluster (mIoU 80.00)", "cluster + CRF (mIoU 47.50)", "linear (mIoU 50.00)",
                      "linear + CRF (mIoU 53.00)"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sky", "road"]
