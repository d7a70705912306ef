import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment

from engine.metrics import (CLUSTER_PREFIX, CM_BAR_INCHES, CM_CELL_INCHES, CM_DPI, CM_LABEL_INCHES, CM_PAD_INCHES,
                           LINEAR_PREFIX, UnsupervisedMetrics, confusion_matrix_figure, get_metrics,
                           plot_confusion_matrix)


def cluster_metric(n_classes: int, extra: int = 0, legacy: bool = False) -> UnsupervisedMetrics:
    return UnsupervisedMetrics(CLUSTER_PREFIX, n_classes, extra, True, legacy_extra_cluster_mask=legacy)


def linear_metric(n_classes: int) -> UnsupervisedMetrics:
    return UnsupervisedMetrics(LINEAR_PREFIX, n_classes, 0, False)


def scores(metric: UnsupervisedMetrics, preds, target) -> tuple[float, float]:
    metric.update(torch.as_tensor(preds), torch.as_tensor(target))
    result = metric.compute()
    return result[metric.prefix + "mIoU"], result[metric.prefix + "Accuracy"]


def planted(n_classes: int, n_clusters: int, n_pixels: int, noise: float, seed: int) -> tuple[torch.Tensor, ...]:
    """Labels and cluster predictions that follow a random cluster permutation except for a fraction of noise."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(n_classes, (n_pixels,), generator=g)
    permutation = torch.randperm(n_clusters, generator=g)
    noisy = torch.rand(n_pixels, generator=g) < noise
    preds = torch.where(noisy, torch.randint(n_clusters, (n_pixels,), generator=g), permutation[target])
    return preds, target


def reference_confusion(preds, target, n_classes: int, n_clusters: int) -> list[list[int]]:
    counts = [[0] * n_classes for _ in range(n_clusters)]
    for p, t in zip(preds.tolist(), target.tolist()):
        if 0 <= t < n_classes:
            counts[p][t] += 1
    return counts


def brute_force_scores(preds, target, n_classes: int, n_clusters: int) -> tuple[float, float, int]:
    """Pixel loops over every injective class -> cluster assignment; (mIoU, accuracy, number of best assignments)."""
    pixels = [(p, t) for p, t in zip(preds.tolist(), target.tolist()) if 0 <= t < n_classes]
    best, n_best = None, 0
    for clusters in itertools.permutations(range(n_clusters), n_classes):  # clusters[c] = the cluster of class c
        correct = sum(1 for p, t in pixels if p == clusters[t])
        if best is None or correct > best[0]:
            best, n_best = (correct, clusters), 1
        elif correct == best[0]:
            n_best += 1
    correct, clusters = best
    ious = []
    for c in range(n_classes):
        tp = sum(1 for p, t in pixels if p == clusters[c] and t == c)
        fp = sum(1 for p, t in pixels if p == clusters[c] and t != c)
        fn = sum(1 for p, t in pixels if p != clusters[c] and t == c)
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
    return 100 * sum(ious) / len(ious), 100 * correct / len(pixels), n_best


def original_scores(preds, target, n_classes: int, extra_clusters: int) -> tuple[float, float]:
    """STEGO's UnsupervisedMetrics update + compute (compute_hungarian=True), transcribed to compare against."""
    actual, preds = target.reshape(-1), preds.reshape(-1)
    mask = (actual >= 0) & (actual < n_classes) & (preds >= 0) & (preds < n_classes)
    actual, preds = actual[mask], preds[mask]
    n_clusters = n_classes + extra_clusters
    stats = torch.bincount(n_clusters * actual + preds, minlength=n_classes * n_clusters)
    stats = stats.reshape(n_classes, n_clusters).t()
    assignments = linear_sum_assignment(stats, maximize=True)
    if extra_clusters == 0:
        histogram = stats[np.argsort(assignments[1]), :]
    else:
        assignments_t = linear_sum_assignment(stats.t(), maximize=True)
        histogram = stats[assignments_t[1], :]
        missing = list(set(range(n_clusters)) - set(assignments[0]))
        histogram = torch.cat([histogram, stats[missing, :].sum(0, keepdim=True)], dim=0)
        histogram = torch.cat([histogram, torch.zeros(n_classes + 1, 1, dtype=histogram.dtype)], dim=1)
    tp = torch.diag(histogram)
    fp = torch.sum(histogram, dim=0) - tp
    fn = torch.sum(histogram, dim=1) - tp
    iou = tp / (tp + fp + fn)
    return 100 * iou[~torch.isnan(iou)].mean().item(), 100 * (torch.sum(tp) / torch.sum(histogram)).item()


@pytest.mark.parametrize("permutation", [[0, 1, 2], [2, 0, 1], [1, 2, 0], [2, 1, 0]])
def test_perfect_prediction_under_any_cluster_permutation_scores_100(permutation):
    target = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    assert scores(cluster_metric(3), torch.tensor(permutation)[target], target) == (100.0, 100.0)


def test_one_wrong_pixel_gives_the_hand_computed_scores():
    target = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    clusters = torch.tensor([2, 0, 1])[target]  # class 0 -> cluster 2, 1 -> 0, 2 -> 1
    clusters[0] = 0  # one pixel of class 0 put in class 1's cluster
    miou, accuracy = scores(cluster_metric(3), clusters, target)
    # IoU: class 0 3/(3+0+1), class 1 3/(3+1+0), class 2 1
    assert miou == pytest.approx(100 * (0.75 + 0.75 + 1) / 3)
    assert accuracy == pytest.approx(90.0)


def test_pixels_in_an_extra_cluster_count_as_wrong_by_default():
    target = torch.tensor([0, 0, 0, 1, 1])
    miou, accuracy = scores(cluster_metric(2, extra=1), torch.tensor([0, 0, 2, 1, 1]), target)
    assert accuracy == pytest.approx(80.0)
    assert miou == pytest.approx(100 * (2 / 3 + 1) / 2)


def test_legacy_mode_ignores_pixels_predicted_as_an_extra_cluster():
    target = torch.tensor([0, 0, 0, 1, 1])
    assert scores(cluster_metric(2, extra=1, legacy=True), torch.tensor([0, 0, 2, 1, 1]), target) == (100.0, 100.0)


def test_labels_outside_the_classes_are_not_counted():
    metric = cluster_metric(3)
    target = torch.tensor([0, -1, 1, 3, 2, 255])
    metric.update(torch.tensor([1, 2, 0, 0, 2, 1]), target)
    assert int(metric.stats.sum()) == 3


def test_ignored_labels_do_not_change_the_scores():
    target = torch.tensor([0, 0, 1, 2, 2])
    preds = torch.tensor([1, 1, 0, 2, 0])
    with_ignored = scores(cluster_metric(3), torch.cat([preds, torch.tensor([0, 1, 2])]),
                          torch.cat([target, torch.tensor([-1, 3, 255])]))
    assert with_ignored == scores(cluster_metric(3), preds, target)


def test_linear_metrics_do_not_permute_the_predictions():
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    shifted = (target + 1) % 3
    assert scores(linear_metric(3), shifted, target) == (0.0, 0.0)


def test_confusion_matrix_matches_a_pixel_loop():
    preds, target = planted(4, 6, 500, noise=0.5, seed=1)
    target[::7] = -1
    target[::11] = 4
    metric = cluster_metric(4, extra=2)
    metric.update(preds.view(5, 100), target.view(5, 100))
    assert metric.stats.tolist() == reference_confusion(preds, target, 4, 6)


def test_batches_accumulate_like_one_update():
    preds, target = planted(3, 3, 300, noise=0.4, seed=2)
    whole, batched = cluster_metric(3), cluster_metric(3)
    whole.update(preds, target)
    for p, t in zip(preds.split(70), target.split(70)):
        batched.update(p, t)
    assert torch.equal(whole.stats, batched.stats)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hungarian_scores_agree_with_a_brute_force_over_all_permutations(seed):
    preds, target = planted(3, 3, 400, noise=0.6, seed=seed)
    miou_ref, accuracy_ref, n_best = brute_force_scores(preds, target, 3, 3)
    assert n_best == 1  # a unique best matching, so that the mIoU is defined
    miou, accuracy = scores(cluster_metric(3), preds, target)
    assert (miou, accuracy) == (pytest.approx(miou_ref), pytest.approx(accuracy_ref))


@pytest.mark.parametrize("seed", [3, 4])
def test_hungarian_with_extra_clusters_agrees_with_a_brute_force(seed):
    preds, target = planted(3, 5, 400, noise=0.6, seed=seed)
    miou_ref, accuracy_ref, n_best = brute_force_scores(preds, target, 3, 5)
    assert n_best == 1
    miou, accuracy = scores(cluster_metric(3, extra=2), preds, target)
    assert (miou, accuracy) == (pytest.approx(miou_ref), pytest.approx(accuracy_ref))


def test_without_extra_clusters_the_scores_equal_the_originals():
    preds, target = planted(5, 5, 2000, noise=0.5, seed=5)
    target[::13] = -1
    assert scores(cluster_metric(5), preds, target) == pytest.approx(original_scores(preds, target, 5, 0))


def test_legacy_mode_with_extra_clusters_equals_the_original():
    preds, target = planted(4, 6, 2000, noise=0.5, seed=6)
    legacy = scores(cluster_metric(4, extra=2, legacy=True), preds, target)
    assert legacy == pytest.approx(original_scores(preds, target, 4, 2))


def test_cluster_to_class_marks_unmatched_clusters_with_minus_one():
    target = torch.tensor([0, 0, 1, 1, 1])
    metric = cluster_metric(2, extra=2)
    scores(metric, torch.tensor([3, 3, 1, 1, 0]), target)
    assert metric.cluster_to_class.tolist() == [-1, 1, -1, 0]


def test_map_clusters_gives_class_ids_and_minus_one_for_unmatched_clusters():
    metric = cluster_metric(2, extra=2)
    scores(metric, torch.tensor([3, 3, 1, 1, 0]), torch.tensor([0, 0, 1, 1, 1]))
    assert metric.map_clusters(torch.tensor([[0, 1], [2, 3]])).tolist() == [[-1, 1], [-1, 0]]


def test_cluster_order_lists_matched_clusters_by_class_then_the_unmatched():
    metric = cluster_metric(2, extra=2)
    scores(metric, torch.tensor([3, 3, 1, 1, 0]), torch.tensor([0, 0, 1, 1, 1]))
    assert metric.cluster_order().tolist() == [3, 1, 0, 2]


def test_per_class_iou_is_nan_for_a_class_never_labelled_nor_predicted():
    metric = cluster_metric(3)
    scores(metric, torch.tensor([1, 1, 0]), torch.tensor([0, 0, 1]))
    iou = metric.per_class_iou(["sky", "tree", "road"])
    assert iou["sky"] == iou["tree"] == 100.0 and math.isnan(iou["road"])


def test_get_metrics_returns_the_four_original_names():
    cluster, linear = cluster_metric(2), linear_metric(2)
    for metric in (cluster, linear):
        metric.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert set(get_metrics(cluster, linear)) == {"Cluster_mIoU", "Cluster_Accuracy", "Linear_mIoU", "Linear_Accuracy"}


def test_predictions_outside_the_clusters_are_rejected():
    with pytest.raises(ValueError, match="cluster ids"):
        cluster_metric(2, extra=1).update(torch.tensor([3]), torch.tensor([0]))


def test_the_assignment_is_unavailable_before_compute():
    with pytest.raises(RuntimeError, match="compute"):
        cluster_metric(2).map_clusters(torch.tensor([0]))


def test_confusion_matrix_plot_is_a_png_of_the_expected_size(tmp_path):
    metric = cluster_metric(3, extra=1)
    scores(metric, torch.tensor([3, 3, 1, 0, 0, 2]), torch.tensor([0, 0, 1, 2, 2, 1]))
    path = tmp_path / "cm.png"
    plot_confusion_matrix(metric, ["sky", "tree", "road"], path)
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == (round((CM_LABEL_INCHES + CM_BAR_INCHES + 4 * CM_CELL_INCHES) * CM_DPI),
                            round((CM_LABEL_INCHES + CM_PAD_INCHES + 3 * CM_CELL_INCHES) * CM_DPI))


def test_confusion_matrix_cells_show_each_true_class_share_per_matched_cluster():
    metric = cluster_metric(2, extra=1)
    # class 0: 3 pixels in cluster 1, 1 in cluster 2 (extra); class 1: 2 pixels in cluster 0
    scores(metric, torch.tensor([1, 1, 1, 2, 0, 0]), torch.tensor([0, 0, 0, 0, 1, 1]))
    ax = confusion_matrix_figure(metric, ["sky", "road"]).axes[0]
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    # rows: true class; columns: the cluster matched to sky (1), to road (0), then the extra cluster 2
    assert cells == {(0, 0): "0.75", (0, 2): "0.25", (1, 1): "1.00"}
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sky", "road", "extra 2"]
