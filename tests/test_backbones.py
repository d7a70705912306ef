"""DINOv2 (plain and with registers) and DINOv3 under the PPAP head: the official key layouts, the official forward
(tests/reference_backbones.py, written independently from the official code), weights, options, and whole runs."""
import json

import pytest
import torch

import eval as eval_script
import run
from model.ppap import PPAPNet, fit_to_patches
from model.vit import ARCHS, vit
from model.weights import DINOV3_DOWNLOADS, load_backbone_weights, official_url
from tests.conftest import DEMO_OPTIONS, ROOT, tiny_options
from tests.reference_backbones import official_state_dict, reference_patch_tokens
from utils.cli import run_main
from config import BACKBONES, PretrainedConfig, load_config
from utils.errors import ConfigError, WeightsError

NEW_FAMILIES = ("dinov2", "dinov2_reg", "dinov3")
MODELS = [(family, size) for family in NEW_FAMILIES for size in BACKBONES[family].widths]
SIZES = {14: [(224, 224), (98, 154)], 16: [(224, 224), (96, 160)]}  # a square and a non-square image
DEPTH = 2  # the official widths, heads and layers; two blocks are enough to compare them
# Measured: at most 3.8e-7 (float32, two blocks). The issue asks for 1e-4; 2e-6 also catches a wrong LayerNorm eps
# (1e-6 instead of DINOv3's 1e-5 moves the features by about 6e-6).
TOLERANCE = 2e-6


def patch_of(family: str) -> int:
    return BACKBONES[family].patch_sizes[0]


def loaded(family: str, model_type: str, seed: int = 1):
    state = official_state_dict(family, model_type, depth=DEPTH, seed=seed)
    backbone = vit(model_type, patch_of(family), depth=DEPTH, family=family)
    backbone.load_state_dict(state, strict=True)
    return backbone, state


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family, model_type", MODELS)
def test_the_backbone_has_the_official_keys_shapes_and_buffers(family, model_type):
    ours = vit(model_type, patch_of(family), depth=DEPTH, family=family).state_dict()
    official = official_state_dict(family, model_type, depth=DEPTH)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in official.items()}
    for key in ours:  # the buffers (DINOv3's RoPE periods and key-bias masks) are the official ones
        if key.endswith(("periods", "bias_mask")):
            assert torch.equal(ours[key], official[key]), key


@pytest.mark.parametrize("family, model_type", MODELS)
def test_features_and_code_equal_the_official_patch_tokens(family, model_type):
    backbone, state = loaded(family, model_type)
    net = PPAPNet(backbone, dropout=False).eval()
    for height, width in SIZES[patch_of(family)]:
        img = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height))
        expected = reference_patch_tokens(family, model_type, state, img)  # (B, h*w, C)
        with torch.no_grad():
            out = net(img)
        feats = out.feats.flatten(2).transpose(1, 2)
        assert out.feats.shape[-2:] == (height // backbone.patch_size, width // backbone.patch_size)
        assert relative(feats, expected) < TOLERANCE, (height, width)
        # the decoder starts as a copy of the last block, on the same tokens with the same RoPE: code == feats
        assert relative(out.code.flatten(2).transpose(1, 2), expected) < TOLERANCE, (height, width)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_training_mode_changes_nothing_in_the_frozen_backbone(family):
    """DINOv3's hub RoPE rescales its coordinates in training mode (an augmentation of its pretraining): never here."""
    backbone, state = loaded(family, "vit_small")
    net = PPAPNet(backbone, dropout=False).train()
    height, width = SIZES[patch_of(family)][1]
    img = torch.randn(2, 3, height, width)
    with torch.no_grad():
        feats = net(img).feats.flatten(2).transpose(1, 2)
    assert relative(feats, reference_patch_tokens(family, "vit_small", state, img)) < TOLERANCE


def test_evaluation_images_go_in_at_a_multiple_of_the_patch():
    img = torch.randn(1, 3, 320, 320)
    assert fit_to_patches(img, 14).shape[-2:] == (322, 322)
    assert fit_to_patches(img, 16) is img and fit_to_patches(img, 8) is img


@pytest.mark.parametrize("family, model_type, file", [
    ("dinov2", "vit_small", "dinov2_vits14/dinov2_vits14_pretrain.pth"),
    ("dinov2", "vit_giant2", "dinov2_vitg14/dinov2_vitg14_pretrain.pth"),
    ("dinov2_reg", "vit_base", "dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"),
    ("dinov2_reg", "vit_large", "dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth"),
])
def test_null_weights_download_the_official_dinov2_release(family, model_type, file, monkeypatch):
    asked = []

    def hub(url, map_location=None, progress=True):
        asked.append(url)
        return official_state_dict(family, model_type, depth=DEPTH)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", hub)
    pretrained = PretrainedConfig(name=family, model_type=model_type, dino_patch_size=14)
    assert official_url(pretrained) == "https://dl.fbaipublicfiles.com/dinov2/" + file
    load_backbone_weights(vit(model_type, 14, depth=DEPTH, family=family), pretrained)
    assert asked == ["https://dl.fbaipublicfiles.com/dinov2/" + file]


def test_null_weights_for_dinov3_say_where_to_get_them():
    pretrained = PretrainedConfig(name="dinov3", model_type="vit_base", dino_patch_size=16)
    with pytest.raises(WeightsError, match="licence") as err:
        load_backbone_weights(vit("vit_base", 16, depth=DEPTH, family="dinov3"), pretrained)
    assert DINOV3_DOWNLOADS in str(err.value)
    assert "pretrained_weights=/path/to/dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth" in str(err.value)


@pytest.mark.parametrize("family, model_type, looks_like", [
    ("dinov2_reg", "vit_small", "a DINOv2 vit_small/14 with 4 registers"),  # another family
    ("dinov3", "vit_small_plus", "a DINOv3 vit_small_plus/16"),  # the same width, SwiGLU
])
def test_a_file_of_another_backbone_is_refused_with_what_it_looks_like(tmp_path, family, model_type, looks_like):
    torch.save(official_state_dict(family, model_type, depth=DEPTH), tmp_path / "w.pth")
    pretrained = PretrainedConfig(name="dinov3", model_type="vit_small", dino_patch_size=16,
                                  pretrained_weights=str(tmp_path / "w.pth"))
    with pytest.raises(WeightsError, match=f"looks like {looks_like}; the option file asks for a DINOv3 vit_small/16"):
        load_backbone_weights(vit("vit_small", 16, depth=DEPTH, family="dinov3"), pretrained)


def test_training_checkpoints_and_the_satellite_norm_load(tmp_path):
    state = official_state_dict("dinov3", "vit_large", depth=DEPTH)
    sat = {**state, "local_cls_norm.weight": torch.ones(1024), "local_cls_norm.bias": torch.zeros(1024)}
    teacher = {"teacher": {**{f"backbone.{k}": v for k, v in state.items()}, "dino_head.mlp.0.weight": torch.ones(2)}}
    for name, obj in (("sat.pth", sat), ("teacher.pth", teacher)):
        torch.save(obj, tmp_path / name)
        backbone = vit("vit_large", 16, depth=DEPTH, family="dinov3")
        load_backbone_weights(backbone, PretrainedConfig(name="dinov3", model_type="vit_large", dino_patch_size=16,
                                                         pretrained_weights=str(tmp_path / name)))
        assert torch.equal(backbone.cls_token, state["cls_token"])


@pytest.mark.parametrize("pretrained, message", [
    ({"name": "dinov2", "model_type": "vit_small", "dino_patch_size": 16},
     r"model\.pretrained\.dino_patch_size must be 14 for DINOv2 \(name 'dinov2'; got 16\)"),
    ({"name": "dinov3", "model_type": "vit_giant2", "dino_patch_size": 16},
     r"model\.pretrained\.model_type must be one of 'vit_small', 'vit_small_plus', 'vit_base', 'vit_large', "
     r"'vit_huge_plus' for DINOv3"),
    ({"name": "dino", "model_type": "vit_large", "dino_patch_size": 8},
     r"model_type must be one of 'vit_tiny', 'vit_small', 'vit_base' for DINO"),
    ({"name": "dinov4", "model_type": "vit_small", "dino_patch_size": 16},
     r"model\.pretrained\.name must be one of 'dino', 'dinov2', 'dinov2_reg', 'dinov3'"),
])
def test_a_backbone_that_does_not_exist_is_a_config_error(tmp_path, pretrained, message):
    options = tmp_path / "o.json"
    options.write_text(json.dumps({"base": str(DEMO_OPTIONS), "model": {"pretrained": pretrained}}))
    with pytest.raises(ConfigError, match=message):
        load_config(options)


def test_the_width_and_the_resolution_must_fit_the_family():
    with pytest.raises(ConfigError, match=r"model\.dim \(384\) must equal the width of DINOv2 vit_base/14 \(768\)"):
        load_config(ROOT / "json" / "server" / "cocostuff_dinov2_b14.json", ["model.dim=384"])
    with pytest.raises(ConfigError, match=r"dataset\.res \(320\) must be a multiple of model\.pretrained\.dino_patch_size "
                                          r"\(14\)"):
        load_config(ROOT / "json" / "server" / "cocostuff_dinov2_b14.json", ["dataset.res=320"])


def test_every_family_and_size_has_an_architecture():
    assert {(f, s) for f in BACKBONES for s in BACKBONES[f].widths} == set(ARCHS)


@pytest.mark.usefixtures("shallow_vit")
@pytest.mark.parametrize("family, model_type, res", [("dinov2_reg", "vit_small", 56), ("dinov3", "vit_small", 64)])
def test_a_new_backbone_trains_and_its_checkpoint_evaluates(tiny_data, tmp_path, family, model_type, res):
    options = tiny_options(tmp_path, tiny_data, dataset={"res": res}, model={
        "dim": BACKBONES[family].widths[model_type],
        "pretrained": {"name": family, "model_type": model_type, "dino_patch_size": patch_of(family)}})
    assert run_main(run.main, ["--opt", str(options), "--debug"]) == 0
    last = tmp_path / "output" / "tiny" / "last.pth"
    assert run_main(eval_script.main, ["--checkpoint", str(last), "--out", str(tmp_path / "eval"), "--debug"]) == 0
    report = json.loads((tmp_path / "eval" / "eval_report.json").read_text())
    assert report["n_images"] == 4 and 0 <= report["no_crf"]["Cluster_Accuracy"] <= 100


@pytest.mark.usefixtures("shallow_vit")
def test_the_similarity_tool_reports_what_the_thresholds_select(tiny_data, tmp_path, capsys):
    from dataset import build_dataset
    from model import build_model
    from tools import similarity

    options = tiny_options(tmp_path, tiny_data)
    assert run_main(similarity.main, ["--opt", str(options), "--images", "6", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    quantiles = list(result["quantiles"].values())
    assert quantiles == sorted(quantiles) and result["images"] == 6 and result["patches_per_image"] == 16
    cfg = load_config(options)  # the same sample, computed here directly
    train_set = build_dataset(cfg.dataset, "train")
    chosen = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(similarity.SAMPLE_SEED))[:6]
    torch.manual_seed(cfg.seed)
    net = build_model(cfg.model, 3)[0].eval()
    with torch.no_grad():
        feats = net(torch.stack([train_set[int(i)]["img"] for i in chosen])).feats
    f = torch.nn.functional.normalize(feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]), dim=1)
    sim = f @ f.T
    assert result["share_above_initialcrit_pos"] == pytest.approx(float((sim > 0.5).float().mean()))
    assert result["share_below_initialcrit_amb"] == pytest.approx(float((sim < 0.1).float().mean()))
    assert result["initial_positives_per_anchor"] == pytest.approx(result["share_above_initialcrit_pos"] * (4 * 16 - 1))
