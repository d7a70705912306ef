"""A direct, per-anchor, loop-by-loop implementation of the PPAP loss formula (slow; float64; for tests only).

It follows the formula of the original code written out in plain loops and shares no code with loss/ppap.py.
"""
import math

import torch


def _unit(v):
    length = math.sqrt(float((v * v).sum()))
    return v / length if length > 0 else v * 0.0


def _cos(a, b):
    la, lb = math.sqrt(float((a * a).sum())), math.sqrt(float((b * b).sum()))
    return float((a * b).sum()) / (la * lb) if la > 0 and lb > 0 else 0.0


def reference_mining(feats, anchor_row, coeff):
    """(positives, negatives, phi, psi) of one anchor row, as Python lists / floats."""
    f = [_unit(row) for row in feats.double()]
    n = len(f)
    proxy = f[anchor_row]
    phi, psi = coeff.initialcrit_pos, coeff.initialcrit_amb
    sims = [float((proxy * f[j]).sum()) for j in range(n)]
    members = [j for j in range(n) if sims[j] > phi]
    for _ in range(coeff.prop_iter):
        total = sum((f[j] for j in members), torch.zeros_like(f[0]))
        new_proxy = _unit(total)
        moved = 1.0 - _cos(proxy, new_proxy)
        psi += moved / coeff.sigma_amb
        phi -= moved / coeff.sigma_pos
        proxy = new_proxy
        sims = [float((proxy * f[j]).sum()) for j in range(n)]
        members = [j for j in range(n) if sims[j] > phi]
    positives = [j for j in members if j != anchor_row]
    negatives = [j for j in range(n) if sims[j] < psi and j != anchor_row]
    return positives, negatives, phi, psi


def reference_loss(z, feats, anchors, coeff):
    """The loss (a differentiable float64 scalar) and the mean positive / negative counts per anchor."""
    n = z.shape[0]
    blocks, size = (1, n) if n < coeff.split else (n // coeff.split, coeff.split)
    block_losses, pos_counts, neg_counts = [], [], []
    for b in range(blocks):
        terms = []
        for local in anchors[b].tolist():
            i = b * size + local
            positives, negatives, _, _ = reference_mining(feats, i, coeff)
            pos_counts.append(len(positives))
            neg_counts.append(len(negatives))
            if not positives:
                continue
            denominator = sorted(set(positives) | set(negatives))
            logit = {j: (z[i] * z[j]).sum() / coeff.tau for j in denominator}
            log_den = torch.log(sum(torch.exp(logit[j]) for j in denominator))
            mean_log_prob = sum(logit[j] - log_den for j in positives) / len(positives)
            terms.append(-(coeff.tau / coeff.base_tau) * mean_log_prob)
        if terms:
            block_losses.append(sum(terms) / len(terms))
    loss = sum(block_losses) / len(block_losses)
    return loss, sum(pos_counts) / len(pos_counts), sum(neg_counts) / len(neg_counts)
