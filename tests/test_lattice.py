"""The dense CRF in PyTorch (crf/lattice.py): the same refinement as pydensecrf, close to the exact dense CRF, a
permutohedral lattice whose kernel behaves as a kernel should, batched images that do not see each other."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crf.pydensecrf_backend import _resize_bilinear, _softmax
from crf.refiner import dense_crf
from crf.lattice import (Buffers, Kernel, Permutohedral, _crf_kernels, dense_crf_torch, dense_crf_torch_shared,
                           kernel_normalizer)

CAMVID_VAL = Path(__file__).resolve().parents[2] / "shared" / "camvid" / "imgs" / "val"
PROTOCOL_SIDE, COCO_CLASSES, SCORE_STRIDE = 320, 27, 8  # evaluation at 320 px, 27 classes, scores at 1/8


def camvid_inputs(index: int, side: int, n_classes: int, stride: int, seed: int = 0):
    """A CamVid validation photo resized to side x side and smooth random class scores at 1/stride resolution."""
    path = sorted(CAMVID_VAL.iterdir())[index]
    image = np.asarray(Image.open(path).convert("RGB").resize((side, side), Image.BILINEAR))
    scores = np.random.default_rng(seed).normal(0, 2, (n_classes, side // stride, side // stride)).astype(np.float32)
    return image, scores


@pytest.mark.parametrize("index", [0, 7])
def test_the_torch_backend_gives_pydensecrf_s_refinement_on_real_photos(index):
    image, scores = camvid_inputs(index, PROTOCOL_SIDE, COCO_CLASSES, SCORE_STRIDE)
    ours, theirs = dense_crf(image, scores, backend="torch"), dense_crf(image, scores)
    assert (ours.argmax(0) == theirs.argmax(0)).mean() >= 0.999
    assert np.abs(ours - theirs).max() < 1e-3


def exact_dense_crf(image: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The same CRF without a lattice: every pair of pixels, Gaussian kernels exp(-|f_i - f_j|^2 / 2) on the
    scaled features (each pixel with itself included, as the lattice includes it), symmetric normalisation, float64."""
    height, width = image.shape[:2]
    probs = _softmax(_resize_bilinear(scores, height, width)).reshape(len(scores), -1).T
    unary = -np.log(np.clip(probs, 1e-5, 1.0))
    rows, cols = np.mgrid[0:height, 0:width].reshape(2, -1).astype(np.float64)
    bgr = image[:, :, ::-1].reshape(-1, 3).astype(np.float64)
    kernels = []
    for weight, features in ((3.0, np.stack([cols, rows], 1)),
                             (4.0, np.concatenate([np.stack([cols, rows], 1) / 67, bgr / 3], 1))):
        distance = ((features[:, None, :] - features[None, :, :]) ** 2).sum(-1)
        k = np.exp(-0.5 * distance)
        norm = 1 / np.sqrt(k.sum(1))
        kernels.append((weight, norm[:, None] * k * norm[None, :]))
    q = np.exp(-unary) / np.exp(-unary).sum(1, keepdims=True)
    for _ in range(10):
        energy = -unary + sum(weight * (k @ q) for weight, k in kernels)
        q = np.exp(energy - energy.max(1, keepdims=True))
        q /= q.sum(1, keepdims=True)
    return q.T.reshape(len(scores), height, width)


def test_both_backends_are_close_to_the_exact_dense_crf():
    image, scores = camvid_inputs(3, 36, 5, 4, seed=1)
    exact = exact_dense_crf(image, scores)
    unrefined = _softmax(_resize_bilinear(scores, 36, 36)).argmax(0)
    assert (unrefined == exact.argmax(0)).mean() < 0.8  # the CRF changes many labels
    for backend in ("pydensecrf", "torch"):
        probs = dense_crf(image, scores, backend=backend)
        assert (probs.argmax(0) == exact.argmax(0)).mean() >= 0.95, backend
        assert np.abs(probs - exact).mean() < 0.02, backend


def test_pixels_far_apart_in_feature_space_do_not_interact():
    near = torch.rand(20, 3) * 2
    features = torch.cat([near, near + 100.0])  # two clusters 100 standard deviations apart
    lattice = Permutohedral(features)
    values = torch.cat([torch.rand(20, 4), torch.zeros(20, 4)])
    out = lattice.filter(values)
    assert torch.all(out[20:] == 0) and torch.all(out[:20] > 0)


def test_the_normaliser_counts_identical_pixels():
    one = Permutohedral(torch.tensor([[0.3, -1.2]]))
    many = Permutohedral(torch.tensor([[0.3, -1.2]] * 7))
    single, seven = kernel_normalizer(one, 1, torch.device("cpu")), kernel_normalizer(many, 7, torch.device("cpu"))
    torch.testing.assert_close(seven, single.expand(7, 1) / 7 ** 0.5, rtol=1e-6, atol=0)


def test_the_reverse_blur_is_the_transpose_and_the_filter_is_linear():
    features = torch.rand(200, 5) * 4
    lattice = Permutohedral(features)
    u, v = torch.rand(200, 1), torch.rand(200, 1)
    # blurring the axes one after another is not symmetric; in reverse order it is the transpose (u.Lv = v.L'u)
    torch.testing.assert_close((u * lattice.filter(v)).sum(), (v * lattice.filter(u, reverse=True)).sum(),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(lattice.filter(2 * u + 3 * v), 2 * lattice.filter(u) + 3 * lattice.filter(v),
                               rtol=1e-5, atol=1e-6)


def test_images_of_a_batch_are_refined_as_if_alone():
    inputs = [camvid_inputs(i, 48, 6, 8, seed=i) for i in (1, 2)]
    images = torch.from_numpy(np.stack([image for image, _ in inputs]))
    scores = torch.from_numpy(np.stack([s for _, s in inputs]))
    batch = dense_crf_torch(images, scores)
    for i in range(2):
        torch.testing.assert_close(batch[i], dense_crf_torch(images[i:i + 1], scores[i:i + 1])[0], rtol=0, atol=1e-6)


# Maps refined side by side go through products with more columns than a map alone: the kernels may then pick
# another vector width and add in another order (AVX2 and AVX-512 differ), so float32 results agree to rounding
# (about 1e-6 after ten mean-field steps), not bit for bit.
BATCHED_ATOL = 1e-5


def assert_refined_alike(together: torch.Tensor, alone: torch.Tensor) -> None:
    """Probabilities within BATCHED_ATOL, and the same label at every pixel whose two best classes are further apart
    than the two results may differ."""
    torch.testing.assert_close(together, alone, rtol=0, atol=BATCHED_ATOL)
    top2 = alone.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * BATCHED_ATOL
    assert decided.float().mean() > 0.99  # the claim covers nearly every pixel
    assert torch.equal(together.argmax(1)[decided], alone.argmax(1)[decided])


def test_score_maps_of_the_same_images_share_their_lattices_and_are_refined_as_if_alone():
    image, linear = camvid_inputs(3, 48, 6, 8)
    _, cluster = camvid_inputs(3, 48, 4, 8, seed=7)  # the cluster probe's map: other classes, other scores
    images = torch.from_numpy(image.copy())[None]
    maps = [torch.from_numpy(linear)[None], torch.from_numpy(cluster)[None]]
    shared = dense_crf_torch_shared(images, maps)
    assert [tuple(p.shape) for p in shared] == [(1, 6, 48, 48), (1, 4, 48, 48)]
    for probs, scores in zip(shared, maps):
        assert_refined_alike(probs, dense_crf_torch(images, scores))


def test_maps_of_as_many_classes_are_refined_together_as_if_alone():
    image, linear = camvid_inputs(4, 40, 5, 8)
    _, cluster = camvid_inputs(4, 40, 5, 8, seed=3)  # the evaluation's case: both probes have n_classes
    images = torch.from_numpy(image.copy())[None].expand(2, -1, -1, -1)
    maps = [torch.from_numpy(linear)[None].expand(2, -1, -1, -1), torch.from_numpy(cluster)[None].repeat(2, 1, 1, 1)]
    maps[1][1] = -maps[1][1]  # a second image whose maps differ
    for probs, scores in zip(dense_crf_torch_shared(images, maps), maps):
        assert_refined_alike(probs, dense_crf_torch(images, scores))


def test_one_image_s_position_kernel_filters_a_batch_as_a_lattice_over_the_batch_would():
    images = torch.zeros(3, 24, 20, 3, dtype=torch.uint8)
    position = _crf_kernels(images)[0]
    assert position.per_image and len(position.norm) == 24 * 20
    rows, cols = torch.meshgrid(torch.arange(24.0), torch.arange(20.0), indexing="ij")
    xy = torch.stack([cols.reshape(-1), rows.reshape(-1)], 1).repeat(3, 1)
    batch = Permutohedral(xy, torch.arange(3).repeat_interleave(24 * 20))
    whole = Kernel(batch, kernel_normalizer(batch, len(xy), torch.device("cpu")), position.weight)
    q = torch.rand(3, 24 * 20, 4)  # the same sums; products of other shapes may add them in another order
    torch.testing.assert_close(position.message(q, Buffers(q.device)), whole.message(q, Buffers(q.device)),
                               rtol=1e-6, atol=1e-7)
    assert _crf_kernels(images)[0] is position  # built once per image size and device


def test_a_filter_s_result_does_not_depend_on_what_its_buffers_held():
    lattice = Permutohedral(torch.rand(300, 5) * 3)
    values = torch.rand(300, 6)
    buffers = Buffers(values.device)
    fresh = lattice.filter(values, buffers=buffers).clone()
    for role, shape in (("vertices", (lattice.m, 6)), ("vertices, spare", (lattice.m, 6)), ("pixels", (300, 6))):
        buffers(role, *shape).fill_(float("nan"))
    assert torch.equal(lattice.filter(values, buffers=buffers), fresh)
    assert torch.equal(lattice.filter(values), fresh)


def test_a_lattice_whose_keys_would_overflow_64_bits_is_refused():
    Permutohedral(torch.tensor([[0.0] * 5, [1e3] * 5]))  # spans of 600 to 9000 per coordinate: codes below 2^60
    with pytest.raises(ValueError, match="do not fit in 64 bits"):
        Permutohedral(torch.tensor([[0.0] * 5, [1e4] * 5]))


def test_the_torch_backend_runs_on_the_device(device):
    image, scores = camvid_inputs(5, 64, 7, 8)
    on_device = dense_crf(image, scores, backend="torch", device=str(device))
    np.testing.assert_allclose(on_device, dense_crf(image, scores, backend="torch"), rtol=0, atol=1e-4)
    np.testing.assert_allclose(on_device.sum(0), 1.0, atol=1e-5)


def test_two_maps_of_a_batch_are_refined_on_the_device_as_on_the_cpu(device):
    inputs = [camvid_inputs(i, 48, 6, 8, seed=i) for i in (2, 6)]
    images = torch.from_numpy(np.stack([image for image, _ in inputs]))
    maps = [torch.from_numpy(np.stack([s for _, s in inputs])), torch.from_numpy(np.stack([-s for _, s in inputs]))]
    on_cpu = dense_crf_torch_shared(images, maps)
    for _ in range(2):  # the second time with the device's position lattice kept from the first
        on_device = dense_crf_torch_shared(images.to(device), [m.to(device) for m in maps])
        for ours, reference in zip(on_device, on_cpu):
            assert ours.device.type == device.type
            torch.testing.assert_close(ours.cpu(), reference, rtol=0, atol=1e-4)


def test_an_unknown_backend_is_refused():
    image, scores = camvid_inputs(0, 16, 2, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        dense_crf(image, scores, backend="cuda")
