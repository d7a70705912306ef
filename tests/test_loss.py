import math

import pytest
import torch
import torch.nn.functional as F

from loss import PPAPLoss, mine
from tests.reference_ppap import reference_loss, reference_mining
from config import TrainingCoeff


def clustered(n: int, dim: int, clusters: int, noise: float, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(clusters, dim, generator=g, dtype=dtype), dim=1)
    labels = torch.randint(clusters, (n,), generator=g)
    return centres[labels] + noise * torch.randn(n, dim, generator=g, dtype=dtype)


def unit_z(n: int, dim: int, seed: int, device: str | torch.device = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1).to(device).requires_grad_()


def test_identical_features_make_every_other_row_positive_and_none_negative():
    n = 12
    coeff = TrainingCoeff(split=n, trainpatchsplit=4)
    feats = torch.ones(n, 5, dtype=torch.float64)
    result = PPAPLoss(coeff)(unit_z(n, 4, 0), feats, torch.tensor([[0, 5, 11]]))
    assert result.num_pos.item() == n - 1
    assert result.num_neg.item() == 0


def test_identical_codes_give_log_of_positive_count():
    n = 12
    coeff = TrainingCoeff(split=n, trainpatchsplit=4, tau=0.5)
    feats = torch.ones(n, 5, dtype=torch.float64)
    z = F.normalize(torch.ones(n, 3, dtype=torch.float64), dim=1)
    result = PPAPLoss(coeff)(z, feats, torch.tensor([[1, 2, 3]]))
    # every logit equal: log_prob = -log(n - 1) for every positive
    assert result.loss.item() == pytest.approx(coeff.tau / coeff.base_tau * math.log(n - 1), rel=1e-12)


def test_well_separated_clusters_make_own_cluster_the_positives():
    dirs = torch.eye(3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    g = torch.Generator().manual_seed(0)
    feats = dirs[labels] + 0.01 * torch.randn(10, 3, generator=g, dtype=torch.float64)
    coeff = TrainingCoeff(split=10, trainpatchsplit=1)
    mined = mine(F.normalize(feats, dim=1), torch.arange(10), coeff)
    same = labels[:, None] == labels[None, :]
    not_self = ~torch.eye(10, dtype=torch.bool)
    assert torch.equal(mined.pos, same & not_self)
    assert torch.equal(mined.neg, ~same)


def test_phi_and_psi_drift_by_the_proxy_movement_after_one_step():
    feats = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=torch.float64)
    coeff = TrainingCoeff(initialcrit_pos=0.55, initialcrit_amb=0.2, prop_iter=1, sigma_pos=3.0, sigma_amb=2.0)
    mined = mine(feats, torch.tensor([0]), coeff)
    # positives of row 0: rows 0 and 1 (s = 1, 0.8); proxy = (1.8, 0.6) / |.|; moved = 1 - cos(row 0, proxy)
    moved = 1.0 - 1.8 / math.sqrt(1.8 ** 2 + 0.6 ** 2)
    assert mined.phi.item() == pytest.approx(0.55 - moved / 3.0, abs=1e-12)
    assert mined.psi.item() == pytest.approx(0.2 + moved / 2.0, abs=1e-12)


def test_ambiguous_rows_are_left_out_of_the_denominator():
    # row 0 is the anchor; row 1 positive (s 0.9), row 2 ambiguous (s 0.4), row 3 negative (s 0.0)
    feats = torch.tensor([[1.0, 0.0], [0.9, math.sqrt(1 - 0.81)], [0.4, math.sqrt(1 - 0.16)], [0.0, 1.0]],
                         dtype=torch.float64)
    z = F.normalize(torch.tensor([[1.0, 0.2], [0.3, 1.0], [1.0, 1.0], [-1.0, 0.5]], dtype=torch.float64), dim=1)
    coeff = TrainingCoeff(initialcrit_pos=0.55, initialcrit_amb=0.2, prop_iter=0, tau=0.5, split=4)
    result = PPAPLoss(coeff)(z, feats, torch.tensor([[0]]))
    logit = lambda j: float(z[0] @ z[j]) / coeff.tau  # noqa: E731
    expected = -(coeff.tau / coeff.base_tau) * (logit(1) - math.log(math.exp(logit(1)) + math.exp(logit(3))))
    assert result.loss.item() == pytest.approx(expected, rel=1e-12)
    assert (result.num_pos.item(), result.num_neg.item()) == (1, 1)


def test_anchor_without_positive_is_skipped():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]], dtype=torch.float64)
    z = F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1)
    coeff = TrainingCoeff(prop_iter=0, split=3, trainpatchsplit=1)
    only_1 = PPAPLoss(coeff)(z, feats, torch.tensor([[1]]))
    with_lonely_0 = PPAPLoss(coeff)(z, feats, torch.tensor([[0, 1]]))
    assert with_lonely_0.loss.item() == pytest.approx(only_1.loss.item(), rel=1e-12)


@pytest.mark.parametrize("prop_iter", [0, 1, 3])
def test_matches_direct_loop_reference_on_clustered_data(prop_iter, device):
    n, split = 2 * 24 + 5, 24  # two blocks and five rows that are candidates only
    feats = clustered(n, 6, clusters=4, noise=0.35, seed=prop_iter).to(device)
    coeff = TrainingCoeff(initialcrit_pos=0.6, initialcrit_amb=0.1, prop_iter=prop_iter, tau=0.3,
                          sigma_pos=2.0, sigma_amb=3.0, split=split, trainpatchsplit=4)
    anchors = PPAPLoss(coeff).draw_anchors(n, torch.Generator().manual_seed(7))
    z = unit_z(n, 5, seed=11, device=device)
    result = PPAPLoss(coeff)(z, feats, anchors)
    expected, pos, neg = reference_loss(z, feats, anchors, coeff)
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert (result.num_pos.item(), result.num_neg.item()) == pytest.approx((pos, neg), rel=1e-6)


def test_gradient_matches_direct_loop_reference(device):
    n, split = 40, 20
    feats = clustered(n, 6, clusters=3, noise=0.3, seed=3).to(device)
    coeff = TrainingCoeff(initialcrit_pos=0.5, initialcrit_amb=0.0, prop_iter=2, tau=0.2, split=split, trainpatchsplit=5)
    anchors = PPAPLoss(coeff).draw_anchors(n, torch.Generator().manual_seed(1))
    z = unit_z(n, 5, seed=4, device=device)
    PPAPLoss(coeff)(z, feats, anchors).loss.backward()
    ours = z.grad.clone()
    z.grad = None
    reference_loss(z, feats, anchors, coeff)[0].backward()
    assert torch.allclose(ours, z.grad, rtol=1e-5, atol=1e-10)


def test_chunked_computation_equals_unchunked():
    n = 60
    feats = clustered(n, 6, clusters=3, noise=0.3, seed=5)
    coeff = TrainingCoeff(split=30, trainpatchsplit=3, prop_iter=2)
    anchors = PPAPLoss(coeff).draw_anchors(n, torch.Generator().manual_seed(2))
    z1, z2 = unit_z(n, 4, 6), unit_z(n, 4, 6)
    whole = PPAPLoss(coeff)(z1, feats, anchors)
    chunked = PPAPLoss(coeff, chunk_elements=2 * n)  # two anchors per chunk
    parts = chunked(z2, feats, anchors)
    whole.loss.backward()
    parts.loss.backward()
    assert parts.loss.item() == pytest.approx(whole.loss.item(), rel=1e-12)
    assert torch.allclose(z1.grad, z2.grad, rtol=1e-10, atol=1e-14)


def test_mining_matches_reference_per_anchor():
    n = 30
    feats = clustered(n, 5, clusters=3, noise=0.4, seed=8)
    coeff = TrainingCoeff(initialcrit_pos=0.5, initialcrit_amb=0.15, prop_iter=2, split=n)
    rows = torch.tensor([0, 7, 19, 29])
    mined = mine(F.normalize(feats, dim=1), rows, coeff)
    for a, row in enumerate(rows.tolist()):
        positives, negatives, phi, psi = reference_mining(feats, row, coeff)
        assert mined.pos[a].nonzero().flatten().tolist() == positives
        assert mined.neg[a].nonzero().flatten().tolist() == negatives
        assert (mined.phi[a].item(), mined.psi[a].item()) == pytest.approx((phi, psi), abs=1e-12)


def test_own_row_is_never_positive_or_negative():
    n = 20
    feats = clustered(n, 4, clusters=2, noise=0.5, seed=9)
    rows = torch.arange(n)
    mined = mine(F.normalize(feats, dim=1), rows, TrainingCoeff(prop_iter=3, split=n))
    assert not mined.pos[rows, rows].any()
    assert not mined.neg[rows, rows].any()


def test_gradients_reach_z_only():
    n = 32
    feats = clustered(n, 6, clusters=3, noise=0.3, seed=1).requires_grad_()
    z = unit_z(n, 4, 2)
    PPAPLoss(TrainingCoeff(split=16, trainpatchsplit=4))(z, feats).loss.backward()
    assert feats.grad is None
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_fewer_rows_than_split_form_one_block():
    loss_fn = PPAPLoss(TrainingCoeff(split=784, trainpatchsplit=16))
    assert loss_fn.geometry(100) == (1, 100, 6)
    assert loss_fn.draw_anchors(100).shape == (1, 6)


def test_rows_after_last_full_block_are_never_anchors():
    loss_fn = PPAPLoss(TrainingCoeff(split=784, trainpatchsplit=16))
    assert loss_fn.geometry(64 * 784 + 100) == (64, 784, 49)


def test_drawn_anchors_are_distinct_within_each_block():
    anchors = PPAPLoss(TrainingCoeff(split=50, trainpatchsplit=5)).draw_anchors(200)
    assert anchors.shape == (4, 10)
    assert all(len(set(row.tolist())) == 10 for row in anchors)
    assert anchors.min() >= 0 and anchors.max() < 50


def test_feature_map_input_is_flattened_in_image_row_col_order():
    b, c, h, w = 2, 5, 3, 4
    fmap = torch.randn(b, c, h, w, dtype=torch.float64)
    rows = fmap.permute(0, 2, 3, 1).reshape(-1, c)
    coeff = TrainingCoeff(split=12, trainpatchsplit=3)
    anchors = torch.tensor([[0, 4, 9, 11], [1, 2, 3, 10]])
    z = unit_z(b * h * w, 4, 3)
    from_map = PPAPLoss(coeff)(z, fmap, anchors).loss
    from_rows = PPAPLoss(coeff)(z, rows, anchors).loss
    assert from_map.item() == from_rows.item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_fp32(dtype, device):
    n = 32
    z = F.normalize(torch.randn(n, 8), dim=1).to(device, dtype).requires_grad_()
    feats = torch.randn(n, 8).to(device, dtype)
    with torch.autocast(device.type, dtype=dtype):
        result = PPAPLoss(TrainingCoeff(split=16, trainpatchsplit=4))(z, feats)
    assert result.loss.dtype == torch.float32
    result.loss.backward()
    assert z.grad.dtype == dtype and torch.isfinite(z.grad).all()


def test_wrong_anchor_shape_is_refused():
    with pytest.raises(ValueError, match=r"anchors must be a \(2, K\) tensor"):
        PPAPLoss(TrainingCoeff(split=10))(unit_z(20, 3, 0), torch.randn(20, 3), torch.tensor([[0, 1]]))
