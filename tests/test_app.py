"""The Hydra app ``run.py`` + ``conf/``: the CLI end to end (the default run, a cached original, DDP on CPU, a
multirun with its summary, a user's own network and checkpoint), runs that cannot clobber each other, a console
that reads cleanly, every config option composing, and every bad input refused before any training in one line.

Each CLI call pays seconds of imports, so the calls start together in a pool (fixture ``cli``) and run while the
other tests go on: those that build on the default run's cache start when it is done.
"""

import fcntl
import json
import os
import pty
import re
import shlex
import struct
import subprocess
import sys
import termios
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
from app_models import TinyNet, Wrapped
from conftest import quiet_trainer, tiny_loader, tiny_net
from hydra import compose, initialize
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from lightning_forget import ProbeSettings, RelearnSettings, evaluate_forgetting
from lightning_forget.app.console import progress_wanted
from lightning_forget.app.data import TORCHVISION_DATASETS, digits
from lightning_forget.app.models import ARCHITECTURES, build_model
from lightning_forget.methods import ForgettingMethod

REPO = Path(__file__).parent.parent
sys.path.insert(0, str(REPO))
import run as app  # noqa: E402  # the app module, for its checks in process

CONF = REPO / "conf"
TESTS = Path(__file__).parent
GROUPS = ("dataset", "model", "trainer", "method", "logger", "experiment")
DDP_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GLOBAL_RANK")
FIGURES = {"forget_acc", "retain_acc", "forget_train_acc", "mia", "per_class_acc", "seconds"}
REPORT_FILES = ("report.json", "report.md", "per_class_accuracy.png", "forgotten_model.pt")
# Runs that need neither baselines nor the integrity evidence: seconds instead of tens of seconds.
LIGHT = ["baselines=[]", "eval.probe=null", "eval.relearn=null"]
WORKERS = min(6, max(3, os.cpu_count() or 2))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@contextmanager
def composed(*overrides: str) -> Iterator[tuple[DictConfig, str]]:
    """The app's config with ``overrides`` and the name of its method, inside Hydra's context (for baselines)."""
    with initialize(version_base="1.3", config_path="../conf"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
        method = cfg.hydra.runtime.choices.method
        with open_dict(cfg):
            del cfg["hydra"]
        yield cfg, method


def check_in_process(tmp: Path, *overrides: str) -> dict:
    """What ``python run.py`` checks before any training, in this process; returns what it prepared."""
    with composed(*overrides) as (cfg, method):
        settings = app.check_config(cfg, method)
        return app.prepare(cfg, settings, method, tmp / "run", progress=False)


# --------------------------------------------------------------------------- the CLI runs


def clean_env() -> dict[str, str]:
    """No inherited DDP ranks or HYDRA_FULL_ERROR, one OpenMP thread per process (the runs overlap on few
    cores), and the tests' folder importable for the user networks of app_models."""
    env = {k: v for k, v in os.environ.items() if k not in {*DDP_VARIABLES, "HYDRA_FULL_ERROR"}}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])}


@dataclass
class Run:
    result: subprocess.CompletedProcess
    run_dir: Path
    cache: Path

    def log(self) -> str:
        return (self.run_dir / "run.log").read_text()

    def report(self) -> dict:
        return json.loads((self.run_dir / "report.json").read_text())


def cli_run(run_dir: Path, cache: Path, *overrides: str) -> Run:
    """``python run.py`` into ``run_dir`` (also the sweep folder of ``-m``), its models cached in ``cache``."""
    flags = [o for o in overrides if o.startswith("-")]
    rest = [o for o in overrides if o not in flags]
    paths = [f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={run_dir}", f"original.cache_dir={cache}"]
    result = subprocess.run(
        [sys.executable, "run.py", *flags, *paths, *rest],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(),
    )
    return Run(result, run_dir, cache)


def tty_run(run_dir: Path, cache: Path, *overrides: str) -> Run:
    """``python run.py`` on a terminal (a pseudo-terminal of 120 columns): what a user at a console sees."""
    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    paths = [f"hydra.run.dir={run_dir}", f"original.cache_dir={cache}"]
    command = [sys.executable, "run.py", *paths, *overrides]
    process = subprocess.Popen(command, cwd=REPO, stdin=terminal, stdout=terminal, stderr=terminal, env=clean_env())
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    output = b"".join(chunks).decode(errors="replace")
    return Run(subprocess.CompletedProcess(command, process.wait(timeout=600), output, ""), run_dir, cache)


def assert_ok(run: Run) -> None:
    assert run.result.returncode == 0, f"exit {run.result.returncode}\n{run.result.stderr[-3000:]}"


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


@dataclass
class Bad:
    """A bad input: its overrides ({tmp}: the fixtures' folder), a distinctive part of the message, whether it
    also runs through the CLI, and whether Hydra itself refuses it while composing (exit 1, Hydra's message)."""

    overrides: list[str]
    message: str
    cli: bool = False
    compose_error: bool = False


NO_GPU = not torch.cuda.is_available()
BAD_INPUTS: dict[str, Bad] = {
    # issue 13's table
    "fraction-boolean": Bad(["method.fraction=true"], "method.fraction=true is not allowed: expected a number", True),
    "per-tensor-no": Bad(["method.per_tensor=no"], "method.per_tensor='no' is not allowed: expected true or false"),
    "freeze-bn-off": Bad(["method.freeze_bn_stats=off"], "method.freeze_bn_stats='off' is not allowed"),
    "baselines-string": Bad(["baselines=retrain"], "baselines=retrain is a string: write a list, baselines=[retrain]"),
    "project-resnet": Bad(
        ["model=resnet18", "method.project=orthogonal"], "method relevance: project folds into", True
    ),
    "fraction-string": Bad(["method.fraction=abc"], "method.fraction='abc' is not allowed: expected a number"),
    "shots-string": Bad(["forget.shots=abc"], "forget.shots='abc' is not allowed: expected an integer >= 1"),
    "eval-batch-size-zero": Bad(["eval.batch_size=0"], "eval.batch_size=0 is not allowed: expected an integer >= 1"),
    "eval-max-members-zero": Bad(["eval.max_members=0"], "eval.max_members=0 is not allowed"),
    "accumulate-zero": Bad(["+trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0 is not allowed"),
    "unwritable-cache": Bad(["original.cache_dir={tmp}/a_file/models"], "is not writable"),
    "corrupt-jpeg": Bad(
        [
            "dataset=imagefolder",
            "dataset.root={tmp}/corrupt",
            "dataset.image_size=8",
            "dataset.in_memory=false",
            "dataset.cache_dir=null",
        ],
        "Cannot decode the image {tmp}/corrupt/train/b/x1.jpg",
    ),
    "corrupt-jpeg-in-memory": Bad(
        ["dataset=imagefolder", "dataset.root={tmp}/corrupt", "dataset.in_memory=true", "dataset.cache_dir=null"],
        "Cannot decode the image {tmp}/corrupt/train/b/x1.jpg",
    ),
    "in-memory-yes": Bad(
        ["dataset=imagefolder", "dataset.root={tmp}/corrupt", "dataset.in_memory=yes"],
        "dataset.in_memory='yes' is not allowed: expected true or false or one of 'auto'",
    ),
    "nan-checkpoint": Bad(["original.ckpt={tmp}/nan.pt"], "NaN or infinite values in 1 tensors (15.bias)", True),
    # classes, shots, methods, data, models, checkpoints
    "class-out-of-range": Bad(["forget.classes=[10]"], "forget_classes [10] are not class indices"),
    "duplicate-classes": Bad(["forget.classes=[1,1]"], "more than once"),
    "all-classes": Bad(["forget.classes=[0,1,2,3,4,5,6,7,8,9]"], "names all 10 classes"),
    "no-classes": Bad(["forget.classes=[]"], "forget_classes is empty"),
    "unknown-class-name": Bad(["forget.classes=[cat]"], "No class named 'cat'"),
    "classes-not-a-list": Bad(["forget.classes=3"], "forget.classes=3 is not allowed: expected a list"),
    "shots-above-class-size": Bad(["forget.shots=1000"], "fewer than shots=1000"),
    "seed-not-an-integer": Bad(["seed=abc"], "seed='abc' is not allowed: expected an integer"),
    "unknown-top-level-key": Bad(["+fraction=0.1"], "fraction is not a setting of"),
    "unknown-method-setting": Bad(["+method.fractoin=0.1"], "method.fractoin is not a setting of"),
    "fraction-out-of-range": Bad(["method.fraction=0"], "method: fraction must be a number in (0, 1], got 0."),
    "unknown-forget-optimizer": Bad(["method.recipe.optimizer=nope"], "method.recipe: Unknown optimizer 'nope'"),
    "unknown-forget-loss": Bad(["method.objective.forget_loss=nope"], "method.objective.forget_loss='nope'"),
    "recipe-epochs-zero": Bad(["method.recipe.epochs=0"], "method.recipe: epochs must be an integer >= 1, got 0."),
    "train-lr-string": Bad(["train.lr=fast"], "train.lr='fast' is not allowed: expected a number"),
    "unknown-baseline": Bad(["baselines=[nope]"], "names unknown methods ['nope']"),
    "unknown-method": Bad(["method=nope"], "Could not find 'method/nope'", True, compose_error=True),
    "unknown-dataset": Bad(["dataset=nope"], "Could not find 'dataset/nope'", compose_error=True),
    "eval-device": Bad(["eval.device=tpu"], "eval.device='tpu' is not allowed: expected one of 'auto', 'cpu', 'cuda'"),
    "probe-setting-type": Bad(["eval.probe.per_class=x"], "eval.probe.per_class='x' is not allowed"),
    "relearn-setting-range": Bad(["eval.relearn.epochs=0"], "eval.relearn: epochs must be a positive integer"),
    "limit-train-batches-zero": Bad(["+trainer.limit_train_batches=0"], "trainer.limit_train_batches=0 is not allowed"),
    "max-steps-zero": Bad(["+trainer.max_steps=0"], "trainer.max_steps=0 is not allowed"),
    "trainer-max-epochs": Bad(["+trainer.max_epochs=3"], "trainer.max_epochs is set by the app for every fit"),
    "trainer-unknown-key": Bad(["+trainer.nope=1"], "trainer.nope is not a setting of lightning.pytorch"),
    "trainer-precision": Bad(["trainer.precision=12"], "trainer.precision=12 is not allowed"),
    "dataset-files-missing-offline": Bad(["dataset=cifar10", "dataset.root={tmp}/empty"], "cifar10 was not found"),
    "imagefolder-without-train": Bad(["dataset=imagefolder", "dataset.root={tmp}/no_train"], "has no train/ folder"),
    "imagefolder-without-root": Bad(["dataset=imagefolder"], "Missing mandatory value: dataset.root"),
    "model-not-importable": Bad(["model._target_=nowhere.Net"], "model._target_=nowhere.Net cannot be imported"),
    "model-keeps-arch": Bad(["model._target_=app_models.TinyNet"], "model.arch is not a setting of app_models.TinyNet"),
    "model-wrong-outputs": Bad(["model=custom", "model._target_=app_models.FiveLogits"], "returns (1, 5)"),
    "model-not-a-module": Bad(["model=custom", "model._target_=lightning_forget.methods.Recipe"], "not a torch.nn"),
    "missing-checkpoint": Bad(["original.ckpt={tmp}/missing.pt"], "does not exist"),
    "mismatched-checkpoint": Bad(["original.ckpt={tmp}/five_classes.pt"], "other shapes (15.weight: (5, 64) there"),
    "pickled-checkpoint": Bad(["original.ckpt={tmp}/module.pt"], "cannot be read with torch.load(weights_only=True)"),
    "multirun-with-ddp": Bad(["-m", "forget.classes=[0],[1]", *LIGHT, "trainer=ddp_cpu"], "multirun (-m)", True),
    "eval-cuda-without-gpu": Bad(["eval.device=cuda"], "no GPU is usable here"),
    "gpu-trainer-without-gpu": Bad(["trainer=gpu"], "trainer (accelerator=gpu, devices=1, strategy=auto) cannot run"),
}
NEEDS_NO_GPU = {"eval-cuda-without-gpu", "gpu-trainer-without-gpu"}


def fixture_files(tmp: Path) -> None:
    """The files the bad inputs and the user-model run point at."""
    (tmp / "empty").mkdir()
    (tmp / "no_train" / "test" / "a").mkdir(parents=True)
    (tmp / "a_file").write_text("not a folder")
    torch.save(build_model("cnn", 5, 1).state_dict(), tmp / "five_classes.pt")
    broken = build_model("cnn", 10, 1).state_dict()
    broken["15.bias"][0] = float("nan")
    torch.save({"state_dict": broken}, tmp / "nan.pt")
    torch.save(build_model("cnn", 10, 1), tmp / "module.pt")
    tiny_image_folder(tmp / "corrupt", size=12, kind="jpg")
    jpeg = tmp / "corrupt" / "train" / "b" / "x1.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:150])  # truncated, as by an interrupted copy


def user_checkpoint(path: Path) -> None:
    """A Lightning .ckpt of a user's LightningModule (network under ``self.backbone``) trained on digits."""
    L.seed_everything(0, verbose=False)
    data = digits()
    trainer = quiet_trainer(max_epochs=8)
    trainer.fit(Wrapped(), DataLoader(data.train, batch_size=64, shuffle=True))
    trainer.save_checkpoint(path)


def after(first: Future, pool: ThreadPoolExecutor, job: Callable[[], Run]) -> Future:
    """A future of ``job``, submitted to ``pool`` once ``first`` is done."""
    out: Future = Future()

    def start(_: Future) -> None:
        pool.submit(job).add_done_callback(
            lambda f: out.set_exception(f.exception()) if f.exception() else out.set_result(f.result())
        )

    first.add_done_callback(start)
    return out


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> Iterator[dict[str, Future]]:
    """Every CLI run, started at once (those that build on ``default``'s cache when it is done)."""
    tmp = tmp_path_factory.mktemp("app")
    fixture_files(tmp)
    user_checkpoint(tmp / "user.ckpt")
    pool = ThreadPoolExecutor(WORKERS)
    runs: dict[str, Future] = {}

    def start(name: str, *overrides: str, run_dir: Path | None = None, cache: str | None = None) -> Future:
        folder = tmp / "runs" / name
        return pool.submit(cli_run, run_dir or folder / "run", tmp / (cache or f"runs/{name}") / "cache", *overrides)

    runs["default"] = start("default")
    # Four runs at once on one empty cache: two into one folder (one is refused), two into their own.
    for name, folder in [("same-0", tmp / "same"), ("same-1", tmp / "same"), ("apart-0", None), ("apart-1", None)]:
        runs[name] = start(name, *LIGHT, "train.epochs=2", run_dir=folder, cache="concurrent")
    user = ["model=custom", "model._target_=app_models.TinyNet", f"original.ckpt={tmp / 'user.ckpt'}"]
    runs["own"] = start("own", *LIGHT, *user)
    for case, bad in BAD_INPUTS.items():
        if bad.cli:
            runs[case] = start(case, *(o.format(tmp=tmp) for o in bad.overrides))

    default = runs["default"]
    shared = tmp / "runs" / "default" / "cache"
    later = {
        "limit": [*LIGHT, "+trainer.limit_train_batches=1"],
        "ddp": [*LIGHT, "trainer=ddp_cpu"],
        "multirun": ["-m", *LIGHT, "forget.classes=[0],[1]"],
    }
    for name, overrides in later.items():
        runs[name] = after(default, pool, lambda n=name, o=overrides: cli_run(tmp / n, shared, *o))
    quiet = ["baselines=[]", "trainer.enable_progress_bar=false"]
    runs["tty-quiet"] = after(default, pool, lambda: tty_run(tmp / "tty-quiet", shared, *quiet))
    finished = {}  # the default run's folder as it was before a rerun into it was refused
    default.add_done_callback(lambda f: finished.update(snapshot(f.result().run_dir)))
    runs["rerun"] = after(default, pool, lambda: cli_run(default.result().run_dir, tmp / "rerun-cache"))
    runs["rerun"].finished = finished
    sweep = {}
    runs["multirun"].add_done_callback(lambda f: sweep.update(snapshot(f.result().run_dir)))
    runs["sweep-again"] = after(runs["multirun"], pool, lambda: cli_run(tmp / "multirun", shared, "-m", *LIGHT))
    runs["sweep-again"].finished = sweep
    yield runs
    pool.shutdown(cancel_futures=True)


# --------------------------------------------------------------------------- the default run and its console


def test_default_run_writes_the_report_files_every_model_and_a_verdict(cli):
    run = cli["default"].result()
    assert_ok(run)
    report = run.report()
    assert {"method", "forget_classes", "models", "speedup_vs_retrain", "verdict", "config", "setting"} <= set(report)
    assert report["method"] == "relevance" and report["forget_classes"] == [0]
    assert list(report["models"]) == ["original", "relevance", "retrain"]
    for name, figures in report["models"].items():
        assert set(figures) >= FIGURES, name
        assert len(figures["per_class_acc"]) == 10 and all(0 <= a <= 1 for a in figures["per_class_acc"]), name
        assert all(0 <= figures[k] <= 1 for k in ("forget_acc", "retain_acc", "forget_train_acc", "mia")), name
        assert {"probe_forget_acc", "relearn_steps"} <= set(figures), name
    verdict = report["verdict"]
    assert isinstance(verdict["forgotten"], bool) and verdict["against"] == "retrain"
    assert {"forget_acc", "retain_acc", "mia", "probe_forget_acc"} <= set(verdict["checks"])
    assert set(verdict["checks"]) <= {
        "forget_acc", "retain_acc", "mia", "probe_forget_acc", "retain_attack_acc", "anamnesis_index"
    }  # fmt: skip
    assert report["models"]["original"]["forget_acc"] > 0.9, "the original must know the class it forgets"
    assert report["models"]["relevance"]["forget_acc"] <= 0.05
    assert report["setting"] == {
        "dataset": "digits", "model": "cnn", "shots": 10, "verdict_per_class": 10, "fraction": 0.1, "seed": 0
    }  # fmt: skip
    # The fit's own verdict judges 10 test images per class it never trained on, which the table does not count.
    assert (
        "on 10 forgotten-class / 90 remaining-class verdict_data samples"
        in report["models"]["relevance"]["samples_verdict"]
    )
    assert report["models"]["relevance"]["samples"] == 100, "every shot is trained on"
    for name in REPORT_FILES:
        assert (run.run_dir / name).is_file(), name
    assert (run.run_dir / "per_class_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run.run_dir / "logs").rglob("metrics.csv"))
    assert {p.name for p in (run.run_dir / ".hydra").iterdir()} == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    assert (run.run_dir / "report.md").read_text().startswith("| model |")


def test_forgotten_model_changed_only_inside_its_masks_and_loads_with_the_documented_line(cli, monkeypatch):
    run = cli["default"].result()
    assert_ok(run)
    saved = torch.load(run.run_dir / "forgotten_model.pt", weights_only=True)
    assert {"state_dict", "masks", "report"} <= set(saved) and saved["report"]["verdict"] == run.report()["verdict"]
    [original_file] = run.cache.glob("original-*.pt")
    original = torch.load(original_file, weights_only=True)["state_dict"]
    for name, mask in saved["masks"].items():
        assert torch.equal(saved["state_dict"][name][~mask], original[name][~mask]), f"{name} changed outside its mask"
    line = re.search(r"^    (import torch; .*)$", (run.run_dir / "report.md").read_text(), re.M).group(1)
    monkeypatch.chdir(run.run_dir)
    namespace: dict = {}
    exec(line, namespace)
    net = namespace["net"]
    assert all(torch.equal(v, saved["state_dict"][k]) for k, v in net.state_dict().items())


def test_the_console_reads_cleanly_and_ends_with_the_table_and_the_verdict(cli):
    run = cli["default"].result()
    assert_ok(run)
    out = run.result.stdout
    assert run.result.stderr == "", run.result.stderr[-2000:]
    assert "\r" not in out, "a progress bar wrote to a log"
    for noise in ("Tip", "GPU available", "TPU available", "Trainer.fit", "LeafSpec", "val_dataloader", "workers"):
        assert noise not in out, noise
    phases = ["Training the original model", "Method relevance", "Method retrain", "Evaluating original"]
    positions = [out.index(p) for p in [*phases, "Load the forgotten model", "| model |"]]
    assert positions == sorted(positions)
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("Forgotten: ") and "against retrain" in last
    assert len(out.splitlines()) < 30
    assert "GPU available" in run.log(), "Lightning's notices belong in run.log"


def test_on_a_terminal_enable_progress_bar_false_silences_every_bar(cli):
    run = cli["tty-quiet"].result()
    assert_ok(run)
    out = run.result.stdout
    assert "Evaluating original" in out and out.rstrip().splitlines()[-1].startswith("Forgotten: ")
    for bar in ("Epoch 0", "Relevance scoring", "Evaluating on test", "Relearning", "it/s"):
        assert bar not in out, bar


def test_progress_bars_follow_the_setting_and_a_log_gets_none():
    assert progress_wanted({"enable_progress_bar": True}) is False  # pytest's output is not a terminal
    assert progress_wanted({"enable_progress_bar": False}) is False


def test_evaluation_shows_no_bar_when_progress_is_off(capsys):
    dataset = tiny_loader(n_per_class=6).dataset
    settings = {"probe": ProbeSettings(per_class=2), "relearn": RelearnSettings(per_class=2, epochs=1, target=0.5)}
    for progress in (False, True):
        evaluate_forgetting(tiny_net(), dataset, dataset, [1], 4, original=tiny_net(), progress=progress, **settings)
        err = capsys.readouterr().err
        assert ("Evaluating on test" in err and "Relearning" in err) if progress else err == ""


# --------------------------------------------------------------------------- caches


def test_a_later_run_reuses_the_cached_original(cli):
    first, sweep = cli["default"].result(), cli["multirun"].result()
    assert_ok(sweep)
    later = Run(sweep.result, sweep.run_dir / "0", sweep.cache)  # forget.classes=[0]: the default run's setting
    assert "Model from the cache" in later.log() and "Training the original" not in later.log()
    figures = [r.report()["models"]["original"] for r in (first, later)]
    assert figures[0]["seconds"] == figures[1]["seconds"] > 0
    assert figures[0]["per_class_acc"] == figures[1]["per_class_acc"]


def test_a_trainer_setting_that_shapes_the_model_gets_its_own_original(cli):
    limited = cli["limit"].result()
    assert_ok(limited)
    assert "Training the original model" in limited.log() and "Model from the cache" not in limited.log()
    assert len(list(limited.cache.glob("original-*.pt"))) >= 2


def test_cache_key_covers_every_trainer_setting_but_display_ones(tmp_path):
    def key(*overrides: str) -> tuple:
        return check_in_process(tmp_path, *LIGHT, *overrides)["keys"]

    base = key()
    for shaping in ("+trainer.limit_train_batches=1", "+trainer.accumulate_grad_batches=2", "+trainer.max_steps=5",
                    "trainer.precision=64-true", "train.lr=0.01", "dataset.test_fraction=0.3"):  # fmt: skip
        assert key(shaping)[0] != base[0], shaping
    assert key("trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1") == base
    # Originals and baselines fit on one device: a DDP trainer and a CPU one share them.
    assert key("trainer=ddp_cpu")[0] == key("trainer=cpu")[0] == base[0]


# --------------------------------------------------------------------------- DDP, multirun


@pytest.mark.ddp
def test_ddp_cpu_run_forgets_with_the_cached_original(cli):
    run = cli["ddp"].result()
    assert_ok(run)
    assert "Model from the cache" in run.log()
    assert run.report()["models"]["relevance"]["forget_acc"] <= 0.05
    assert (run.run_dir / "forgotten_model.pt").is_file() and (run.run_dir / "train_ddp_process_1.log").is_file()
    assert run.result.stdout.rstrip().splitlines()[-1].startswith("Forgotten: ")


def test_multirun_writes_one_report_per_run_and_one_summary_table(cli):
    sweep = cli["multirun"].result()
    assert_ok(sweep)
    reports = [json.loads(p.read_text()) for p in sorted(sweep.run_dir.glob("*/report.json"))]
    assert sorted(r["forget_classes"] for r in reports) == [[0], [1]]
    summary = (sweep.run_dir / "sweep_summary.md").read_text()
    for classes in ("[0]", "[1]"):
        for model in ("original", "relevance"):
            assert re.search(rf"^\| forget\.classes={re.escape(classes)} \| {model} \| ", summary, re.M), summary
    assert sweep.result.stdout.rstrip().endswith(summary.rstrip())


def test_sweep_summary_tells_settings_apart_and_averages_seeds(tmp_path):
    for i, (classes, seed) in enumerate([([0], 0), ([0], 1), ([1], 0)]):
        figures = {"forget_acc": 0.1 * i, "retain_acc": 0.9, "seconds": 1.0, "samples": 10}
        report = {"config": {"forget": {"classes": classes}, "seed": seed}, "models": {"relevance": figures}}
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "report.json").write_text(json.dumps(report))
    app.SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    rows = (tmp_path / "sweep_summary.md").read_text().splitlines()[2:]
    assert [r.split(" | ")[:2] for r in rows] == [
        ["| forget.classes=[0]", "relevance"],
        ["| forget.classes=[1]", "relevance"],
    ]
    assert " 2 | 0.0500 ± 0.0707 |" in rows[0] and " 1 | 0.2000 |" in rows[1]


# --------------------------------------------------------------------------- runs that cannot clobber each other


def test_a_refused_rerun_leaves_a_finished_run_folder_as_it_was(cli):
    rerun = cli["rerun"].result()
    assert rerun.result.returncode == 2
    assert (
        rerun.result.stderr.strip()
        == f"error: {rerun.run_dir} already holds a finished run: choose another hydra.run.dir."
    )
    assert cli["rerun"].finished and snapshot(rerun.run_dir) == cli["rerun"].finished
    assert not rerun.cache.exists() or not list(rerun.cache.iterdir())


def test_a_second_sweep_into_a_used_sweep_folder_is_refused_before_hydra_writes_there(cli):
    again = cli["sweep-again"].result()
    assert again.result.returncode == 2
    assert "is already used by another run" in again.result.stderr and "sweep.claim" in again.result.stderr
    assert cli["sweep-again"].finished and snapshot(again.run_dir) == cli["sweep-again"].finished


def test_two_runs_started_at_once_into_one_folder_leave_one_report_and_one_refusal(cli):
    runs = sorted((cli["same-0"].result(), cli["same-1"].result()), key=lambda r: r.result.returncode)
    assert [r.result.returncode for r in runs] == [0, 2]
    refused = runs[1].result.stderr.strip()
    assert refused.startswith("error: ") and "is already used by another run" in refused and "\n" not in refused
    assert runs[0].report()["forget_classes"] == [0]
    assert "run.claim" in {p.name for p in runs[0].run_dir.iterdir()}


def test_three_runs_at_once_sharing_an_empty_cache_all_succeed_and_leave_one_whole_file(cli):
    runs = [cli[name].result() for name in ("same-0", "same-1", "apart-0", "apart-1")]
    assert sorted(r.result.returncode for r in runs) == [0, 0, 0, 2]
    for run in runs[2:]:
        assert run.report()["forget_classes"] == [0]
    cached = sorted(p.name for p in runs[0].cache.iterdir())
    assert len(cached) == 1 and cached[0].startswith("original-cnn-") and cached[0].endswith(".pt"), cached


# --------------------------------------------------------------------------- a user's own network and checkpoint


def test_own_network_and_lightning_checkpoint_run_and_the_forgotten_model_loads_into_it(cli, monkeypatch):
    run = cli["own"].result()
    assert_ok(run)
    assert "Training the original" not in run.log() and not list(run.cache.glob("original-*"))
    report = run.report()
    assert report["setting"]["model"] == "TinyNet" and report["models"]["original"]["seconds"] is None
    assert report["models"]["original"]["forget_acc"] > 0.8, "the checkpoint's weights were not loaded"
    line = re.search(r"^    (import torch; .*)$", (run.run_dir / "report.md").read_text(), re.M).group(1)
    assert "from app_models import TinyNet; net = TinyNet()" in line
    monkeypatch.chdir(run.run_dir)
    namespace: dict = {}
    exec(line, namespace)
    saved = torch.load("forgotten_model.pt", weights_only=True)["state_dict"]
    assert isinstance(namespace["net"], TinyNet)
    assert all(torch.equal(v, saved[k]) for k, v in namespace["net"].state_dict().items())


def test_a_users_network_gets_num_classes_and_in_channels_only_when_it_takes_them(tmp_path):
    prepared = check_in_process(tmp_path, *LIGHT, "model=custom", "model._target_=app_models.TinyNet", "+model.width=4")
    assert isinstance(prepared["make_model"](), TinyNet) and prepared["make_model"]().head.in_features == 16
    built = check_in_process(tmp_path, *LIGHT)["make_model"]
    assert {"num_classes": 10, "in_channels": 1}.items() <= built.keywords.items()


# --------------------------------------------------------------------------- composition


@pytest.mark.parametrize(("group", "option"), [pytest.param(g, o, id=f"{g}/{o}") for g in GROUPS for o in options(g)])
def test_every_config_option_composes_and_passes_the_type_checks(group, option):
    needed = {"imagefolder": ["dataset.root=/data"], "cifar10_jpg": [], "custom": ["model._target_=app_models.TinyNet"]}
    overrides = [f"+{group}={option}" if group == "experiment" else f"{group}={option}", *needed.get(option, [])]
    with composed(*overrides) as (cfg, method):
        settings = app.check_config(cfg, method)
        if group == "method":
            assert isinstance(instantiate(cfg.method), ForgettingMethod)
    if group == "experiment":
        with composed() as (default, _):
            assert cfg != default, f"experiment={option} changes nothing"
    if group == "model" and option != "custom":
        assert settings["model"]["arch"] == option and option in ARCHITECTURES
    if group == "dataset" and settings["dataset"]["_target_"].endswith("torchvision_dataset"):
        assert settings["dataset"]["name"] in TORCHVISION_DATASETS and settings["dataset"]["download"] is False


@pytest.mark.parametrize("option", [o for o in options("model") if o != "custom"])
def test_every_model_option_maps_small_grey_images_to_class_logits(option):
    with composed(f"model={option}") as (cfg, _):
        net = instantiate(cfg.model)(num_classes=10, in_channels=1)
    assert isinstance(net, nn.Module)
    with torch.no_grad():
        assert net.eval()(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def tiny_image_folder(root: Path, size: int = 6, kind: str = "png") -> Path:
    for split in ("train", "test"):
        for i, name in enumerate(("a", "b")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for j in range(2):
                Image.new("RGB", (size, size), (120 * i, 40 * j, 200)).save(folder / f"x{j}.{kind}")
    return root


@pytest.mark.parametrize("option", options("dataset"))
def test_every_dataset_option_loads_where_its_files_are_at_hand(option, tmp_path):
    with composed(f"dataset={option}") as (cfg, _):
        target = cfg.dataset._target_
        if target.endswith(".digits"):
            data = instantiate(cfg.dataset)
            assert (data.num_classes, data.in_channels, len(data.class_names)) == (10, 1, 10)
        elif target.endswith(".image_folder"):
            root = tiny_image_folder(tmp_path / "images")
            data = instantiate(cfg.dataset, root=str(root), cache_dir=str(tmp_path / "cache"), progress=False)
            assert data.num_classes == 2 and data.class_names == ["a", "b"]
            image, _ = data.train[0]
            assert image.shape == (cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size)
        elif target.endswith(".torchvision_dataset"):  # needs the downloaded files: structure only
            assert get_object(target) and cfg.dataset.name in TORCHVISION_DATASETS
        else:
            pytest.fail(f"dataset={option}: no check for target {target}")


def readme_app_commands() -> list[list[str]]:
    """The overrides of every ``python run.py ...`` command in the code blocks of the README and of ``docs/``."""
    commands, in_block = [], False
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for line in page.read_text().splitlines():
            if line.startswith("```"):
                in_block = not in_block
            elif in_block and "python run.py" in line:
                words = shlex.split(line.split("python run.py", 1)[1], comments=True)
                end = next((i for i, w in enumerate(words) if w in {">", "2>&1", "&&", "|", ";"}), len(words))
                command = [w for w in words[:end] if not w.startswith("-")]
                if command not in commands:  # the README repeats a few of the reference's examples
                    commands.append(command)
    return commands


def first_of_sweeps(overrides: list[str]) -> list[str]:
    """A multirun's overrides with each sweep reduced to its first value (what its first run composes)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [
        f"{o.get_key_element()}={next(o.sweep_string_iterator())}" if o.is_sweep_override() else text
        for o, text in zip(parsed, overrides)
    ]


@pytest.mark.parametrize("overrides", readme_app_commands(), ids=" ".join)
def test_the_readme_app_commands_pass_the_config_checks(overrides):
    with composed(*first_of_sweeps(overrides)) as (cfg, method):
        app.check_config(cfg, method)


# --------------------------------------------------------------------------- refused inputs


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("inputs")
    fixture_files(tmp)
    return tmp


@pytest.mark.parametrize("case", [c for c, b in BAD_INPUTS.items() if "-m" not in b.overrides])
def test_bad_input_is_refused_in_one_line_by_the_checks_before_training(case, files, tmp_path):
    bad = BAD_INPUTS[case]
    if case in NEEDS_NO_GPU and not NO_GPU:
        pytest.skip("this machine has a GPU")
    overrides = [f"original.cache_dir={tmp_path}/cache", *(o.format(tmp=files) for o in bad.overrides)]
    with pytest.raises(app.REFUSED) as refused:
        check_in_process(tmp_path, *overrides)
    message = app.refusal_message(refused.value)
    assert bad.message.format(tmp=files) in message and "\n" not in message
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", [c for c, b in BAD_INPUTS.items() if b.cli])
def test_bad_input_through_the_cli_exits_2_with_one_line_and_writes_nothing(case, cli):
    attempt = cli[case].result()
    bad = BAD_INPUTS[case]
    stderr = attempt.result.stderr
    if bad.compose_error:  # Hydra's own refusal, before the app runs
        assert attempt.result.returncode == 1 and bad.message in stderr and "Traceback" not in stderr
        return
    tmp = attempt.run_dir.parents[2]
    assert attempt.result.returncode == 2, stderr[-2000:]
    assert stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1, stderr[-2000:]
    assert bad.message.format(tmp=tmp) in stderr
    written = [p for p in attempt.run_dir.rglob("*") if p.is_file()] if attempt.run_dir.exists() else []
    if "-m" in bad.overrides:  # a new sweep folder: Hydra's record of the sweep, and nothing of the app's
        written = [p for p in written if p.name != "multirun.yaml"]
    else:  # the folder Hydra created for the run is gone again, with its parents that were new
        assert not attempt.run_dir.parent.exists(), "the refused run left its folder behind"
    assert not written, written
    assert not attempt.cache.exists() or not list(attempt.cache.iterdir()), "something was trained or cached"
