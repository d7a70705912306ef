"""The label-free criteria (engine/criteria.py), each against a direct computation, and their choice of
label_free.pth."""
import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from config import load_config
from config.schema import LABEL_FREE_CRITERIA
from engine.criteria import ANCHOR_SEED, HIGHER_IS_BETTER, LabelFree, adjusted_rand_index, better, rankme
from engine.train import Progress, _choose_label_free
from loss import PPAPLoss
from model import build_model
from tests.conftest import tiny_options

pytestmark = pytest.mark.usefixtures("shallow_vit")


def pair_counting_ari(first: np.ndarray, second: np.ndarray) -> float:
    """The adjusted Rand index from the four pair counts over all pairs of items (Steinley, 2004)."""
    a = b = c = d = 0
    for i, j in itertools.combinations(range(len(first)), 2):
        same_first, same_second = first[i] == first[j], second[i] == second[j]
        a += same_first and same_second
        b += same_first and not same_second
        c += same_second and not same_first
        d += not same_first and not same_second
    return 2 * (a * d - b * c) / ((a + b) * (b + d) + (a + c) * (c + d))


def contingency(first: np.ndarray, second: np.ndarray, k: int) -> torch.Tensor:
    table = torch.zeros(k, k, dtype=torch.float64)
    for i, j in zip(first, second):
        table[i, j] += 1
    return table


def test_every_criterion_has_a_direction():
    assert tuple(HIGHER_IS_BETTER) == LABEL_FREE_CRITERIA


@pytest.mark.parametrize("seed", range(4))
def test_adjusted_rand_index_equals_the_pair_counting_formula(seed):
    rng = np.random.default_rng(seed)
    first = rng.integers(0, 4, 60)
    second = np.where(rng.random(60) < 0.6, first, rng.integers(0, 4, 60))  # partly agreeing
    assert adjusted_rand_index(contingency(first, second, 4)) == pytest.approx(pair_counting_ari(first, second),
                                                                                abs=1e-12)


def test_adjusted_rand_index_is_one_for_the_same_partition_under_other_names():
    first = np.random.default_rng(0).integers(0, 3, 50)
    assert adjusted_rand_index(contingency(first, (first + 1) % 3, 3)) == pytest.approx(1.0)
    assert adjusted_rand_index(contingency(np.zeros(10, int), np.zeros(10, int), 2)) == 1.0


def test_rankme_equals_the_entropy_of_the_normalised_singular_values():
    z = torch.randn(200, 16, dtype=torch.float64) * torch.logspace(0, -3, 16, dtype=torch.float64)
    sigma = torch.linalg.svdvals(z)
    p = sigma / sigma.sum() + 1e-7
    assert rankme(z.T @ z, 200) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-9)
    assert rankme(torch.eye(8, dtype=torch.float64), 8) == pytest.approx(8.0, rel=1e-5)  # all directions alike


def test_better_follows_each_criterion_direction_and_never_prefers_nan():
    assert better(2.0, 1.0, "rankme") and not better(1.0, 2.0, "rankme")
    assert better(1.0, 2.0, "ppap_loss") and not better(2.0, 1.0, "ppap_loss")
    assert better(1.0, 1.0, "stability")  # a tie keeps the later weights
    assert better(0.5, math.nan, "stability") and not better(math.nan, 0.5, "stability")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny_data):
    cfg = load_config(tiny_options(tmp_path_factory.mktemp("criteria"), tiny_data))
    torch.manual_seed(0)
    net, _, cluster = build_model(cfg.model, 3)
    return cfg, net.eval(), cluster.eval(), PPAPLoss(cfg.training_coeff)


def batches(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 64, 64, generator=generator) for n in (3, 2)]


def collect(tiny_model, images, previous=None) -> LabelFree:
    cfg, net, cluster, loss_fn = tiny_model
    label_free = LabelFree(cluster, loss_fn, False, previous, net.model.embed_dim, torch.device("cpu"))
    with torch.inference_mode():
        for img in images:
            out = net(img)
            label_free.process(out, out.code)
    return label_free


def test_the_criteria_equal_their_direct_computation(tiny_model):
    cfg, net, cluster, loss_fn = tiny_model
    images = batches()
    got = collect(tiny_model, images).result()
    with torch.inference_mode():
        outs = [net(img[None]) for img in torch.cat(images)]  # image by image
        codes = torch.cat([o.code for o in outs]).double()  # all images' codes
        rows = codes.permute(0, 2, 3, 1).reshape(-1, codes.shape[1])
        cosine = F.normalize(rows, dim=1) @ F.normalize(cluster.clusters.double(), dim=1).T
        losses = [float(loss_fn(o.z, o.feats, generator=torch.Generator().manual_seed(ANCHOR_SEED)).loss)
                  for o in outs]
    sigma = torch.linalg.svdvals(rows)
    p = sigma / sigma.sum() + 1e-7
    assert got["cluster_similarity"] == pytest.approx(float(cosine.max(dim=1).values.mean()), abs=1e-5)
    assert len(sigma) == 80 < codes.shape[1]  # fewer patches than channels: min(N, D) singular values
    assert got["rankme"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-4)
    assert got["ppap_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)
    assert math.isnan(got["stability"])  # nothing to compare at the first validation


def test_stability_compares_the_cluster_assignments_of_two_validations(tiny_model):
    cfg, net, cluster, loss_fn = tiny_model
    images = batches()
    first = collect(tiny_model, images)
    assert collect(tiny_model, images, previous=first.assignments).result()["stability"] == pytest.approx(1.0)
    moved = torch.nn.Module()
    moved.clusters = torch.nn.Parameter(cluster.clusters + 0.5 * torch.randn_like(cluster.clusters))
    moved.forward = lambda x, is_direct=False: type(cluster).forward(moved, x, is_direct)
    label_free = LabelFree(moved, loss_fn, False, first.assignments, net.model.embed_dim, torch.device("cpu"))
    with torch.inference_mode():
        for img in images:
            out = net(img)
            label_free.process(out, out.code)
    before, after = first.assignments.numpy(), label_free.assignments.numpy()
    assert not np.array_equal(before, after)  # the centroids moved some patches
    assert label_free.result()["stability"] == pytest.approx(pair_counting_ari(before, after), abs=1e-12)


def test_a_validation_over_other_images_has_no_stability(tiny_model):
    first = collect(tiny_model, batches())
    assert math.isnan(collect(tiny_model, batches()[:1], previous=first.assignments).result()["stability"])


def test_label_free_pth_is_chosen_by_the_criterion_from_the_first_validation_on():
    progress = Progress()
    chosen = []
    for iteration, value in enumerate([math.nan, 0.3, 0.2, 0.3, 0.1], start=1):
        progress.iteration = iteration
        chosen.append(_choose_label_free(progress, {"stability": value}, "stability"))
    assert chosen == [True, True, False, True, False]
    assert (progress.label_free, progress.label_free_iter) == (0.3, 4)
    progress = Progress()
    for iteration, value in enumerate([5.0, 4.0, 6.0], start=1):
        progress.iteration = iteration
        _choose_label_free(progress, {"ppap_loss": value}, "ppap_loss")
    assert (progress.label_free, progress.label_free_iter) == (4.0, 2)  # lower is better


def test_the_validation_labels_never_influence_label_free_pth(tiny_data, tmp_path):
    """Two runs that differ only in their validation labels (the second's are random class ids) write the same
    label_free.pth, byte for byte; the labelled metrics, and so best.pth, are free to differ."""
    import shutil

    from PIL import Image

    import run
    from utils.cli import run_main

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    options = tiny_options(tmp_path, data)
    run_dir = tmp_path / "output" / "tiny"
    written = {}
    for name in ("labels", "random labels"):
        assert run_main(run.main, ["--opt", str(options), "--debug"]) == 0
        written[name] = {file: (run_dir / file).read_bytes() for file in ("label_free.pth", "log.jsonl")}
        shutil.rmtree(run_dir)
        rng = np.random.default_rng(0)
        for path in (data / "labels" / "val").iterdir():  # random class ids
            label = np.array(Image.open(path))
            Image.fromarray(rng.integers(0, 3, label.shape).astype(np.uint8)).save(path)
    assert written["labels"]["label_free.pth"] == written["random labels"]["label_free.pth"]
    logs = [[json.loads(line) for line in w["log.jsonl"].decode().splitlines()] for w in written.values()]
    assert [r["Cluster_mIoU"] for r in logs[0] if r["type"] == "val"] != [r["Cluster_mIoU"] for r in logs[1]
                                                                          if r["type"] == "val"]  # labels were read


def test_label_free_pth_records_its_choice_as_the_log_shows_it(finished_run):
    from engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(finished_run.folder / "label_free.pth")
    choice = ckpt["label_free"]
    validations = [json.loads(line) for line in (finished_run.folder / "log.jsonl").read_text().splitlines()
                   if json.loads(line)["type"] == "val"]
    chosen = [r for r in validations if r["label_free"]][-1]
    from config.schema import TrainConfig
    from engine.criteria import HIGHER_IS_BETTER

    criterion = load_config(finished_run.folder / "config.json").train.label_free_criterion
    assert choice["criterion"] == criterion == TrainConfig().label_free_criterion  # the default chose
    assert (choice["iter"], choice["value"]) == (chosen["iter"], pytest.approx(chosen[criterion]))
    assert (ckpt["best_iter"], ckpt["best"]) == (choice["iter"], choice["value"])  # the released keys say it too
    defined = [r[criterion] for r in validations if r[criterion] is not None]  # stability: none at the first
    assert defined and choice["value"] == (max if HIGHER_IS_BETTER[criterion] else min)(defined)
    assert ckpt["iter"] == choice["iter"]


def test_a_run_without_labels_chooses_label_free_pth_and_draws_its_predictions(tiny_data, tmp_path, capsys):
    import run
    from utils.cli import run_main

    data = tmp_path / "data"
    for split in ("train", "val"):  # the images only: no labels/ folder
        (data / "imgs").mkdir(parents=True, exist_ok=True)
        (data / "imgs" / split).symlink_to(tiny_data / "imgs" / split, target_is_directory=True)
    options = tiny_options(tmp_path, data)
    assert run_main(run.main, ["--opt", str(options), "--debug"]) == 0
    run_dir = tmp_path / "output" / "tiny"
    assert (run_dir / "last.pth").is_file() and (run_dir / "label_free.pth").is_file()
    assert not (run_dir / "best.pth").exists() and not (run_dir / "final_metrics.json").exists()
    picture = run_dir / "label_free_visualization.png"
    assert picture.stat().st_size > 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "no labels to score" in line] == [
        f"the validation set has no labels to score: no final metrics; wrote {picture} (the cluster predictions of "
        f"label_free.pth on 2 validation images)"]
    validations = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()
                   if json.loads(line)["type"] == "val"]
    assert len(validations) == 2 and all("Cluster_mIoU" not in r and r["best"] is False for r in validations)
    assert all(isinstance(r["cluster_similarity"], float) and isinstance(r["rankme"], float) for r in validations)
    assert validations[0]["label_free"] is True
