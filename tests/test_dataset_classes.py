"""Class tables, names and colour maps."""
import numpy as np
import pytest

from dataset import class_names, color_map, n_classes
from dataset.classes import (COCO_COARSE_NAMES, COCO_FINE_TO_COARSE, LabelTable, directory_table,
                             pascal_color_map)
from config import DatasetConfig
from utils.errors import DataError

FIXED_TYPES = ["cocostuff27", "cocostuff15", "cocostuff3", "cityscapes", "potsdam", "potsdamraw", "demo"]


def _cfg(data_type: str, **kw) -> DatasetConfig:
    return DatasetConfig(data_type=data_type, data_path="unused", **kw)


def test_coco_table_covers_every_fine_id_from_0_to_181():
    assert sorted(COCO_FINE_TO_COARSE) == list(range(182))


def test_every_coarse_coco_class_has_a_fine_id():
    assert set(COCO_FINE_TO_COARSE.values()) == set(range(27))


def test_coco_table_agrees_with_the_standard_table_on_sample_ids():
    # the ids the project issue quotes, plus sky (clouds 105, sky-other 156), plant (grass 123, tree 168), road 148
    expected = {0: 9, 1: 11, 8: 11, 170: 18, 176: 18, 177: 26, 178: 26, 179: 19, 180: 19, 181: 24,
                105: 23, 156: 23, 123: 22, 168: 22, 148: 21}
    assert {fine: COCO_FINE_TO_COARSE[fine] for fine in expected} == expected


def test_cocostuff3_classes_are_sky_plant_ground_in_that_order():
    assert class_names(_cfg("cocostuff3")) == ["sky", "plant", "ground"]


def test_cocostuff15_classes_are_the_stuff_classes():
    assert class_names(_cfg("cocostuff15")) == list(COCO_COARSE_NAMES[12:])


@pytest.mark.parametrize("data_type", FIXED_TYPES)
def test_class_names_are_unique_and_one_per_class(data_type):
    names = class_names(_cfg(data_type))
    assert len(set(names)) == len(names) == n_classes(_cfg(data_type))


def test_directory_classes_are_named_by_index_by_default():
    assert class_names(_cfg("directory", n_classes=2)) == ["class 0", "class 1"]


def test_directory_class_names_come_from_the_config():
    assert class_names(_cfg("directory", n_classes=2, class_names=("cat", "dog"))) == ["cat", "dog"]


@pytest.mark.parametrize("data_type", FIXED_TYPES)
def test_color_map_is_one_uint8_rgb_row_per_class(data_type):
    colors = color_map(_cfg(data_type))
    assert (colors.dtype, colors.shape) == (np.uint8, (n_classes(_cfg(data_type)), 3))


def test_cityscapes_road_has_its_official_colour():
    assert color_map(_cfg("cityscapes"))[0].tolist() == [128, 64, 128]


def test_pascal_color_map_starts_with_the_voc_colours():
    assert pascal_color_map(4).tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]


def test_label_table_names_the_unknown_value_and_the_file():
    with pytest.raises(DataError, match=r"x\.png: label value\(s\) 7 outside"):
        LabelTable({0: 0, 1: 1}, "0..1")(np.array([[0, 7]]), "x.png")


def test_directory_table_rejects_more_classes_than_8_bit_labels_hold():
    with pytest.raises(DataError, match="n_classes must be <= 255"):
        directory_table(256)


@pytest.mark.parametrize("cfg", [_cfg("cocostuff27"), _cfg("potsdam"), _cfg("directory", n_classes=40)])
def test_no_class_is_drawn_black_like_unlabelled_pixels(cfg):
    assert not (color_map(cfg) == 0).all(axis=1).any()
