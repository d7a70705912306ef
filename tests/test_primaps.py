"""Principal mask proposals (engine/primaps.py) against a direct computation, and the pseudo-labels they give
(``self_training.masks: "primaps"``): each mask takes the teacher's majority cluster, the background is ignored."""
import numpy as np
import pytest
import torch

from config import SelfTrainingConfig
from dataset.classes import IGNORE
from engine.primaps import COVERAGE, SHARPNESS, principal_masks, vote
from engine.self_training import SelfTraining


def direct_masks(code: np.ndarray, threshold: float) -> np.ndarray:
    """PriMaPs written out in float64 numpy, pixel by pixel where it can be."""
    c, h, w = code.shape
    unit = code / np.maximum(np.linalg.norm(code, axis=0, keepdims=True), 1e-12)
    free = np.ones((h, w), bool)
    masks = []
    while 1 - free.mean() < COVERAGE:
        rows = np.array([code[:, y, x] for y in range(h) for x in range(w) if free[y, x]])
        direction = np.linalg.svd(rows - rows.mean(0))[2][0]
        best, seed = -1.0, None
        for y in range(h):
            for x in range(w):
                if free[y, x] and abs(direction @ unit[:, y, x]) > best:
                    best, seed = abs(direction @ unit[:, y, x]), (y, x)
        mask = np.zeros((h, w))
        for y in range(h):
            for x in range(w):
                if free[y, x]:
                    s = 1.0 if (y, x) == seed else unit[:, seed[0], seed[1]] @ unit[:, y, x]
                    mask[y, x] = s if s >= threshold else 0.0
        masks.append(mask)
        free &= mask <= 0
    reflect = lambda i, n: -i if i < 0 else (2 * (n - 1) - i if i >= n else i)  # noqa: E731
    filtered = np.array([[[np.median([m[reflect(y + dy, h), reflect(x + dx, w)] for dy in (-1, 0, 1)
                                      for dx in (-1, 0, 1)]) for x in range(w)] for y in range(h)] for m in masks])
    filtered = np.clip(filtered * SHARPNESS, 0, 1)
    level = filtered[filtered != 0].mean() if (filtered != 0).any() else 0.0
    background = np.clip(level - filtered.sum(0), 0, 1)
    return np.concatenate([background[None], filtered])


@pytest.mark.parametrize("threshold", [0.4, 0.7])
def test_the_principal_masks_are_primaps_written_out(threshold):
    g = torch.Generator().manual_seed(3)  # a smooth random code, as features are: masks of more than a patch
    code = torch.nn.functional.interpolate(torch.randn(1, 6, 3, 4, generator=g), (7, 9), mode="bilinear")[0]
    code = code + 0.05 * torch.randn(code.shape, generator=g)
    masks = principal_masks(code, threshold)
    expected = direct_masks(code.double().numpy(), threshold)
    assert masks.shape == expected.shape and masks.shape[0] > 2
    np.testing.assert_allclose(masks.numpy(), expected, rtol=0, atol=1e-5)


def regions_code(noise: float = 0.05) -> torch.Tensor:
    """A 4 x 8 x 8 code of three regions, each along its own direction: left half, top right, bottom right."""
    g = torch.Generator().manual_seed(0)
    code = torch.zeros(4, 8, 8)
    code[0, :, :4], code[1, :4, 4:], code[2, 4:, 4:] = 1.0, 1.0, 1.0
    return code + noise * torch.randn(code.shape, generator=g)


def test_a_mask_is_proposed_for_each_region_and_the_median_filter_takes_the_corners():
    masks = principal_masks(regions_code())
    assert masks.shape[0] == 4  # the background and three masks
    ids = masks.argmax(0)
    regions = torch.zeros(8, 8, dtype=torch.long)
    regions[:4, 4:], regions[4:, 4:] = 1, 2
    mask_of = [int(ids[regions == r].mode().values) for r in range(3)]
    assert sorted(mask_of) == [1, 2, 3]
    expected = torch.tensor(mask_of)[regions]
    expected[3:5, 4] = 0  # where the three regions meet, 4 of the 9 neighbours are of the pixel's region
    assert ids.tolist() == expected.tolist()


def test_each_mask_takes_the_majority_cluster_inside_it_smallest_on_a_tie():
    masks = torch.tensor([[0, 1, 1, 1], [2, 2, 3, 3]])
    clusters = torch.tensor([[4, 0, 2, 2], [1, 3, 0, 1]])
    assert vote(masks, clusters, 5).tolist() == [[IGNORE, 2, 2, 2], [1, 1, 0, 0]]


def test_the_mask_pseudo_labels_fill_each_mask_with_its_clusters_majority():
    """Without the CRF: the masks' softmax upsampled to the image; the left region, 70 % cluster 2 in the teacher's
    map, is all cluster 2; the pixels below the confidence are ignored."""
    code = regions_code()[None]
    inner = torch.zeros(1, 3, 32, 32)
    inner[0, 1] = 1.0  # cluster 1 everywhere ...
    inner[0, 2, :, :11] = 2.0  # ... but cluster 2 on 11 of the left region's 16 columns
    img = torch.zeros(1, 3, 32, 32)
    with SelfTraining(SelfTrainingConfig(masks="primaps"), None, {}, is_direct=False) as st:
        pseudo = st.mask_labels(code, inner, img)
    assert pseudo.labels.shape == pseudo.confidence.shape == (1, 32, 32)
    assert (pseudo.labels[0, :, :14] == 2).all()
    assert (pseudo.labels[0, :10, 20:] == 1).all() and (pseudo.labels[0, 22:, 20:] == 1).all()
    scores = torch.log_softmax(principal_masks(code[0]), 0)
    probs = torch.softmax(torch.nn.functional.interpolate(scores[None], (32, 32), mode="bilinear"), 1)[0]
    np.testing.assert_allclose(pseudo.confidence[0].numpy(), probs.max(0).values.numpy(), rtol=0, atol=1e-6)
    threshold = float(pseudo.confidence.median())
    with SelfTraining(SelfTrainingConfig(masks="primaps", confidence=threshold), None, {}, is_direct=False) as st:
        cut = st.mask_labels(code, inner, img)
    assert ((cut.labels == IGNORE) == (pseudo.confidence < threshold)).all()
