"""The image/label transforms against STEGO's pipeline, rebuilt here from torchvision pieces."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from dataset import build_dataset
from dataset.transforms import EVAL_RES, IMAGENET_MEAN, IMAGENET_STD, PairTransform, eval_transform, train_transform
from tests.conftest import tiny_options
from config import load_config
from utils.errors import ConfigError


def _image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _stego_image_pipeline(res: int, crop) -> T.Compose:
    """STEGO's get_transform(res, is_label=False, crop_type)."""
    cropper = {"center": T.CenterCrop(res), "random": T.RandomCrop(res), None: T.Lambda(lambda x: x)}[crop]
    size = (res, res) if crop is None else res
    return T.Compose([T.Resize(size, T.InterpolationMode.NEAREST), cropper, T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@pytest.mark.parametrize("crop", ["center", None])
def test_image_output_equals_stegos_pipeline(crop):
    image = _image(30, 44)
    ours, _ = PairTransform(16, crop)(image, np.zeros((30, 44), dtype=np.int64))
    assert torch.equal(ours, _stego_image_pipeline(16, crop)(image))


def test_random_crop_equals_stegos_pipeline_under_the_same_seed():
    image = _image(30, 44)
    torch.manual_seed(3)
    ours, _ = PairTransform(16, "random")(image, np.zeros((30, 44), dtype=np.int64))
    torch.manual_seed(3)
    assert torch.equal(ours, _stego_image_pipeline(16, "random")(image))


def test_label_output_equals_stegos_nearest_resize_and_center_crop():
    label = np.random.default_rng(1).integers(0, 5, (30, 44)).astype(np.uint8)
    _, ours = PairTransform(16, "center")(_image(30, 44), label.astype(np.int64))
    reference = T.Compose([T.Resize(16, T.InterpolationMode.NEAREST), T.CenterCrop(16)])(Image.fromarray(label))
    assert np.array_equal(ours.numpy(), np.asarray(reference))


@pytest.mark.parametrize("seed", range(4))
def test_random_crop_keeps_image_and_label_aligned(seed):
    torch.manual_seed(seed)
    label = np.random.default_rng(seed).integers(0, 6, (37, 23))
    image = Image.fromarray(np.repeat((label * 40).astype(np.uint8)[..., None], 3, axis=2))
    img, out = PairTransform(12, "random")(image, label)
    red = (img[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255
    assert torch.equal(torch.round(red / 40).long(), out)


def test_ignore_label_survives_the_resize():
    label = np.full((20, 20), 2, dtype=np.int64)
    label[:10] = -1
    _, out = PairTransform(30, "center")(_image(20, 20), label)
    assert set(out.unique().tolist()) == {-1, 2}


def test_label_tensor_is_int64():
    _, out = train_transform(8, "center")(_image(10, 12), np.zeros((10, 12), dtype=np.int64))
    assert out.dtype == torch.int64


def test_null_loader_crop_resizes_to_a_square_without_cropping():
    img, _ = train_transform(16, None)(_image(10, 40), np.zeros((10, 40), dtype=np.int64))
    assert img.shape == (3, 16, 16)


def test_eval_transform_gives_a_320_square():
    img, label = eval_transform()(_image(36, 48), np.zeros((36, 48), dtype=np.int64))
    assert (img.shape, label.shape) == ((3, EVAL_RES, EVAL_RES), (EVAL_RES, EVAL_RES))


def test_the_validation_set_is_cropped_to_eval_res(tiny_data, tmp_path):
    options = tiny_options(tmp_path, tiny_data)
    cfg = load_config(options, ["eval.res=48"])
    item = build_dataset(cfg.dataset, "val", cfg.eval.res)[0]
    assert (item["img"].shape, item["label"].shape) == ((3, 48, 48), (48, 48))
    with pytest.raises(ConfigError, match="eval.res must be >= 1"):
        load_config(options, ["eval.res=0"])


def test_image_is_normalised_with_the_imagenet_statistics():
    image = Image.fromarray(np.full((8, 8, 3), 128, dtype=np.uint8))
    img, _ = PairTransform(8, "center")(image, np.zeros((8, 8), dtype=np.int64))
    expected = torch.tensor([(128 / 255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.allclose(img[:, 0, 0], expected)
