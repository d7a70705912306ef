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


def _recording_decisions(monkeypatch) -> list:
    """Every chunk's (similarities, Phi, Psi, positives, negatives) as the loss decides them, forward then
    backward, in call order."""
    import loss.ppap

    calls = []
    decide = loss.ppap._decide

    def recording(s, phi, psi, own_rows):
        pos, neg = decide(s, phi, psi, own_rows)
        calls.append((s.clone(), phi.clone(), psi.clone(), pos.clone(), neg.clone()))
        return pos, neg

    monkeypatch.setattr(loss.ppap, "_decide", recording)
    return calls


def _assert_backward_decided_as_forward(calls: list) -> None:
    half = len(calls) // 2
    assert half > 1 and len(calls) == 2 * half
    for (_, _, _, fwd_pos, fwd_neg), (_, _, _, bwd_pos, bwd_neg) in zip(calls[:half], calls[half:]):
        assert torch.equal(fwd_pos, bwd_pos) and torch.equal(fwd_neg, bwd_neg)


def _with_full_masks(z, feats, anchors, coeff, chunk_elements):
    """The loss written with the (anchors x N) masks of ``mine`` and autograd: the formulation that keeps them."""
    n = z.shape[0]
    blocks, size, _ = PPAPLoss(coeff).geometry(n)
    rows = (anchors + torch.arange(blocks)[:, None] * size).reshape(-1)
    mined = mine(F.normalize(feats, dim=1), rows, coeff, chunk_elements)
    logits = z[rows] @ z.T / coeff.tau
    log_prob = logits - logits.masked_fill(~(mined.pos | mined.neg), float("-inf")).logsumexp(1, keepdim=True)
    valid = mined.pos.any(1)
    per_anchor = -(coeff.tau / coeff.base_tau) * (log_prob * mined.pos).sum(1) / mined.pos.sum(1).clamp(min=1)
    block_of = torch.arange(blocks).repeat_interleave(anchors.shape[1])
    used = [per_anchor[(block_of == b) & valid].mean() for b in range(blocks) if (valid & (block_of == b)).any()]
    return torch.stack(used).mean(), mined


@pytest.mark.parametrize("prop_iter", [0, 2])
def test_backward_decides_every_element_as_the_forward_did(monkeypatch, prop_iter):
    n = 96
    feats = clustered(n, 8, clusters=4, noise=0.4, seed=11, dtype=torch.float32)
    coeff = TrainingCoeff(initialcrit_pos=0.5, initialcrit_amb=0.1, prop_iter=prop_iter, split=48, trainpatchsplit=3)
    anchors = PPAPLoss(coeff).draw_anchors(n, torch.Generator().manual_seed(3))
    calls = _recording_decisions(monkeypatch)
    z = unit_z(n, 6, seed=12).float().detach().requires_grad_()
    PPAPLoss(coeff, chunk_elements=5 * n)(z, feats, anchors).loss.backward()  # 32 anchors in chunks of 5
    assert len(calls) == 2 * 7
    _assert_backward_decided_as_forward(calls)


def test_rows_exactly_at_both_boundaries_are_decided_alike_in_both_passes(monkeypatch):
    # few distinct directions, so that many similarities are equal; Phi and Psi are then set to similarities that
    # occur in the loss's own chunks (prop_iter 0: the boundaries stay where they are set)
    n, chunk_elements = 64, 3 * 64
    g = torch.Generator().manual_seed(5)
    directions = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 0]], dtype=torch.float32)
    feats = directions[torch.randint(5, (n,), generator=g)]
    z = unit_z(n, 6, seed=7).float().detach()
    coeff = TrainingCoeff(prop_iter=0, split=n, trainpatchsplit=4)
    anchors = PPAPLoss(coeff).draw_anchors(n, torch.Generator().manual_seed(6))
    calls = _recording_decisions(monkeypatch)
    PPAPLoss(coeff, chunk_elements)(z, feats, anchors)
    values = calls[0][0].unique()
    coeff = TrainingCoeff(initialcrit_pos=float(values[-2]), initialcrit_amb=float(values[1]), prop_iter=0, split=n,
                          trainpatchsplit=4)  # float32 values, exact as Python floats
    calls.clear()
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    result = PPAPLoss(coeff, chunk_elements)(z1, feats, anchors)
    result.loss.backward()
    forward = calls[:len(calls) // 2]
    assert any((s == phi[:, None]).any() for s, phi, _, _, _ in forward)  # rows on the positive boundary
    assert any((s == psi[:, None]).any() for s, _, psi, _, _ in forward)  # and on the ambiguity boundary
    _assert_backward_decided_as_forward(calls)
    # and the loss equals the formulation with full masks decided on the same chunks
    expected, mined = _with_full_masks(z2, feats, anchors, coeff, chunk_elements)
    expected.backward()
    assert torch.equal(torch.cat([c[3] for c in forward]), mined.pos)
    assert torch.equal(torch.cat([c[4] for c in forward]), mined.neg)
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(z1.grad, z2.grad, rtol=1e-5, atol=1e-7)


def test_matches_the_full_mask_formulation_in_fp32_over_many_chunks():
    n = 200
    feats = clustered(n, 16, clusters=5, noise=0.5, seed=8, dtype=torch.float32)
    coeff = TrainingCoeff(initialcrit_pos=0.55, initialcrit_amb=0.2, prop_iter=2, split=50, trainpatchsplit=5)
    anchors = PPAPLoss(coeff).draw_anchors(n, torch.Generator().manual_seed(9))
    z1 = unit_z(n, 8, seed=10).float().detach().requires_grad_()
    z2 = z1.detach().clone().requires_grad_()
    result = PPAPLoss(coeff, chunk_elements=3 * n)(z1, feats, anchors)
    expected, mined = _with_full_masks(z2, feats, anchors, coeff, 3 * n)
    result.loss.backward()
    expected.backward()
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert result.num_pos.item() == pytest.approx(mined.pos.sum().item() / anchors.numel(), rel=1e-6)
    assert result.num_neg.item() == pytest.approx(mined.neg.sum().item() / anchors.numel(), rel=1e-6)
    assert torch.allclose(z1.grad, z2.grad, rtol=1e-5, atol=1e-7)


def _bytes_kept_for_backward(batch: int) -> int:
    """Total size of the distinct tensors the loss's graph keeps between its forward and backward passes."""
    side, coeff = 8, TrainingCoeff(split=64, trainpatchsplit=4)  # 16 anchors per image: anchors grow with N
    g = torch.Generator().manual_seed(batch)
    feats = torch.randn(batch, 32, side, side, generator=g)
    z = F.normalize(torch.randn(batch * side * side, 16, generator=g), dim=1).requires_grad_()
    kept = {}

    def pack(t: torch.Tensor):
        kept[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = PPAPLoss(coeff)(z, feats)
    assert result.num_pos.item() > 0
    return sum(kept.values())


def test_what_the_loss_keeps_for_its_backward_grows_linearly_with_the_rows():
    # a mask of the (anchors x N) pairs would grow 16x from 4 to 16 images; what is linear grows 4x
    small, large = _bytes_kept_for_backward(4), _bytes_kept_for_backward(16)
    assert 3.5 * small <= large <= 4.5 * small
