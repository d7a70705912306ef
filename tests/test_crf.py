import multiprocessing
import os
import struct
import threading

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
import torch
import torch.nn.functional as F
from pydensecrf.utils import unary_from_softmax

from crf.pool import CRFError, CRFPool, resolve_workers, usable_cores
from crf.pydensecrf_backend import _resize_bilinear
from crf.refiner import Refiner, dense_crf
from dataset.image import IMAGENET_MEAN, IMAGENET_STD, denormalize_to_uint8


EDGE_COLUMN = 20
SCORE_EDGE_COLUMN = 16


def random_inputs(n: int, size: int = 24, n_classes: int = 4, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
             rng.normal(size=(n_classes, size // 2, size // 2)).astype(np.float32)) for _ in range(n)]


def shifted_boundary_example(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An image with a dark left part and a bright right part from column 20, its labels, and noisy scores whose
    class boundary is a soft ramp centred 4 columns too far left (at column 16)."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((32, 32), dtype=np.int64)
    truth[:, EDGE_COLUMN:] = 1
    image = np.where(truth[..., None] == 1, 200, 40).astype(np.uint8).repeat(3, axis=2)
    ramp = np.broadcast_to((np.arange(32) - (SCORE_EDGE_COLUMN - 0.5)) / 4.0, (32, 32))
    scores = np.stack([-ramp, ramp]) + rng.normal(scale=0.5, size=(2, 32, 32))
    return image, scores.astype(np.float32), truth


def original_dense_crf(image: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """STEGO's dense_crf (src/crf.py) steps on a uint8 RGB image: torch resize and softmax, BGR image."""
    h, w = image.shape[:2]
    logits = F.interpolate(torch.from_numpy(scores)[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    probs = F.softmax(logits, dim=0).numpy()
    crf = dcrf.DenseCRF2D(w, h, probs.shape[0])
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=1, compat=3)
    crf.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(image[:, :, ::-1]), compat=4)
    return np.array(crf.inference(10)).reshape(probs.shape)


def new_children(before: set) -> set:
    return set(multiprocessing.active_children()) - before


@pytest.mark.parametrize("size_in, size_out", [((5, 7), (20, 21)), ((12, 12), (5, 8)), ((6, 6), (6, 6))])
def test_resize_matches_torch_bilinear_without_align_corners(size_in, size_out):
    scores = np.random.default_rng(0).normal(size=(3, *size_in)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(scores)[None], size=size_out, mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(_resize_bilinear(scores, *size_out), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_dense_crf_returns_probabilities_summing_to_one_per_pixel():
    image, scores = random_inputs(1)[0]
    probs = dense_crf(image, scores)
    assert probs.shape == (4, 24, 24) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)


def test_dense_crf_agrees_with_the_original_steps():
    image, scores = random_inputs(1, size=40, n_classes=5, seed=3)[0]
    np.testing.assert_allclose(dense_crf(image, scores), original_dense_crf(image, scores), atol=1e-3)


def test_dense_crf_moves_a_misplaced_noisy_boundary_to_the_image_edge():
    image, scores, truth = shifted_boundary_example()
    assert (scores.argmax(axis=0) == truth).mean() < 0.9
    assert np.array_equal(dense_crf(image, scores).argmax(axis=0), truth)


def test_without_an_image_edge_the_boundary_stays_where_the_scores_put_it():
    image, scores, _ = shifted_boundary_example()
    labels = dense_crf(np.full_like(image, 120), scores).argmax(axis=0)
    assert labels[:, SCORE_EDGE_COLUMN:EDGE_COLUMN].mean() > 0.8


def test_invalid_image_is_rejected():
    image, scores = random_inputs(1)[0]
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        dense_crf(image.astype(np.float32), scores)


def test_pool_gives_exactly_the_serial_result():
    inputs = random_inputs(6)
    with CRFPool(2, output="probs", max_in_flight=2) as pool:
        for index, (image, scores) in enumerate(inputs):
            pool.submit(index, image, scores)
        pooled = list(pool.results())
    assert [index for index, _ in pooled] == list(range(6))
    assert all(np.array_equal(probs, dense_crf(*task)) for (_, probs), task in zip(pooled, inputs))


def test_serial_pool_labels_are_the_argmax_of_dense_crf():
    inputs = random_inputs(3)
    with CRFPool(0) as pool:
        for index, (image, scores) in enumerate(inputs):
            pool.submit(("cluster", index), image, scores)
        results = list(pool.ready())
    assert [key for key, _ in results] == [("cluster", 0), ("cluster", 1), ("cluster", 2)]
    assert all(np.array_equal(labels, dense_crf(*task).argmax(axis=0)) for (_, labels), task in zip(results, inputs))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failing_image_raises_an_error_naming_its_index(workers):
    inputs = random_inputs(5)
    with pytest.raises(CRFError, match="image 3"):
        with CRFPool(workers) as pool:
            for index, (image, scores) in enumerate(inputs):
                pool.submit(index, image[..., 0] if index == 3 else image, scores)
            list(pool.results())


def test_no_worker_is_left_after_a_normal_exit():
    before = set(multiprocessing.active_children())
    with CRFPool(2) as pool:
        for index, (image, scores) in enumerate(random_inputs(4)):
            pool.submit(index, image, scores)
        list(pool.results())
    assert new_children(before) == set()


def test_no_worker_is_left_after_a_worker_error():
    before = set(multiprocessing.active_children())
    with pytest.raises(CRFError):
        with CRFPool(2) as pool:
            for index, (image, scores) in enumerate(random_inputs(4)):
                pool.submit(index, image, scores[0])
            list(pool.results())
    assert new_children(before) == set()


def test_no_worker_is_left_after_keyboard_interrupt_in_the_consumer():
    before = set(multiprocessing.active_children())
    with pytest.raises(KeyboardInterrupt):
        with CRFPool(2, max_in_flight=6) as pool:
            for index, (image, scores) in enumerate(random_inputs(6, size=96, n_classes=16)):
                pool.submit(index, image, scores)
            for _ in pool.results():
                raise KeyboardInterrupt
    assert new_children(before) == set()


def test_a_killed_worker_raises_instead_of_hanging():
    before = set(multiprocessing.active_children())
    with pytest.raises(CRFError, match="terminated abruptly"):
        with CRFPool(2, max_in_flight=4) as pool:
            for index, (image, scores) in enumerate(random_inputs(6, size=128, n_classes=16)):
                pool.submit(index, image, scores)
            next(iter(new_children(before))).kill()
            list(pool.results())
    assert new_children(before) == set()


def test_terminate_returns_when_a_killed_worker_left_half_a_result_in_the_pipe():
    pool = CRFPool(1)
    image, scores = random_inputs(1)[0]
    pool.submit(0, image, scores)
    list(pool.results())  # the pool's manager thread is running and waits for results
    writer = pool._executor._result_queue._writer
    os.write(writer.fileno(), struct.pack("!i", 1000) + b"x" * 10)  # a message of 1000 bytes, cut after 10
    done = threading.Thread(target=pool.terminate, daemon=True)
    done.start()
    done.join(timeout=20)
    assert not done.is_alive()


def test_no_workers_setting_means_the_usable_cores():
    assert resolve_workers(None) == usable_cores() >= 1


def test_denormalize_inverts_the_imagenet_normalisation():
    rgb = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    normalised = (rgb.float() / 255 - mean) / std
    assert np.array_equal(denormalize_to_uint8(normalised), rgb.permute(1, 2, 0).numpy())


def test_submit_after_close_is_an_error():
    pool = CRFPool(0)
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(0, *random_inputs(1)[0])


def refiner_batches(seed: int = 0) -> list[tuple[list[str], torch.Tensor, list[torch.Tensor]]]:
    """Two batches of three images, each image with two score maps (4 and 3 classes, as the two probes give)."""
    rng = np.random.default_rng(seed)
    return [([f"batch{b}-image{j}" for j in range(3)],
             torch.from_numpy(rng.integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)),
             [torch.from_numpy(rng.normal(size=(3, n_classes, 12, 12)).astype(np.float32)) for n_classes in (4, 3)])
            for b in range(2)]


@pytest.mark.parametrize("backend, workers", [("pydensecrf", 2), ("pydensecrf", 0), ("torch", None)])
def test_the_refiner_gives_each_image_the_crf_labels_of_each_of_its_maps_in_submission_order(backend, workers):
    batches = refiner_batches()
    refined = []
    with Refiner(backend, workers) as refiner:
        assert refiner.overlaps_network == (backend == "pydensecrf")
        for keys, images, maps in batches:
            refiner.submit(keys, images, maps)
            refined += refiner.ready()
        refined += refiner.results()
    assert [key for key, _ in refined] == [key for keys, _, _ in batches for key in keys]
    reference = {key: [dense_crf(images[j].numpy(), scores[j].numpy()) for scores in maps]
                 for keys, images, maps in batches for j, key in enumerate(keys)}
    for key, labels in refined:
        assert [tuple(each.shape) for each in labels] == [(24, 24), (24, 24)]
        for each, probs in zip(labels, reference[key]):
            expected = torch.from_numpy(probs.argmax(0))
            if backend == "pydensecrf":  # the same C++ code on the same inputs
                assert torch.equal(each.long(), expected)
            else:  # float rounding in another order: the same label wherever the two best classes are apart
                top2 = torch.from_numpy(probs).topk(2, dim=0).values
                decided = (top2[0] - top2[1]) > 1e-4
                assert decided.float().mean() > 0.99
                assert torch.equal(each.long()[decided], expected[decided])


@pytest.mark.parametrize("backend, workers", [("pydensecrf", 2), ("torch", None)])
def test_the_refiner_gives_the_crf_probabilities_when_asked(backend, workers):
    keys, images, maps = refiner_batches(seed=1)[0]
    with Refiner(backend, workers, output="probs") as refiner:
        refiner.submit(keys, images, maps)
        refined = list(refiner.results())
    assert [key for key, _ in refined] == keys
    for j, (_, probs) in enumerate(refined):
        for each, scores in zip(probs, maps):
            expected = torch.from_numpy(dense_crf(images[j].numpy(), scores[j].numpy()))
            assert each.shape == expected.shape and each.dtype == torch.float32
            # the same C++ code on the same inputs, or the same CRF in torch (test_lattice: within 1e-3)
            torch.testing.assert_close(each, expected, atol=1e-3 if backend == "torch" else 0, rtol=0)


def test_the_refiner_refuses_an_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        Refiner("densecrf")
    with pytest.raises(ValueError, match="output must be one of"):
        Refiner("torch", output="logits")
