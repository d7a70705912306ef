"""The second stage (engine/self_training.py): the teacher's pseudo-labels against a direct computation, the confidence
mask, the teacher's updates, and second-stage runs end to end: their checkpoints, label independence, resume."""
import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

import eval as eval_script
import predict
import run
from config import SelfTrainingConfig, load_config
from crf.refiner import dense_crf
from dataset.classes import IGNORE
from dataset.image import denormalize_to_uint8
from engine.checkpoint import RELEASED_KEYS, load_checkpoint
from engine.evaluate import checkpoint_sha256
from engine.primaps import principal_masks, vote
from engine.self_training import (RECORD_KEY, TEACHER_KEY, SelfTraining, Teacher, augment, augmentation, confident,
                                   focal_weights, teacher_code, teacher_similarities)
from engine.train import iteration_stream
from loss import probe_cross_entropy
from model import build_model
from tests.conftest import SHALLOW_DEPTH, tiny_options, weights_differ
from tests.world import run_program
from utils.cli import run_main

pytestmark = pytest.mark.usefixtures("shallow_vit")


# ---- the teacher's maps, against a direct computation ----

@pytest.fixture(scope="module")
def tiny_stage(tmp_path_factory, tiny_data):
    """A random first-stage model of the tiny options, its teacher moved away from the student (as after some EMA
    steps), and three images."""
    cfg = load_config(tiny_options(tmp_path_factory.mktemp("stage"), tiny_data))
    torch.manual_seed(0)
    net, _, cluster = build_model(cfg.model, 3)
    teacher = Teacher(net, cluster)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    img = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return cfg, net.eval(), teacher, img


def bilinear(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """B x K x h x w -> B x K x height x width, bilinear with half-pixel centres (align_corners False), written out."""
    def axis(n_in: int, n_out: int):
        source = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        low = np.minimum(np.floor(source).astype(int), n_in - 1)
        return low, np.minimum(low + 1, n_in - 1), source - low

    (y0, y1, fy), (x0, x1, fx) = axis(maps.shape[2], height), axis(maps.shape[3], width)
    fy, fx = fy[:, None], fx[None, :]
    top = maps[:, :, y0][:, :, :, x0] * (1 - fx) + maps[:, :, y0][:, :, :, x1] * fx
    bottom = maps[:, :, y1][:, :, :, x0] * (1 - fx) + maps[:, :, y1][:, :, :, x1] * fx
    return top * (1 - fy) + bottom * fy


def direct_probs(net, teacher, img, temperature, tta=False) -> np.ndarray:
    """The teacher as a whole network (the student's with the teacher's decoder), in float64 numpy."""
    whole = copy.deepcopy(net).eval()
    whole.decoder.load_state_dict(teacher.decoder.state_dict())
    with torch.no_grad():
        code = whole(img).code.double().numpy()
        if tta:
            code = (code + whole(img.flip(-1)).code.double().flip(-1).numpy()) / 2
    centroids = teacher.cluster.clusters.detach().double().numpy()
    code = code / np.maximum(np.linalg.norm(code, axis=1, keepdims=True), 1e-12)
    centroids = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    sims = bilinear(np.einsum("bchw,kc->bkhw", code, centroids), *img.shape[-2:])
    logits = sims / temperature
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True), sims


def decided(probs: np.ndarray, margin: float = 1e-4) -> np.ndarray:
    """Pixels whose two most probable clusters are more than ``margin`` apart: their label does not hang on rounding."""
    top2 = np.sort(probs, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) > margin


@pytest.mark.parametrize("tta", [False, True])
def test_the_pseudo_labels_are_the_teachers_most_probable_clusters(tiny_stage, tta):
    cfg, net, teacher, img = tiny_stage
    st_cfg = SelfTrainingConfig(temperature=0.2, tta=tta)
    with SelfTraining(st_cfg, teacher, {}, is_direct=False) as st:
        with torch.no_grad():
            pseudo = st.pseudo_labels(net, net(img).frozen, img)
    probs, _ = direct_probs(net, teacher, img, 0.2, tta)
    assert pseudo.labels.shape == pseudo.confidence.shape == (3, 64, 64)
    np.testing.assert_allclose(pseudo.confidence.numpy(), probs.max(1), rtol=0, atol=1e-5)
    sure = decided(probs)
    assert sure.mean() > 0.99
    np.testing.assert_array_equal(pseudo.labels.numpy()[sure], probs.argmax(1)[sure])
    assert (pseudo.labels != IGNORE).all()  # confidence 0 keeps every pixel


def test_the_teacher_similarities_are_the_patches_cosines_upsampled(tiny_stage):
    _, net, teacher, img = tiny_stage
    with torch.no_grad():
        sims = teacher_similarities(net, teacher, net(img).frozen, img)
    _, expected = direct_probs(net, teacher, img, 1.0)
    np.testing.assert_allclose(sims.double().numpy(), expected, rtol=0, atol=1e-5)


def test_pixels_below_the_confidence_are_ignored():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.1, 0.5, 0.4], [0.2, 0.2, 0.6]]).T
    pseudo = confident(probs.reshape(1, 3, 2, 2), 0.5)
    assert pseudo.labels.tolist() == [[[0, IGNORE], [1, 2]]]
    assert pseudo.confidence.flatten().tolist() == pytest.approx([0.7, 0.4, 0.5, 0.6])


def test_the_focal_weights_are_one_minus_each_clusters_share_of_the_kept_labels():
    labels = torch.tensor([[[0, 0, 0], [1, IGNORE, 2]], [[0, 1, IGNORE], [0, 0, 1]]])  # 6 x 0, 3 x 1, 1 x 2, 2 ignored
    for focal in (1.0, 3.0):
        expected = [(1 - 6 / 10) ** focal, (1 - 3 / 10) ** focal, (1 - 1 / 10) ** focal, 1.0]  # cluster 3: no pixel
        assert focal_weights(labels, 4, focal).tolist() == pytest.approx(expected)
    assert focal_weights(torch.full((1, 2, 2), IGNORE), 3, 2.0).tolist() == [1.0, 1.0, 1.0]  # nothing kept


def test_the_focal_cross_entropy_is_the_weighted_mean_of_the_pixels_losses():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64)  # upsampled to 8 x 8
    labels = torch.randint(0, 3, (2, 8, 8), generator=generator)
    labels[0, :2] = IGNORE
    weight = torch.tensor([0.2, 1.0, 0.5], dtype=torch.float64)
    up = bilinear(logits.numpy(), 8, 8)
    log_probs = up - up.max(1, keepdims=True) - np.log(np.exp(up - up.max(1, keepdims=True)).sum(1, keepdims=True))
    total = norm = 0.0
    for b, y, x in zip(*np.nonzero(labels.numpy() != IGNORE)):
        c = int(labels[b, y, x])
        total, norm = total - weight[c].item() * log_probs[b, c, y, x], norm + weight[c].item()
    assert probe_cross_entropy(logits, labels, 3, class_weight=weight).item() == pytest.approx(total / norm, rel=1e-9)
    assert probe_cross_entropy(logits, labels, 3, class_weight=torch.ones(3, dtype=torch.float64)).item() == \
        pytest.approx(probe_cross_entropy(logits, labels, 3).item(), rel=1e-12)  # equal weights: the plain mean


def test_the_students_augmentation_repeats_from_the_iterations_stream(tiny_stage):
    _, _, teacher, img = tiny_stage
    st = SelfTraining(SelfTrainingConfig(augment=True), teacher, {}, is_direct=False)
    params = augmentation(3, iteration_stream(0, 5))
    assert ((params[:, 0] >= 0.1) & (params[:, 0] <= 2.0)).all() and not (params[:, 1] * params[:, 2]).any()
    seen = st.student_input(img, iteration_stream(0, 5))
    assert torch.equal(seen, augment(img, params)) and torch.equal(st.student_input(img, iteration_stream(0, 5)), seen)
    assert not torch.allclose(seen, img, atol=1e-3)


def test_two_processes_augment_their_halves_as_one_process_augments_the_batch(tiny_stage):
    _, _, teacher, img = tiny_stage
    st = SelfTraining(SelfTrainingConfig(augment=True), teacher, {}, is_direct=False)
    batch = torch.cat([img, img.flip(-1)])
    halves = [st.student_input(batch[3 * rank:3 * rank + 3], iteration_stream(0, 5), SimpleNamespace(rank=rank, size=2))
              for rank in (0, 1)]
    torch.testing.assert_close(torch.cat(halves), st.student_input(batch, iteration_stream(0, 5)), rtol=0, atol=1e-6)


def test_the_teacher_labels_the_image_the_student_sees_augmented(tiny_stage, monkeypatch):
    _, net, teacher, img = tiny_stage
    st = SelfTraining(SelfTrainingConfig(augment=True), teacher, {}, is_direct=False)
    seen = st.student_input(img, iteration_stream(0, 5))
    frozen_seen = []
    monkeypatch.setattr(SelfTraining, "pseudo_labels", lambda self, net_, frozen, image: frozen_seen.append(frozen)
                        or confident(torch.rand(3, 3, 64, 64), 0.0))
    with torch.no_grad():
        st.loss(net, net(seen), img, teacher.cluster)
        torch.testing.assert_close(frozen_seen[0].tokens, net.frozen(img).tokens, rtol=0, atol=1e-6)
        assert not torch.allclose(frozen_seen[0].tokens, net.frozen(seen).tokens, atol=1e-3)


def test_the_augmentation_blurs_and_jitters_as_torchvision_does():
    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    params = torch.tensor([[1.5, 1, 0, 1.05, 0.95, 1.1, 0.05], [0.5, 0, 1, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    rgb = (img * std + mean).clamp(0, 1)
    first = TF.gaussian_blur(rgb[0], [21, 21], [1.5, 1.5])
    first = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(first, 1.05), 0.95), 1.1), 0.05)
    out = augment(img, params) * std + mean
    assert torch.allclose(out[0], first, atol=1e-5)
    assert torch.allclose(out[1, 0], out[1, 1], atol=1e-5) and torch.allclose(out[1, 1], out[1, 2], atol=1e-5)  # grey
    weights = torch.tensor([0.2989, 0.587, 0.114]).view(3, 1, 1)  # ITU-R 601-2 luma, as torchvision's grey
    assert torch.allclose(out[1, :1], (TF.gaussian_blur(rgb[1], [21, 21], [0.5, 0.5]) * weights).sum(0, keepdim=True),
                          atol=1e-5)


@pytest.mark.parametrize("backend", ["pydensecrf", "torch"])
def test_crf_pseudo_labels_are_the_crf_of_the_teachers_map(tiny_stage, backend):
    cfg, net, teacher, img = tiny_stage
    st_cfg = SelfTrainingConfig(crf=backend, crf_workers=0, confidence=0.6)
    with SelfTraining(st_cfg, teacher, {}, is_direct=False) as st:
        with torch.no_grad():
            pseudo = st.pseudo_labels(net, net(img).frozen, img)
    _, sims = direct_probs(net, teacher, img, 1.0)
    for j in range(img.shape[0]):
        scores = 2.0 * sims[j]
        scores = scores - np.log(np.exp(scores - scores.max(0)).sum(0)) - scores.max(0)  # log-softmax
        probs = dense_crf(denormalize_to_uint8(img[j]), scores.astype(np.float32))
        np.testing.assert_allclose(pseudo.confidence[j].numpy(), probs.max(0), rtol=0, atol=1e-3)
        sure = decided(probs[None], 1e-3)[0] & (np.abs(probs.max(0) - 0.6) > 1e-3)
        expected = np.where(probs.max(0) >= 0.6, probs.argmax(0), IGNORE)
        np.testing.assert_array_equal(pseudo.labels[j].numpy()[sure], expected[sure])
    assert (pseudo.labels == IGNORE).any() and (pseudo.labels != IGNORE).any()  # the threshold cut somewhere


@pytest.mark.parametrize("backend", ["pydensecrf", "torch"])
def test_mask_pseudo_labels_are_the_crf_of_the_principal_masks_voted_by_the_teachers_map(tiny_stage, backend):
    cfg, net, teacher, img = tiny_stage
    with SelfTraining(SelfTrainingConfig(crf=backend, crf_workers=0, masks="primaps"), teacher, {},
                      is_direct=False) as st:
        with torch.no_grad():
            frozen = net(img).frozen
            pseudo = st.pseudo_labels(net, frozen, img)
            code = teacher_code(net, teacher, frozen, img)
    _, sims = direct_probs(net, teacher, img, 1.0)
    for j in range(img.shape[0]):
        scores = torch.log_softmax(principal_masks(code[j]), 0).numpy()
        probs = dense_crf(denormalize_to_uint8(img[j]), scores)
        sure = decided(probs[None], 1e-3)[0]
        expected = vote(torch.from_numpy(probs.argmax(0)), torch.from_numpy(sims[j].argmax(0)), sims.shape[1])
        np.testing.assert_array_equal(pseudo.labels[j].numpy()[sure], expected.numpy()[sure])
        np.testing.assert_allclose(pseudo.confidence[j].numpy(), probs.max(0), rtol=0, atol=1e-3)


def test_the_ema_teacher_moves_toward_the_student_and_decay_zero_copies_it(tiny_stage):
    _, net, teacher, _ = tiny_stage
    teacher = copy.deepcopy(teacher)
    cluster = copy.deepcopy(teacher.cluster)
    with torch.no_grad():
        for p in cluster.parameters():
            p.add_(1.0)
    before = [p.clone() for p in teacher.parameters()]
    student = [*net.decoder.parameters(), *cluster.parameters()]
    teacher.follow(net, cluster, 0.9)
    for got, old, new in zip(teacher.parameters(), before, student, strict=True):
        torch.testing.assert_close(got, 0.9 * old + 0.1 * new, rtol=1e-6, atol=1e-7)
    teacher.follow(net, cluster, 0.0)
    assert all(torch.equal(got, new) for got, new in zip(teacher.parameters(), student))


@pytest.mark.parametrize("mode, moves_after_a_step, copies_at_an_epoch", [
    ("ema", True, False), ("fixed", False, False), ("epoch", False, True)])
def test_each_teacher_mode_updates_the_teacher_when_it_says(tiny_stage, mode, moves_after_a_step, copies_at_an_epoch):
    _, net, teacher, _ = tiny_stage
    cluster = copy.deepcopy(teacher.cluster)
    with torch.no_grad():
        cluster.clusters.add_(1.0)
    student = [*net.decoder.parameters(), *cluster.parameters()]
    st = SelfTraining(SelfTrainingConfig(teacher=mode, ema_decay=0.5), copy.deepcopy(teacher), {}, is_direct=False)
    before = [p.clone() for p in st.teacher.parameters()]
    st.after_step(net, cluster)
    assert any(not torch.equal(a, b) for a, b in zip(st.teacher.parameters(), before)) == moves_after_a_step
    st.teacher.load_state_dict(teacher.state_dict())
    st.start_epoch(net, cluster)
    assert all(torch.equal(a, b) for a, b in zip(st.teacher.parameters(), student)) == copies_at_an_epoch
    assert all(torch.equal(a, b) for a, b in zip(st.teacher.parameters(), before)) == (not copies_at_an_epoch)


# ---- second-stage runs ----

def train(options: Path, *args: str) -> int:
    return run_main(run.main, ["--opt", str(options), "--debug", *args])


def second_stage(folder: Path, data: Path, first: Path, **self_training) -> Path:
    return tiny_options(folder, data, wandb={"name": "second", "mode": "disabled"},
                        self_training={"checkpoint": str(first), **self_training},
                        train={"print_freq": 1, "valid_freq": 2, "epoch": 2})


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def second(finished_run, tmp_path_factory):
    """A second stage of two epochs (8 iterations) from the finished tiny run's last.pth."""
    folder = tmp_path_factory.mktemp("second")
    assert train(second_stage(folder, finished_run.data, finished_run.folder / "last.pth")) == 0
    return folder / "output" / "second"


def test_a_second_stage_writes_ordinary_checkpoints_that_record_their_teacher(second, finished_run):
    first = finished_run.folder / "last.pth"
    for name in ("best.pth", "last.pth", "label_free.pth"):
        ckpt = load_checkpoint(second / name)
        assert ckpt[RECORD_KEY] == {"stage": 2, "teacher": {"checkpoint": str(first.resolve()),
                                                            "sha256": checkpoint_sha256(first), "iter": 4}}
        assert set(ckpt[TEACHER_KEY]) == {k for k in ckpt["net_model_state_dict"]
                                          if k.startswith("decoder.")} | {"cluster.clusters"}
    last = load_checkpoint(second / "last.pth")
    assert last["iter"] == 8 and last["epoch"] == 1  # its own iterations, from 0
    lines = [json.loads(line) for line in (second / "log.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if r["type"] == "train"]
    assert [r["iter"] for r in train_lines] == list(range(1, 9))
    assert all(r["pseudo_kept"] == 1.0 and r["ppap"] == 0.0 and r["num_pos"] is None for r in train_lines)
    assert all(r["loss"] == pytest.approx(r["linear"] + r["cluster"]) for r in train_lines)
    assert json.loads((second / "final_metrics.json").read_text()).keys() == {"best", "last", "label_free"}


def test_the_student_starts_as_the_first_stage_and_its_projection_head_stays(second, finished_run):
    first, last = load_checkpoint(finished_run.folder / "last.pth"), load_checkpoint(second / "last.pth")
    for key, value in first["net_model_state_dict"].items():
        same = torch.equal(value, last["net_model_state_dict"][key])
        assert same == (not key.startswith("decoder.")), key  # the ViT and the projection head are not trained
    assert not torch.equal(first["cluster_model_state_dict"]["clusters"], last["cluster_model_state_dict"]["clusters"])


def test_eval_and_predict_take_a_second_stage_checkpoint(second, finished_run, tmp_path):
    assert run_main(eval_script.main, ["--checkpoint", str(second / "last.pth"), "--out", str(tmp_path / "eval"),
                                       "--debug"]) == 0
    report = json.loads((tmp_path / "eval" / "eval_report.json").read_text())
    assert report["n_images"] == 4 and report["no_crf"]["Cluster_mIoU"] >= 0
    images = finished_run.data / "imgs" / "val"
    assert run_main(predict.main, ["--checkpoint", str(second / "last.pth"), str(images),
                                   "--out", str(tmp_path / "pred")]) == 0
    assert len(list((tmp_path / "pred").rglob("*.png"))) >= len(list(images.iterdir()))


def test_the_training_labels_never_reach_the_student_or_the_teacher(finished_run, tmp_path):
    """Two second stages that differ only in their training labels (the second's are random class ids) train the
    same network, cluster probe and teacher, bit for bit; the linear probe, which learns on the labels, differs."""
    data = tmp_path / "data"
    shutil.copytree(finished_run.data, data)
    options = second_stage(tmp_path, data, finished_run.folder / "last.pth")
    run_dir = tmp_path / "output" / "second"
    kept = {}
    for name in ("labels", "random labels"):
        assert train(options, "train.epoch=1") == 0
        kept[name] = load_checkpoint(run_dir / "last.pth")
        shutil.rmtree(run_dir)
        rng = np.random.default_rng(0)
        for path in (data / "labels" / "train").iterdir():
            label = np.array(Image.open(path))
            Image.fromarray(rng.integers(0, 3, label.shape).astype(np.uint8)).save(path)
    a, b = kept.values()
    for key in ("net_model_state_dict", "cluster_model_state_dict", TEACHER_KEY):
        assert states_equal(a[key], b[key]), key
    assert not states_equal(a["linear_model_state_dict"], b["linear_model_state_dict"])  # the labels were read


@pytest.mark.parametrize("variant", [{}, {"augment": True, "focal": 2.0}, {"masks": "primaps", "crf": "torch"}])
def test_a_second_stage_resumes_exactly(second, finished_run, tmp_path, monkeypatch, variant):
    """Stopped in iteration 6 and resumed, a second stage ends as the uninterrupted one (``second``, or for a variant
    its own), with the student's augmentation and the focal weights, and with PriMaPs' masks, too."""
    if variant:
        assert train(second_stage(tmp_path / "whole", finished_run.data, finished_run.folder / "last.pth",
                                  **variant)) == 0
        second = tmp_path / "whole" / "output" / "second"
    options = second_stage(tmp_path, finished_run.data, finished_run.folder / "last.pth", **variant)
    calls, loss = [], SelfTraining.loss

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # Ctrl-C in iteration 6: last.pth holds iteration 4
            raise KeyboardInterrupt
        return loss(self, *args, **kwargs)

    monkeypatch.setattr(SelfTraining, "loss", interrupted)
    assert train(options) == 130
    assert load_checkpoint(tmp_path / "output" / "second" / "last.pth")["iter"] == 4
    monkeypatch.undo()
    shutil.move(finished_run.folder / "last.pth", tmp_path / "moved.pth")  # the teacher's file is read no more
    try:
        assert train(options, "--resume") == 0
    finally:
        shutil.move(tmp_path / "moved.pth", finished_run.folder / "last.pth")
    a, b = load_checkpoint(second / "last.pth"), load_checkpoint(tmp_path / "output" / "second" / "last.pth")
    assert a["iter"] == b["iter"] == 8
    for key in (*RELEASED_KEYS, TEACHER_KEY):
        assert states_equal(a[key], b[key]), key


def test_two_processes_train_a_second_stage_as_one_does(second, finished_run, tmp_path):
    options = second_stage(tmp_path, finished_run.data, finished_run.folder / "last.pth")
    ended = run_program("run.py", ["--opt", str(options), "--debug"], tmp_path / "console", size=2, depth=SHALLOW_DEPTH)
    assert [e.status for e in ended] == [0, 0], ended[0].err + ended[1].err
    two = tmp_path / "output" / "second"
    lines = [[r for r in map(json.loads, (folder / "log.jsonl").read_text().splitlines()) if r["type"] == "train"]
             for folder in (second, two)]
    assert [r["iter"] for r in lines[1]] == [r["iter"] for r in lines[0]] == list(range(1, 9))
    for a, b in zip(*lines):  # the losses of the global batch, iteration by iteration
        for key in ("loss", "linear", "cluster", "grad_norm", "pseudo_kept"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["iter"], key)
    a, b = load_checkpoint(second / "last.pth"), load_checkpoint(two / "last.pth")
    for part in ("net_model_state_dict", "cluster_model_state_dict", TEACHER_KEY):
        assert weights_differ(a[part], b[part]) == [], part


@pytest.mark.parametrize("change, message", [
    ({"checkpoint": "/nonexistent/first.pth"}, "self_training.checkpoint: /nonexistent/first.pth not found"),
    ({"teacher": "student"}, "self_training.teacher must be one of 'ema', 'fixed', 'epoch'"),
    ({"focal": -1.0}, "self_training.focal must be >= 0 (got -1.0)"),
    ({"masks": "sam"}, "self_training.masks must be one of None, 'primaps'"),
])
def test_a_wrong_self_training_option_is_one_line_and_status_2(finished_run, tmp_path, capsys, change, message):
    options = second_stage(tmp_path, finished_run.data, finished_run.folder / "last.pth", **change)
    assert train(options) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "output" / "second").exists()


def test_a_teacher_of_other_classes_is_refused(finished_run, tmp_path, capsys):
    options = second_stage(tmp_path, finished_run.data, finished_run.folder / "last.pth")
    raw = json.loads(options.read_text())
    raw["dataset"].update(n_classes=4, class_names=["red", "green", "blue", "other"])
    options.write_text(json.dumps(raw))
    assert train(options) == 2
    assert "the checkpoint has 3 cluster centroids" in capsys.readouterr().err


def test_a_run_of_an_earlier_version_without_these_options_resumes(finished_run, tmp_path):
    options = finished_run.copy(tmp_path)
    last = tmp_path / "output" / "tiny" / "last.pth"
    ckpt = load_checkpoint(last)
    del ckpt["config"]["self_training"]  # written before the second stage (and label_free.pth) existed
    del ckpt["config"]["train"]["label_free_criterion"]
    torch.save(ckpt, last)
    assert train(options, "--resume", "train.epoch=2") == 0
    assert load_checkpoint(last)["iter"] == 8


@pytest.mark.parametrize("started, resumes", [("cluster_similarity", True), ("rankme", False)])
def test_a_run_started_under_a_former_default_resumes_with_it(finished_run, tmp_path, capsys, caplog, started,
                                                              resumes):
    # train.label_free_criterion's default was cluster_similarity; a run started with another value the user chose
    # (rankme) is still refused when the options now give the default
    options = finished_run.copy(tmp_path)
    last = tmp_path / "output" / "tiny" / "last.pth"
    ckpt = load_checkpoint(last)
    ckpt["config"]["train"]["label_free_criterion"] = started
    torch.save(ckpt, last)
    assert train(options, "--resume", "train.epoch=2") == (0 if resumes else 2)
    if resumes:
        assert load_checkpoint(last)["config"]["train"]["label_free_criterion"] == started
        assert "train.label_free_criterion stays 'cluster_similarity', as the run was started" in caplog.text
    else:
        err = capsys.readouterr().err
        assert "the options differ" in err and "train.label_free_criterion" in err
