import json
import os
import threading
from pathlib import Path

import pytest
import torch

from utils.cli import base_parser, config_from_args, run_main
from config import Config, TrainingCoeff, config_from_dict, config_to_dict, load_config
from utils.device import resolve_device
from utils.errors import ConfigError

ORIGINAL = Path(__file__).parent / "data" / "original"


def write(tmp_path: Path, data: dict, name: str = "opt.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def original(name: str = "cocostuff8.json") -> dict:
    return json.loads((ORIGINAL / name).read_text())


def test_original_option_file_loads_unchanged():
    cfg = load_config(ORIGINAL / "cocostuff8.json")
    assert cfg.training_coeff.initialcrit_pos == 0.55
    assert cfg.training_coeff.sigma_pos == 3.0 and isinstance(cfg.training_coeff.sigma_pos, float)
    assert cfg.model.pretrained.model_type == "vit_small" and cfg.model.pretrained.dino_patch_size == 8
    assert cfg.optimizer.net.name == "adamw" and cfg.optimizer.net.weight_decay == 0.1
    assert cfg.gpu_ids == (0,)


def test_original_adam_file_without_weight_decay_loads():
    cfg = load_config(ORIGINAL / "potsdam.json")
    assert cfg.optimizer.net.name == "adam" and cfg.optimizer.net.weight_decay == 0.0


def test_new_keys_get_documented_defaults():
    cfg = load_config(ORIGINAL / "cocostuff8.json")
    assert (cfg.seed, cfg.device, cfg.precision) == (0, "auto", "auto")
    assert (cfg.training_coeff.base_tau, cfg.training_coeff.split) == (0.07, 784)
    assert cfg.eval.crf_workers is None and cfg.eval.legacy_extra_cluster_mask is False


def test_sections_are_frozen():
    cfg = load_config(ORIGINAL / "cocostuff8.json")
    with pytest.raises(AttributeError):
        cfg.train.epoch = 1


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    data = original()
    data["training_coeff"]["prop_iterr"] = 2
    path = write(tmp_path, data)
    with pytest.raises(ConfigError, match=r"opt\.json: unknown key training_coeff\.prop_iterr \(did you mean training_coeff\.prop_iter\?\)"):
        load_config(path)


def test_unknown_top_level_key_is_rejected(tmp_path):
    data = original()
    data["optimiser"] = {}
    with pytest.raises(ConfigError, match="unknown key optimiser .did you mean optimizer"):
        load_config(write(tmp_path, data))


def test_wrong_type_names_key_and_value(tmp_path):
    data = original()
    data["model"]["dim"] = "384"
    with pytest.raises(ConfigError, match=r'model\.dim must be an integer \(got str "384"\)'):
        load_config(write(tmp_path, data))


def test_boolean_key_rejects_integer(tmp_path):
    data = original()
    data["eval"]["is_crf"] = 1
    with pytest.raises(ConfigError, match=r"eval\.is_crf must be true or false"):
        load_config(write(tmp_path, data))


@pytest.mark.parametrize("section, key, value, message", [
    ("optimizer.net", "lr", -1e-3, r"optimizer\.net\.lr must be >= 0"),
    ("training_coeff", "prop_iter", -1, r"training_coeff\.prop_iter must be >= 0"),
    ("training_coeff", "sigma_pos", 0, r"training_coeff\.sigma_pos must be > 0"),
    ("training_coeff", "sigma_amb", -2, r"training_coeff\.sigma_amb must be > 0"),
    ("training_coeff", "initialcrit_pos", 1.5, r"training_coeff\.initialcrit_pos must be a cosine similarity in \[-1, 1\]"),
    ("training_coeff", "initialcrit_amb", -1.2, r"training_coeff\.initialcrit_amb must be a cosine similarity"),
    ("training_coeff", "tau", 0, r"training_coeff\.tau must be > 0"),
    ("model.pretrained", "model_type", "vit_huge", r"model\.pretrained\.model_type must be one of 'vit_tiny', 'vit_small', 'vit_base'"),
    ("model.pretrained", "dino_patch_size", 14, r"model\.pretrained\.dino_patch_size must be 8 or 16 for DINO \(name 'dino'; got 14\)"),
    ("model", "arch", "resnet", r"model\.arch must be one of 'dino'"),
    ("dataloader", "batch_size", 0, r"dataloader\.batch_size must be >= 1"),
    ("wandb", "mode", "sometimes", r"wandb\.mode must be one of 'online', 'offline', 'disabled'"),
    ("train", "gather_feats", "fp8", r"train\.gather_feats must be one of fp32, fp16, bf16 \(got 'fp8'\)"),
])
def test_impossible_value_is_named(tmp_path, section, key, value, message):
    data = original()
    node = data
    for part in section.split("."):
        node = node[part]
    node[key] = value
    path = write(tmp_path, data)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert str(err.value).startswith(str(path))


def test_dim_mismatch_names_both_values(tmp_path):
    data = original()
    data["model"]["dim"] = 768
    with pytest.raises(ConfigError, match=r"model\.dim \(768\) must equal the width of DINO vit_small/8 \(384\)"):
        load_config(write(tmp_path, data))


def test_threshold_order_is_checked():
    with pytest.raises(ConfigError, match="initialcrit_amb .0.6. must not exceed initialcrit_pos .0.5."):
        TrainingCoeff(initialcrit_pos=0.5, initialcrit_amb=0.6)


def test_weight_decay_with_adam_is_refused(tmp_path):
    data = original("potsdam.json")
    data["optimizer"]["net"]["weight_decay"] = 0.1
    with pytest.raises(ConfigError, match=r"optimizer\.net\.weight_decay \(0\.1\) is only applied by adamw"):
        load_config(write(tmp_path, data))


def test_eval_extra_clusters_must_match_model(tmp_path):
    data = original()
    data["eval"]["extra_clusters"] = 3
    with pytest.raises(ConfigError, match=r"eval\.extra_clusters \(3\) must equal model\.extra_clusters \(0\)"):
        load_config(write(tmp_path, data))


def test_resolution_must_be_multiple_of_patch(tmp_path):
    data = original()
    data["dataset"]["res"] = 230
    with pytest.raises(ConfigError, match=r"dataset\.res \(230\) must be a multiple of"):
        load_config(write(tmp_path, data))


def test_directory_dataset_needs_class_count(tmp_path):
    data = original()
    data["dataset"]["data_type"] = "directory"
    with pytest.raises(ConfigError, match=r"dataset\.n_classes must be set"):
        load_config(write(tmp_path, data))


def test_missing_required_key_is_named(tmp_path):
    data = original()
    del data["dataset"]["data_path"]
    with pytest.raises(ConfigError, match=r"missing key dataset\.data_path"):
        load_config(write(tmp_path, data))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"option file .*nope\.json not found"):
        load_config(tmp_path / "nope.json")


def test_invalid_json_gives_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "seed": 1,\n  "device": cpu\n}')
    with pytest.raises(ConfigError, match=r"bad\.json: not valid JSON: .* at line 3, column 13"):
        load_config(path)


def test_dotted_overrides_are_parsed_and_typed():
    cfg = load_config(ORIGINAL / "cocostuff8.json",
                      ["dataset.data_path=/data", "train.epoch=1", "optimizer.net.lr=1e-4",
                       "model.pretrained.pretrained_weights=null", "eval.is_crf=false", "gpu_ids=[1,2]"])
    assert cfg.dataset.data_path == "/data"
    assert cfg.train.epoch == 1
    assert cfg.optimizer.net.lr == pytest.approx(1e-4)
    assert cfg.model.pretrained.pretrained_weights is None
    assert cfg.eval.is_crf is False
    assert cfg.gpu_ids == (1, 2)


def test_override_may_add_a_key_missing_from_the_file():
    cfg = load_config(ORIGINAL / "cocostuff8.json", ["training_coeff.base_tau=0.1", "seed=3"])
    assert cfg.training_coeff.base_tau == 0.1 and cfg.seed == 3


def test_unknown_override_key_is_named():
    with pytest.raises(ConfigError, match=r"override 'train\.epochs=1': unknown key train\.epochs \(did you mean train\.epoch\?\)"):
        load_config(ORIGINAL / "cocostuff8.json", ["train.epochs=1"])


def test_override_without_equals_sign_is_refused():
    with pytest.raises(ConfigError, match=r"expected dotted\.key=value"):
        load_config(ORIGINAL / "cocostuff8.json", ["train.epoch"])


def test_override_below_a_value_is_refused():
    with pytest.raises(ConfigError, match=r"train\.epoch is a value, not a section"):
        load_config(ORIGINAL / "cocostuff8.json", ["train.epoch.x=1"])


def test_wrongly_typed_override_is_named_instead_of_the_file():
    with pytest.raises(ConfigError) as err:
        load_config(ORIGINAL / "cocostuff8.json", ["train.epoch=many"])
    assert str(err.value) == "command-line override 'train.epoch=many': train.epoch must be an integer (got str \"many\")"


@pytest.mark.parametrize("override, message", [
    ("gpu_ids=[a]", "gpu_ids[0] must be an integer"),  # an item of a list the override set
    ("gpu_ids=[-1]", "gpu_ids must be GPU indices >= 0"),
])
def test_a_wrong_list_override_is_blamed_on_the_override(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(ORIGINAL / "cocostuff8.json", [override])
    assert str(err.value).startswith(f"command-line override {override!r}: {message}")


def test_impossible_override_value_is_blamed_on_the_override():
    with pytest.raises(ConfigError, match=r"^command-line override 'training_coeff\.tau=0': training_coeff\.tau must "):
        load_config(ORIGINAL / "cocostuff8.json", ["training_coeff.tau=0"])


def test_a_bad_value_in_the_file_is_still_blamed_on_the_file(tmp_path):
    data = original()
    data["train"]["epoch"] = "many"
    with pytest.raises(ConfigError, match=r"^.*opt\.json: train\.epoch must be an integer"):
        load_config(write(tmp_path, data), ["train.print_freq=5"])


def test_empty_override_is_refused_instead_of_meaning_null():
    with pytest.raises(ConfigError, match=r"'model\.pretrained\.pretrained_weights=' gives no value: write "
                                          r"model\.pretrained\.pretrained_weights=null for null"):
        load_config(ORIGINAL / "cocostuff8.json", ["model.pretrained.pretrained_weights="])


def test_pair_override_keeps_value_verbatim():
    cfg = load_config(ORIGINAL / "cocostuff8.json", [("dataset.data_path", "/d/a b,[c]=1")])
    assert cfg.dataset.data_path == "/d/a b,[c]=1"


def test_base_file_is_extended(tmp_path):
    write(tmp_path, original(), "base.json")
    child = write(tmp_path, {"base": "base.json", "checkpoint": "ppap_cocostuff8", "eval": {"is_crf": False}}, "child.json")
    cfg = load_config(child)
    assert cfg.checkpoint == "ppap_cocostuff8"
    assert cfg.eval.is_crf is False and cfg.eval.n_images == 5
    assert cfg.training_coeff.tau == 0.8


def test_base_cycle_is_refused(tmp_path):
    write(tmp_path, {"base": "b.json"}, "a.json")
    write(tmp_path, {"base": "a.json"}, "b.json")
    with pytest.raises(ConfigError, match="cycle of base files"):
        load_config(tmp_path / "a.json")


def test_missing_base_file_is_named_with_the_file_that_names_it(tmp_path):
    child = write(tmp_path, {"base": "absent.json"}, "child.json")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    assert str(err.value).startswith(f'{child}: "base": absent.json not found (looked for {tmp_path / "absent.json"};')


def test_folder_given_as_option_file_is_called_a_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"option file .* is a folder; pass a JSON file with --opt"):
        load_config(tmp_path)


def test_option_file_may_come_through_a_pipe(tmp_path):
    fifo = tmp_path / "options.pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(json.dumps(original())))
    writer.start()
    cfg = load_config(fifo)
    writer.join()
    assert cfg.model.pretrained.model_type == "vit_small"


def test_loading_has_no_side_effects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, original())
    before_env = dict(os.environ)
    load_config(path)
    assert dict(os.environ) == before_env
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opt.json"]


def test_resolved_config_round_trips():
    cfg = load_config(ORIGINAL / "cocostuff8.json", ["seed=5"])
    data = json.loads(json.dumps(config_to_dict(cfg)))
    assert config_from_dict(data, "saved") == cfg


def test_cli_applies_data_path_and_overrides():
    args = base_parser("t").parse_args(["--opt", str(ORIGINAL / "cocostuff8.json"), "--data_path", "/x y",
                                        "train.epoch=2"])
    cfg = config_from_args(args)
    assert isinstance(cfg, Config)
    assert cfg.dataset.data_path == "/x y" and cfg.train.epoch == 2


def test_overrides_may_come_between_flags():
    args = base_parser("t").parse_intermixed_args(["--opt", str(ORIGINAL / "cocostuff8.json"), "train.epoch=2",
                                                   "--debug", "seed=4", "--data_path", "/d", "dataset.res=448"])
    cfg = config_from_args(args)
    assert (cfg.train.epoch, cfg.seed, cfg.dataset.res, cfg.dataset.data_path, args.debug) == (2, 4, 448, "/d", True)


def test_user_error_becomes_one_line_and_status_2(capsys):
    def main(argv):
        raise ConfigError("x.json: unknown key foo")

    assert run_main(main, []) == 2
    err = capsys.readouterr().err
    assert err == "error: x.json: unknown key foo\n"


def test_auto_device_is_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_cuda_device_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device is available"):
        resolve_device("cuda:0")


def test_keys_left_out_of_a_section_take_their_defaults(tmp_path):
    data = original()
    data["optimizer"] = {"net": {"name": "adamw", "lr": 2e-4}}
    cfg = load_config(write(tmp_path, data))
    assert (cfg.optimizer.net.name, cfg.optimizer.net.lr, cfg.optimizer.net.weight_decay) == ("adamw", 2e-4, 0.0)
    assert (cfg.optimizer.cluster.name, cfg.optimizer.cluster.lr) == ("adam", 1e-3)


def test_optional_wandb_keys_of_the_original_are_accepted(tmp_path):
    data = original()
    data["wandb"].update({"id": "abc123", "notes": "first try", "tags": ["coco", "s8"]})
    cfg = load_config(write(tmp_path, data))
    assert (cfg.wandb.id, cfg.wandb.notes, cfg.wandb.tags) == ("abc123", "first try", ("coco", "s8"))


@pytest.mark.parametrize("override, message", [
    ("seed=4294967296", r"seed must be in \[0, 2\*\*32\)"),
    ("wandb.name=..", r"wandb\.name must be a folder name without '/'"),
    ("training_coeff.tau=.inf", r"training_coeff\.tau must be a finite number \(got float inf\)"),
    ("optimizer.net.lr=.nan", r"optimizer\.net\.lr must be a finite number"),
])
def test_values_no_run_can_use_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ORIGINAL / "cocostuff8.json", [override])


def test_a_bad_value_in_a_base_file_is_blamed_on_the_base_file(tmp_path):
    data = original()
    data["train"]["epoch"] = "many"
    base = write(tmp_path, data, "base.json")
    child = write(tmp_path, {"base": "base.json", "seed": 3}, "child.json")
    with pytest.raises(ConfigError, match=rf"^{base}: train\.epoch must be an integer"):
        load_config(child)
