"""Labelled datasets read an image's pixels as stored, whatever its EXIF orientation says: labels (COCO's among them)
are drawn on the stored pixels. predict.py turns photos as viewers show them (tests/test_predict.py)."""
import numpy as np
from PIL import ExifTags, Image

from dataset import build_dataset
from config import DatasetConfig

ROTATE_TO_DISPLAY = 6  # EXIF orientation of a phone's portrait shot: stored turned a quarter


def test_a_labelled_dataset_reads_a_tagged_jpeg_as_stored(tmp_path):
    for folder in ("imgs/val", "labels/val"):
        (tmp_path / folder).mkdir(parents=True)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = ROTATE_TO_DISPLAY
    stored = np.zeros((48, 64, 3), np.uint8)
    stored[:, :32] = 255  # the left half white, as stored
    Image.fromarray(stored).save(tmp_path / "imgs" / "val" / "0.jpg", exif=exif, quality=100)
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(tmp_path / "labels" / "val" / "0.png")
    cfg = DatasetConfig(data_type="directory", data_path=str(tmp_path), n_classes=3)
    image, label = build_dataset(cfg, "val").load(0)
    assert image.size == (64, 48) and label.shape == (48, 64)
    assert np.abs(np.asarray(image, np.int16) - stored).max() < 8  # JPEG's rounding; a quarter turn differs by 255
