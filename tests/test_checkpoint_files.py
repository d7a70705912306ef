"""A file that is not a checkpoint, wherever it is given (eval.py --checkpoint, predict.py --checkpoint, run.py
--resume's last.pth, model.pretrained.pretrained_weights), ends in one line that names the file and says what it is,
with exit status 2."""
import io
import pickle
import re
import warnings
import zipfile

import numpy as np
import pytest
import torch

import eval as eval_command
import predict as predict_command
import run as run_command
from engine.checkpoint import load_checkpoint
from model import ppap
from model.weights import load_backbone_weights
from tests.conftest import tiny_options
from utils.cli import run_main
from config import PretrainedConfig
from utils.errors import WeightsError
from utils.files import describe_file, read_torch_file

pytestmark = pytest.mark.usefixtures("shallow_vit")


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _numpy_bytes(save, *arrays, **named) -> bytes:
    buffer = io.BytesIO()
    save(buffer, *arrays, **named)
    return buffer.getvalue()


# kind -> (the file's bytes, what the message must say it is)
KINDS = {
    "text": (b"epoch 12: loss 0.31\nthese are notes, not weights\n", r"a text file"),
    "short json-like text": (b'{"a": 1}', r"a text file"),
    "comma-separated text": (b"a,b,c\n1,2,3\n", r"a text file"),
    "empty": (b"", r"empty \(0 bytes\)"),
    "zip cut short": (_torch_bytes({"w": torch.zeros(1000)})[:700], r"a zip archive cut short"),
    "numpy array": (_numpy_bytes(np.save, np.zeros((2, 3))), r"a numpy array \(\.npy"),
    "numpy arrays": (_numpy_bytes(np.savez, w=np.zeros(3), b=np.ones(2)), r"numpy arrays \(\.npz"),
    "Python pickle": (pickle.dumps({"w": [1.0, 2.0]}, protocol=4), r"a Python pickle not written by torch\.save"),
    "another model's weights": (_torch_bytes({"conv1.weight": torch.zeros(4, 3, 7, 7), "fc.bias": torch.zeros(10)}),
                                r"another model's weights, .*conv1\.weight"),
}


@pytest.fixture(params=list(KINDS))
def wrong_file(request, tmp_path):
    """(path of a file of one kind, the pattern its message must hold)."""
    content, said = KINDS[request.param]
    path = tmp_path / "given" / "weights.pth"
    path.parent.mkdir()
    path.write_bytes(content)
    return path, said


def assert_one_line_naming(capsys, status, path, said):
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert str(path) in err, err
    assert re.search(said, err), err


def test_eval_checkpoint_flag_says_what_the_file_is(wrong_file, capsys):
    path, said = wrong_file
    status = run_main(eval_command.main, ["--checkpoint", str(path), "--debug"])
    assert_one_line_naming(capsys, status, path, said)


def test_predict_checkpoint_flag_says_what_the_file_is(wrong_file, tiny_data, tmp_path, capsys):
    path, said = wrong_file
    image = tiny_data / "imgs" / "val" / "000.png"
    status = run_main(predict_command.main, ["--checkpoint", str(path), "--out", str(tmp_path / "out"), str(image)])
    assert_one_line_naming(capsys, status, path, said)


def test_resume_from_a_last_pth_that_is_not_a_checkpoint_says_what_it_is(wrong_file, tiny_data, tmp_path, capsys):
    source, said = wrong_file
    options = tiny_options(tmp_path / "opts", tiny_data)
    last = tmp_path / "opts" / "output" / "tiny" / "last.pth"
    last.parent.mkdir(parents=True)
    last.write_bytes(source.read_bytes())
    status = run_main(run_command.main, ["--opt", str(options), "--debug", "--resume"])
    assert_one_line_naming(capsys, status, last, said)


def test_pretrained_weights_that_are_not_weights_say_what_the_file_is(wrong_file, tiny_data, tmp_path, capsys):
    path, said = wrong_file
    options = tiny_options(tmp_path / "opts", tiny_data)
    status = run_main(run_command.main, ["--opt", str(options), "--debug",
                                         f"model.pretrained.pretrained_weights={path}"])
    assert_one_line_naming(capsys, status, path, said)


@pytest.mark.parametrize("kind", [kind for kind in KINDS if kind != "another model's weights"])  # those load
def test_reading_a_file_that_is_not_a_torch_file_warns_nothing_beside_its_one_line(kind, tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(KINDS[kind][0])
    with warnings.catch_warnings(record=True) as caught, pytest.raises(WeightsError):
        warnings.simplefilter("always")
        read_torch_file(path)
    assert not caught, [str(w.message) for w in caught]


def test_another_models_weights_as_checkpoint_are_said_not_to_be_a_ppap_checkpoint(tmp_path):
    path = tmp_path / "resnet.pth"
    path.write_bytes(KINDS["another model's weights"][0])
    with pytest.raises(WeightsError, match=r"keys are not a PPAP checkpoint's \(conv1\.weight, fc\.bias\)"):
        load_checkpoint(path)


def test_another_models_weights_as_backbone_are_said_not_to_be_a_vit_s(tmp_path):
    path = tmp_path / "resnet.pth"
    path.write_bytes(KINDS["another model's weights"][0])
    with pytest.raises(WeightsError, match=r"keys are not a ViT's \(conv1\.weight, fc\.bias\)"):
        load_backbone_weights(ppap.vit("vit_tiny", 16), PretrainedConfig(name="dino", model_type="vit_tiny",
                                                                         dino_patch_size=16,
                                                                         pretrained_weights=str(path)))


def test_a_vit_s_weights_given_as_checkpoint_point_at_pretrained_weights(tmp_path):
    path = tmp_path / "dino.pth"
    torch.save(ppap.vit("vit_tiny", 16).state_dict(), path)
    with pytest.raises(WeightsError, match=r"DINO vit_tiny/16 .*model\.pretrained\.pretrained_weights"):
        load_checkpoint(path)


def test_a_zip_of_other_files_is_named_with_its_members(tmp_path):
    path = tmp_path / "notes.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(WeightsError, match=r"a zip archive of other files \(readme\.txt\)"):
        read_torch_file(path)


def test_binary_data_of_no_known_kind_shows_its_first_bytes(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(bytes([0, 255, 1, 254, 2, 253, 3, 252]) * 8)
    with pytest.raises(WeightsError, match=r"binary data of no kind known here \(it begins 00 ff 01 fe"):
        read_torch_file(path)


def test_a_legacy_torch_file_is_still_read(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.arange(3.0)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(read_torch_file(path)["w"], torch.arange(3.0))


def test_a_torch_file_is_not_described_as_something_else(tmp_path):
    path = tmp_path / "fine.pth"
    torch.save({"w": torch.zeros(2)}, path)
    assert describe_file(path) is None


def test_a_file_of_white_space_is_named_as_such(tmp_path):
    path = tmp_path / "blank.pth"
    path.write_text("  \n\n")
    with pytest.raises(WeightsError, match=r"a text file of white space only"):
        read_torch_file(path)


def test_torch_s_warnings_about_a_file_that_loads_are_passed_on(tmp_path, monkeypatch):
    path = tmp_path / "fine.pth"
    torch.save({"w": torch.zeros(2)}, path)
    load = torch.load

    def warning_load(*args, **kwargs):
        warnings.warn("a note about this file", UserWarning)
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", warning_load)
    with pytest.warns(UserWarning, match="a note about this file"):
        read_torch_file(path)
