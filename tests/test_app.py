"""The Hydra app ``run.py`` + ``conf/``: the CLI runs end to end (single process, cached original,
DDP on CPU, multirun), every config option composes, and every bad input is refused before any
training with a short message.

Each CLI call pays seconds of imports, so the calls that depend on no other start together in a
pool (fixture ``started``) and run while the other tests go on; the default run is shared by the
tests that build on it.
"""

import inspect
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn

from lightning_forget.data import TORCHVISION_DATASETS
from lightning_forget.methods import METHODS
from lightning_forget.models import ARCHITECTURES, build_model

REPO = Path(__file__).parent.parent
CONF = REPO / "conf"
GROUPS = ("dataset", "model", "trainer", "method", "logger", "experiment")
DDP_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GLOBAL_RANK")
FIGURES = {"forget_acc", "retain_acc", "forget_train_acc", "mia", "seconds", "changed_fraction", "per_class_acc"}
WORKERS = min(8, max(2, os.cpu_count() or 2))
RESNET18 = ["model=resnet18", "forget.classes=[0,1]", "baselines=[]", "train.epochs=2", "forget.recipe.epochs=2"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_app(*overrides: str) -> DictConfig:
    with initialize(version_base="1.3", config_path="../conf"):
        return compose(config_name="config", overrides=list(overrides))


def clean_env() -> dict[str, str]:
    """The user's environment without inherited DDP ranks or HYDRA_FULL_ERROR, one OpenMP thread per process.

    The runs overlap, and processes that each spin several OpenMP threads on few cores slow down many times over.
    """
    env = {k: v for k, v in os.environ.items() if k not in {*DDP_VARIABLES, "HYDRA_FULL_ERROR"}}
    return env | {"OMP_NUM_THREADS": "1"}


def run_app(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "run.py", *args, "trainer.enable_progress_bar=false"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
    )


@dataclass
class Run:
    result: subprocess.CompletedProcess
    run_dir: Path
    cache: Path


def cli_run(run_dir: Path, cache: Path, *overrides: str, timeout: float = 600) -> Run:
    """``python run.py`` into ``run_dir`` (also the sweep folder of ``-m``), the original cached in ``cache``."""
    flags = [o for o in overrides if o.startswith("-")]  # -m before the overrides
    rest = [o for o in overrides if o not in flags]
    paths = [f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={run_dir}", f"original.cache_dir={cache}"]
    return Run(run_app(*flags, *paths, *rest, timeout=timeout), run_dir, cache)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-3000:]}"


def load_report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


# id: (overrides, with {tmp} the fixture's folder; a distinctive part of the message on stderr)
BAD_INPUTS: dict[str, tuple[list[str], str]] = {
    "class-out-of-range": (["forget.classes=[10]"], "forget_classes [10] are not class indices"),
    "duplicate-classes": (["forget.classes=[1,1]"], "more than once"),
    "all-classes": (["forget.classes=[0,1,2,3,4,5,6,7,8,9]"], "names all 10 classes"),
    "no-classes": (["forget.classes=[]"], "forget_classes is empty"),
    "shots-above-class-size": (["forget.shots=1000"], "fewer than shots=1000"),
    "unknown-method": (["method=nope"], "Could not find 'method/nope'"),
    "unknown-dataset": (["dataset=nope"], "Could not find 'dataset/nope'"),
    "mismatched-checkpoint": (["original.ckpt={tmp}/five_classes.pt"], "does not fit model=cnn with 10 classes"),
    "missing-checkpoint": (["original.ckpt={tmp}/missing.pt"], "does not exist"),
    "dataset-files-missing-offline": (["dataset=cifar10", "dataset.root={tmp}/empty"], "cifar10 was not found"),
    "imagefolder-without-train": (["dataset=imagefolder", "dataset.root={tmp}/no_train"], "has no train/ folder"),
    "multirun-with-ddp": (["-m", "forget.classes=[0],[1]", "baselines=[]", "trainer=ddp_cpu"], "multirun (-m)"),
    "fraction-out-of-range": (["forget.fraction=0"], "fraction must be in (0, 1]"),
    "unknown-forget-optimizer": (["forget.recipe.optimizer=nope"], "Unknown optimizer 'nope'"),
    "unknown-forget-loss": (["forget.objective.forget_loss=nope"], "Unknown forget_loss 'nope'"),
    "imagefolder-without-root": (["dataset=imagefolder"], "Missing mandatory value: dataset.root"),
    "classes-not-a-list": (["forget.classes=3"], "forget.classes must be a list"),
    "seed-not-an-integer": (["seed=abc"], "seed must be an integer"),
    "gpu-trainer-without-gpu": (["trainer=gpu"], "cannot run on this machine"),
}


@pytest.fixture(scope="module")
def started(tmp_path_factory) -> Iterator[dict[str, "Future[Run]"]]:
    """The CLI runs that depend on no other, started at once: ``default`` (``python run.py``, which trains
    the original), ``resnet18`` (RESNET18) and every case of BAD_INPUTS, each with its own empty cache."""
    tmp = tmp_path_factory.mktemp("app")
    (tmp / "empty").mkdir()
    (tmp / "no_train" / "test" / "a").mkdir(parents=True)
    torch.save({"state_dict": build_model("cnn", 5, 1).state_dict()}, tmp / "five_classes.pt")
    jobs = {"default": [], "resnet18": RESNET18}
    jobs |= {case: [o.format(tmp=tmp) for o in overrides] for case, (overrides, _) in BAD_INPUTS.items()}
    pool = ThreadPoolExecutor(WORKERS)
    futures = {}
    for name, overrides in jobs.items():
        (tmp / name / "cache").mkdir(parents=True)
        futures[name] = pool.submit(cli_run, tmp / name / "run", tmp / name / "cache", *overrides)
    yield futures
    pool.shutdown(cancel_futures=True)  # drop the runs not begun: no selected test waits for them


@pytest.fixture(scope="module")
def default_run(started) -> Run:
    """``python run.py`` with the defaults: digits, cnn, relevance, retrain baseline, forget class 0."""
    return started["default"].result()


# --------------------------------------------------------------------------- end to end


def test_default_run_writes_the_full_report_and_forgets_like_retraining(default_run):
    assert_ok(default_run.result)
    run_dir = default_run.run_dir
    report = load_report(run_dir)
    assert set(report) == {"method", "forget_classes", "models", "speedup_vs_retrain", "config"}
    assert report["method"] == "relevance" and report["forget_classes"] == [0]
    assert set(report["models"]) == {"original", "relevance", "retrain"}
    for name, figures in report["models"].items():
        assert set(figures) == FIGURES, name
        assert len(figures["per_class_acc"]) == 10, name
        for value in [*figures["per_class_acc"], *(figures[k] for k in FIGURES - {"seconds", "per_class_acc"})]:
            assert 0.0 <= value <= 1.0, (name, figures)
        assert figures["seconds"] >= 0.0, name
    assert report["speedup_vs_retrain"] > 0
    relevance, retrain = report["models"]["relevance"], report["models"]["retrain"]
    assert relevance["forget_acc"] <= 0.05
    assert abs(relevance["retain_acc"] - retrain["retain_acc"]) <= 0.03
    # the selection rounds fraction x entries to a whole number of entries
    assert relevance["changed_fraction"] <= report["config"]["forget"]["fraction"] + 1e-4

    assert (run_dir / "report.md").read_text().startswith("| model |")
    assert (run_dir / "per_class_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run_dir / "logs").rglob("metrics.csv"))

    saved = torch.load(run_dir / "forgotten_model.pt", weights_only=True)
    assert {"state_dict", "masks", "config"} <= set(saved)
    build_model("cnn", 10, 1).load_state_dict(saved["state_dict"])
    assert saved["masks"] and saved["config"]["method"]["name"] == "relevance"
    [cached] = default_run.cache.iterdir()
    original = torch.load(cached, weights_only=True)["state_dict"]
    for name, mask in saved["masks"].items():
        key = name.removeprefix("model.")
        assert torch.equal(saved["state_dict"][key][~mask], original[key][~mask]), f"{key} changed outside its mask"


def test_second_run_reuses_the_cached_original(default_run, tmp_path):
    assert_ok(default_run.result)
    cached_before = {p.name: p.stat().st_mtime_ns for p in default_run.cache.iterdir()}
    second = cli_run(tmp_path / "run", default_run.cache, "baselines=[]")
    assert_ok(second.result)
    assert "Original model from the cache" in (second.run_dir / "run.log").read_text()
    assert {p.name: p.stat().st_mtime_ns for p in default_run.cache.iterdir()} == cached_before
    seconds = [load_report(r.run_dir)["models"]["original"]["seconds"] for r in (default_run, second)]
    assert seconds[0] == seconds[1] > 0


def test_resnet18_forgets_two_classes_without_baselines(started):
    run = started["resnet18"].result()
    assert_ok(run.result)
    report = load_report(run.run_dir)
    assert report["forget_classes"] == [0, 1]
    assert set(report["models"]) == {"original", "relevance"} and "speedup_vs_retrain" not in report


@pytest.mark.ddp
def test_ddp_cpu_run_forgets_like_the_single_process_run(default_run, tmp_path):
    assert_ok(default_run.result)
    ddp_run = cli_run(tmp_path / "run", default_run.cache, "trainer=ddp_cpu")
    assert_ok(ddp_run.result)
    single = load_report(default_run.run_dir)["models"]["relevance"]
    ddp = load_report(ddp_run.run_dir)["models"]["relevance"]
    assert ddp["forget_acc"] <= 0.05
    assert abs(ddp["retain_acc"] - single["retain_acc"]) <= 0.03
    assert (ddp_run.run_dir / "forgotten_model.pt").is_file()


def test_multirun_sweeps_forget_classes_with_one_report_each(default_run, tmp_path):
    assert_ok(default_run.result)
    sweep = cli_run(tmp_path / "sweep", default_run.cache, "-m", "forget.classes=[0],[1]", "baselines=[]")
    assert_ok(sweep.result)
    reports = [json.loads(p.read_text()) for p in sorted(sweep.run_dir.rglob("report.json"))]
    assert sorted(r["forget_classes"] for r in reports) == [[0], [1]]


def test_run_into_a_finished_run_dir_is_refused_and_keeps_its_report(default_run, tmp_path):
    assert_ok(default_run.result)
    kept = {name: (default_run.run_dir / name).read_bytes() for name in ("report.json", "forgotten_model.pt")}
    (tmp_path / "cache").mkdir()
    again = cli_run(default_run.run_dir, tmp_path / "cache")
    assert again.result.returncode != 0
    assert "already holds a finished run" in again.result.stderr
    assert {name: (default_run.run_dir / name).read_bytes() for name in kept} == kept
    assert not list(again.cache.iterdir())


# --------------------------------------------------------------------------- composition


@pytest.mark.parametrize(("group", "option"), [pytest.param(g, o, id=f"{g}/{o}") for g in GROUPS for o in options(g)])
def test_every_config_option_composes_and_names_real_parameters(group, option):
    cfg = compose_app(f"{group}={option}")
    container = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert {"dataset", "model", "trainer", "method", "logger", "forget", "train", "original", "eval"} <= set(container)
    if group == "experiment":
        assert cfg != compose_app(), f"experiment={option} changes nothing"
        return
    node = cfg[group]
    if group == "method":
        assert node.name == option and option in METHODS
        return
    accepted = inspect.signature(get_object(node._target_)).parameters
    unknown = [k for k in node if not k.startswith("_") and k not in accepted]
    assert not unknown, f"{group}={option}: {unknown} are not parameters of {node._target_}"
    if group == "model":
        assert node.arch == option and option in ARCHITECTURES


@pytest.mark.parametrize("option", options("model"))
def test_every_model_option_maps_small_grey_images_to_class_logits(option):
    cfg = compose_app(f"model={option}")
    net = instantiate(cfg.model)(num_classes=10, in_channels=1)
    assert isinstance(net, nn.Module)
    with torch.no_grad():
        assert net.eval()(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def tiny_image_folder(root: Path) -> Path:
    for split in ("train", "test"):
        for i, name in enumerate(("a", "b")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for j in range(2):
                Image.new("RGB", (6, 6), (120 * i, 40 * j, 200)).save(folder / f"x{j}.png")
    return root


@pytest.mark.parametrize("option", options("dataset"))
def test_every_dataset_option_loads_where_its_files_are_at_hand(option, tmp_path):
    cfg = compose_app(f"dataset={option}")
    target = cfg.dataset._target_
    if target.endswith(".digits"):
        data = instantiate(cfg.dataset)
        assert (data.num_classes, data.in_channels, len(data.class_names)) == (10, 1, 10)
    elif target.endswith(".image_folder"):
        root = tiny_image_folder(tmp_path / "images")
        cfg = compose_app(f"dataset={option}", f"dataset.root={root}")
        data = instantiate(cfg.dataset)
        assert data.num_classes == 2 and data.class_names == ["a", "b"]
        image, _ = data.train[0]
        assert image.shape == (cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size)
    elif target.endswith(".torchvision_dataset"):  # needs the downloaded files: structure only
        assert cfg.dataset.name in TORCHVISION_DATASETS and cfg.dataset.download is False
    else:
        pytest.fail(f"dataset={option}: no check for target {target}")


# --------------------------------------------------------------------------- refused inputs


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_with_a_clear_message_before_any_training(case, started):
    attempt = started[case].result()
    overrides, message = BAD_INPUTS[case]
    stderr = attempt.result.stderr
    assert attempt.result.returncode != 0, f"{overrides} was accepted"
    assert message in stderr, stderr[-3000:]
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) <= 25, stderr[-3000:]
    assert not list(attempt.run_dir.rglob("report.json"))
    assert not list(attempt.cache.iterdir()), "an original model was trained before the input was refused"
    assert not list(attempt.run_dir.rglob("metrics.csv")), "a model was fitted before the input was refused"
