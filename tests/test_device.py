import pytest
import torch

from utils.errors import ConfigError
from utils.device import GRAD_SCALER_GROWTH_INTERVAL, GRAD_SCALER_INIT_SCALE, grad_scaler, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_precision_is_fp16_on_cuda_and_fp32_on_the_cpu():
    assert resolve_precision("auto", CUDA) == "fp16"
    assert resolve_precision("auto", CPU) == "fp32"


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_every_precision_is_allowed_on_the_cpu(precision):
    assert resolve_precision(precision, CPU) == precision


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    with pytest.raises(ConfigError, match="precision 'bf16' is not supported by this GPU"):
        resolve_precision("bf16", CUDA)


def test_fp16_scaler_has_the_original_settings():
    scaler = grad_scaler(CPU, "fp16")
    assert scaler.is_enabled()
    assert scaler.get_scale() == GRAD_SCALER_INIT_SCALE == 2048
    assert scaler.get_growth_interval() == GRAD_SCALER_GROWTH_INTERVAL == 1000


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_scaler_passes_through_without_fp16(precision):
    scaler = grad_scaler(CPU, precision)
    loss = torch.tensor(3.0)
    assert not scaler.is_enabled() and scaler.scale(loss) is loss and scaler.state_dict() == {}


def test_fp16_overflow_skips_only_that_optimizers_step_and_halves_the_scale_once():
    torch.manual_seed(0)
    parts = [torch.nn.Linear(4, 4) for _ in range(3)]
    optimizers = [torch.optim.Adam(p.parameters()) for p in parts]
    before = [p.weight.detach().clone() for p in parts]
    scaler = grad_scaler(CPU, "fp16")
    scaler.scale(sum(p(torch.randn(2, 4)).sum() for p in parts)).backward()
    parts[0].weight.grad[0, 0] = float("inf")
    for optimizer in optimizers:
        scaler.step(optimizer)
    scaler.update()
    assert torch.equal(before[0], parts[0].weight)
    assert not torch.equal(before[1], parts[1].weight) and not torch.equal(before[2], parts[2].weight)
    assert scaler.get_scale() == GRAD_SCALER_INIT_SCALE / 2
