import argparse
import logging
import math
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loss import PPAPLoss
from model import ClusterProbe, build_model
from model.vit import Attention, vit
from model.weights import DINO_BASE_URL, dino_url, load_backbone_weights
from config import ModelConfig, PretrainedConfig, TrainingCoeff
from utils.errors import WeightsError

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "vit_tiny16_distilled.pth"

OFFICIAL_KEYS_BLOCK = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                       "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                       "mlp.fc2.weight", "mlp.fc2.bias"]



def weights(path, model_type: str, patch: int, family: str = "dino") -> PretrainedConfig:
    """The options of a backbone of ``family`` loaded from ``path`` (None: the official download)."""
    return PretrainedConfig(name=family, model_type=model_type, dino_patch_size=patch, pretrained_weights=path)

def tiny_cfg(patch: int = 16, weights: str = "none", extra: int = 0) -> ModelConfig:
    return ModelConfig(dim=192, extra_clusters=extra,
                       pretrained=PretrainedConfig(model_type="vit_tiny", dino_patch_size=patch, pretrained_weights=weights))


def random_state_dict(model_type: str = "vit_tiny", patch: int = 16, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return vit(model_type, patch).state_dict()


def test_vit_has_the_official_dino_key_layout():
    keys = list(vit("vit_small", 8).state_dict())
    expected = (["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
                + [f"blocks.{i}.{k}" for i in range(12) for k in OFFICIAL_KEYS_BLOCK] + ["norm.weight", "norm.bias"])
    assert keys == expected


@pytest.mark.parametrize("model_type, width, heads", [("vit_tiny", 192, 3), ("vit_small", 384, 6), ("vit_base", 768, 12)])
def test_arch_widths_and_heads(model_type, width, heads):
    model = vit(model_type, 16)
    assert model.embed_dim == width and model.blocks[0].attn.num_heads == heads
    assert model.pos_embed.shape == (1, 14 * 14 + 1, width)
    assert model.norm.eps == 1e-6 and model.blocks[0].attn.qkv.bias is not None


def test_shared_fixture_loads_strictly_into_vit_tiny16():
    assert FIXTURE.is_file(), f"shared fixture missing: {FIXTURE}"
    model = vit("vit_tiny", 16)
    load_backbone_weights(model, weights(str(FIXTURE), "vit_tiny", 16))
    expected = torch.load(FIXTURE, weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_plain_state_dict_file_loads_exactly(tmp_path):
    state = random_state_dict(seed=1)
    torch.save(state, tmp_path / "backbone.pth")
    model = vit("vit_tiny", 16)
    load_backbone_weights(model, weights(str(tmp_path / "backbone.pth"), "vit_tiny", 16))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_dino_training_checkpoint_loads_its_teacher(tmp_path):
    teacher = random_state_dict(seed=2)
    student = random_state_dict(seed=3)
    ckpt = {
        "student": {f"module.backbone.{k}": v for k, v in student.items()},
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.items()},
                    "head.mlp.0.weight": torch.zeros(8, 192), "head.last_layer.weight_g": torch.ones(4, 1)},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=16),
    }
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    model = vit("vit_tiny", 16)
    load_backbone_weights(model, weights(str(tmp_path / "checkpoint.pth"), "vit_tiny", 16))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in teacher.items())


def test_ddp_wrapped_teacher_prefix_is_stripped(tmp_path):
    teacher = random_state_dict(seed=4)
    torch.save({"teacher": {f"module.backbone.{k}": v for k, v in teacher.items()}}, tmp_path / "c.pth")
    model = vit("vit_tiny", 16)
    load_backbone_weights(model, weights(str(tmp_path / "c.pth"), "vit_tiny", 16))
    assert torch.equal(model.cls_token, teacher["cls_token"])


def test_wrong_arch_file_names_shapes_and_what_it_looks_like(tmp_path):
    torch.save(random_state_dict("vit_small", 16), tmp_path / "small.pth")
    with pytest.raises(WeightsError, match=r"shape mismatch.*cls_token: file \[1, 1, 384\] vs model \[1, 1, 192\].*"
                                           r"looks like a DINO vit_small/16; the option file asks for a DINO vit_tiny/16"):
        load_backbone_weights(vit("vit_tiny", 16), weights(str(tmp_path / "small.pth"), "vit_tiny", 16))


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = random_state_dict()
    del state["norm.weight"]
    state["head.weight"] = torch.zeros(1)
    state["extra.bias"] = torch.zeros(1)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match=r"1 missing key\(s\): norm\.weight; 1 unexpected key\(s\): extra\.bias"):
        load_backbone_weights(vit("vit_tiny", 16), weights(str(tmp_path / "w.pth"), "vit_tiny", 16))


def test_missing_weight_file_is_named(tmp_path):
    with pytest.raises(WeightsError, match=r"weight file .*absent\.pth not found"):
        load_backbone_weights(vit("vit_tiny", 16), weights(str(tmp_path / "absent.pth"), "vit_tiny", 16))


def test_unreadable_weight_file_is_named(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"cannot read weight file .*junk\.pth"):
        load_backbone_weights(vit("vit_tiny", 16), weights(str(tmp_path / "junk.pth"), "vit_tiny", 16))


@pytest.mark.parametrize("model_type, patch, name", [
    ("vit_small", 16, "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"),
    ("vit_small", 8, "dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth"),
    ("vit_base", 16, "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"),
    ("vit_base", 8, "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"),
])
def test_official_release_urls(model_type, patch, name):
    assert dino_url(model_type, patch) == "https://dl.fbaipublicfiles.com/dino/" + name


def test_null_weights_download_through_torch_hub(monkeypatch):
    state = random_state_dict("vit_small", 16, seed=5)
    seen = []

    def fake_download(url, map_location=None, progress=True):
        seen.append(url)
        return state

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    model = vit("vit_small", 16)
    load_backbone_weights(model, weights(None, "vit_small", 16))
    assert seen == [DINO_BASE_URL + "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"]
    assert torch.equal(model.pos_embed, state["pos_embed"])


def test_download_failure_names_url_and_local_file_option(monkeypatch):
    def offline(url, map_location=None, progress=True):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match=r"could not download the DINO weights from https://dl\.fbaipublicfiles\.com/"
                                           r"dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain\.pth .*"
                                           r"model\.pretrained\.pretrained_weights=/path/to/file\.pth"):
        load_backbone_weights(vit("vit_base", 8), weights(None, "vit_base", 8))


def test_vit_tiny_has_no_official_release():
    with pytest.raises(WeightsError, match="no official DINO release for vit_tiny/16"):
        load_backbone_weights(vit("vit_tiny", 16), weights(None, "vit_tiny", 16))


def test_random_backbone_warns_loudly(caplog):
    with caplog.at_level(logging.WARNING):
        load_backbone_weights(vit("vit_tiny", 16), weights("none", "vit_tiny", 16))
    assert "RANDOMLY initialised" in caplog.text


def test_position_embedding_is_unchanged_at_pretraining_size():
    model = vit("vit_tiny", 16)
    assert model.interpolate_pos_encoding(1 + 14 * 14, 224, 224) is model.pos_embed


def _cubic_weights(t: float, a: float = -0.75) -> list[float]:
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _bicubic_by_scale(grid: np.ndarray, out_size: int, scale: float, axis: int) -> np.ndarray:
    """Bicubic resampling along one axis, sampling source positions by the scale factor (as DINO's call does)."""
    grid = np.moveaxis(grid, axis, 0)
    n = grid.shape[0]
    out = np.zeros((out_size,) + grid.shape[1:])
    for o in range(out_size):
        src = (o + 0.5) / scale - 0.5
        base = math.floor(src)
        for k, w in zip(range(-1, 3), _cubic_weights(src - base)):
            out[o] += w * grid[min(max(base + k, 0), n - 1)]
    return np.moveaxis(out, 0, axis)


@pytest.mark.parametrize("height, width", [(320, 320), (224, 320)])
def test_position_embedding_interpolation_reproduces_dino(height, width, device):
    torch.manual_seed(0)
    model = vit("vit_tiny", 16, depth=1).to(device)
    pos = model.interpolate_pos_encoding(1 + (height // 16) * (width // 16), height, width).detach().cpu()
    model.cpu()
    grid = model.pos_embed[0, 1:].detach().double().numpy().reshape(14, 14, -1)
    h0, w0 = height // 16 + 0.1, width // 16 + 0.1
    expected = _bicubic_by_scale(grid, int(h0), h0 / 14, axis=0)
    expected = _bicubic_by_scale(expected, int(w0), w0 / 14, axis=1).reshape(-1, grid.shape[-1])
    assert torch.equal(pos[0, 0], model.pos_embed[0, 0].detach())
    assert np.abs(pos[0, 1:].numpy() - expected).max() < 1e-5
    plain = F.interpolate(model.pos_embed[:, 1:].detach().reshape(1, 14, 14, -1).permute(0, 3, 1, 2),
                          size=(height // 16, width // 16), mode="bicubic").permute(0, 2, 3, 1).reshape(-1, grid.shape[-1])
    assert (plain - pos[0, 1:]).abs().max() > 1e-3  # a size= resize is not what DINO computes


def test_sdpa_attention_equals_dino_explicit_attention(device):
    torch.manual_seed(0)
    attn = Attention(48, num_heads=3).to(device)
    x = torch.randn(2, 10, 48, device=device)
    b, n, c = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, 3, c // 3).permute(2, 0, 3, 1, 4)
    weights = ((q @ k.transpose(-2, -1)) * (c // 3) ** -0.5).softmax(dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(b, n, c))
    assert torch.allclose(attn(x), expected, atol=1e-5)


@pytest.mark.parametrize("patch", [8, 16])
def test_network_output_shapes(patch, device):
    net, linear, cluster = (m.to(device) for m in build_model(tiny_cfg(patch), n_classes=5))
    out = net(torch.randn(2, 3, 64, 96, device=device))
    h, w = 64 // patch, 96 // patch
    assert out.code.shape == (2, 192, h, w)
    assert out.z.shape == (2 * h * w, 192)
    assert out.feats.shape == (2, 192, h, w)
    assert linear(out.code).shape == (2, 5, h, w)
    assert cluster(out.code).probs.shape == (2, 5, h, w)


def test_z_is_the_unit_projection_of_the_code_in_image_row_col_order():
    net, _, _ = build_model(tiny_cfg(), n_classes=3)
    out = net.eval()(torch.randn(2, 3, 48, 32))
    rows = out.code.permute(0, 2, 3, 1).reshape(-1, 192)
    assert torch.allclose(out.z, F.normalize(net.project_head(rows), dim=1), atol=1e-6)
    assert torch.allclose(out.z.norm(dim=1), torch.ones(out.z.shape[0]), atol=1e-5)


def test_untrained_decoder_reproduces_the_frozen_features(device):
    net, _, _ = build_model(tiny_cfg(), n_classes=3)
    out = net.to(device).eval()(torch.randn(1, 3, 32, 32, device=device))
    assert torch.allclose(out.code, out.feats, atol=1e-5)


def test_feature_dropout_is_active_only_in_training():
    net, _, _ = build_model(tiny_cfg(), n_classes=3)
    img = torch.randn(1, 3, 64, 64)
    torch.manual_seed(0)
    train_feats = net.train()(img).feats
    eval_feats = net.eval()(img).feats
    dropped = (train_feats == 0).all(dim=(0, 2, 3))
    assert dropped.any()
    kept = ~dropped
    assert torch.allclose(train_feats[:, kept], eval_feats[:, kept] / 0.9, atol=1e-5)


def test_state_dict_names_match_the_released_checkpoints():
    net, linear, cluster = build_model(tiny_cfg(extra=2), n_classes=4)
    prefixes = {k.split(".")[0] for k in net.state_dict()}
    assert prefixes == {"model", "decoder", "project_head"}
    assert list(linear.state_dict()) == ["weight", "bias"]
    assert list(cluster.state_dict()) == ["clusters"] and cluster.clusters.shape == (6, 192)


def test_only_decoder_and_projection_are_trainable():
    net, _, _ = build_model(tiny_cfg(), n_classes=3)
    trainable = {k.split(".")[0] for k, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"decoder", "project_head"}


def test_training_step_changes_decoder_and_projection_but_no_backbone_parameter():
    torch.manual_seed(0)
    net, _, _ = build_model(tiny_cfg(), n_classes=3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    img = torch.zeros(4, 3, 64, 64)
    img[:, :, :, 32:] = 1.0  # two flat halves: patches of a half are similar, so there are positives
    out = net.train()(img + 0.1 * torch.randn_like(img))
    loss_fn = PPAPLoss(TrainingCoeff(split=16, trainpatchsplit=4, initialcrit_pos=0.5, initialcrit_amb=0.0))
    result = loss_fn(out.z, out.feats)
    assert result.num_pos > 0
    result.loss.backward()
    optimizer.step()
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.startswith(("decoder.", "project_head."))}


def test_cluster_probe_assigns_one_hot_to_nearest_centroid():
    probe = ClusterProbe(2, 3)
    with torch.no_grad():
        probe.clusters.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    x = torch.tensor([[0.9, 0.1], [0.1, 0.9], [-0.5, 0.2]]).T.reshape(1, 2, 1, 3)
    out = probe(x)
    assert out.probs.argmax(1).flatten().tolist() == [0, 1, 2]
    assert torch.equal(out.probs.sum(1), torch.ones(1, 1, 3))
    assert out.loss.item() == pytest.approx(-out.inner.max(1).values.mean().item())


def test_cluster_probe_direct_mode_uses_the_code_itself():
    x = torch.randn(1, 3, 2, 2)
    out = ClusterProbe(3, 3)(x, is_direct=True)
    assert torch.equal(out.inner, x)
