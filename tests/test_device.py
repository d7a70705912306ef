import torch
from torch import nn

from utils.device import GRAD_SCALER_INIT_SCALE, make_fabric, scaler_state, update_scale


def _three_parts(fabric):
    torch.manual_seed(0)
    return [fabric.setup(m, torch.optim.Adam(m.parameters())) for m in (nn.Linear(4, 4) for _ in range(3))]


def test_fp16_loss_scale_is_updated_once_per_iteration_after_all_optimizers():
    fabric = make_fabric(torch.device("cpu"), "fp16")
    parts = _three_parts(fabric)
    for _ in range(3):
        fabric.backward(sum(module(torch.randn(2, 4)).sum() for module, _ in parts))
        for _, optimizer in parts:
            optimizer.step()
        update_scale(fabric)
    state = scaler_state(fabric)
    assert state["scale"] == GRAD_SCALER_INIT_SCALE
    assert state["_growth_tracker"] == 3  # Fabric's own plugin would count 9 (one update per optimizer step)


def test_fp16_overflow_skips_that_optimizer_step_and_halves_the_scale():
    fabric = make_fabric(torch.device("cpu"), "fp16")
    parts = _three_parts(fabric)
    before = [module.weight.detach().clone() for module, _ in parts]
    fabric.backward(sum(module(torch.randn(2, 4)).sum() for module, _ in parts))
    parts[0][0].weight.grad[0, 0] = float("inf")
    for _, optimizer in parts:
        optimizer.step()
    update_scale(fabric)
    assert torch.equal(before[0], parts[0][0].weight)
    assert not torch.equal(before[1], parts[1][0].weight)
    assert scaler_state(fabric)["scale"] == GRAD_SCALER_INIT_SCALE / 2


def test_fp32_has_no_scaler():
    assert scaler_state(make_fabric(torch.device("cpu"), "fp32")) is None
