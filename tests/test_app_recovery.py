"""No finished run lost to its evaluation, no run folder left for the user to repair (issue 23).

A figure the data or the models cannot give is reported as not measured (``None``, '-', and why), and the verdict
names the checks it could not make; what the evaluation needs of the data and the network is checked before any
training. A run stopped by Ctrl-C releases its folder, a claim whose process is gone is taken over, and seeds that
Lightning cannot take are refused with the other settings.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import tiny_loader, tiny_net
from PIL import Image
from test_app import LIGHT, REPO, app, assert_ok, check_in_process, clean_env, cli_run, snapshot
from torch.utils.data import Subset

from lightning_forget import evaluate_forgetting
from lightning_forget.app.data import ClassificationData
from lightning_forget.app.evaluable import check_evaluable, plan_evidence, split_verdict_images
from lightning_forget.app.models import build_model
from lightning_forget.app.pipeline import build_report
from lightning_forget.app.report import markdown_table
from lightning_forget.app.runs import CLAIM, SWEEP_CLAIM, claim, holder_gone, release
from lightning_forget.app.settings import SettingError
from lightning_forget.evaluation.evidence import ProbeSettings, RelearnSettings, integrity_evidence
from lightning_forget.evaluation.measurable import NOT_MEASURED
from lightning_forget.plugin.few_shot import dataset_labels, few_shot_subset

RELEARN = ("relearn_acc_1", "relearn_steps", "relearn_target", "anamnesis_index")


def gone_pid() -> int:
    """The id of a process that has ended (and was reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def claim_text(pid: int, since: float | None = None, host: str | None = None, offset: bool = True) -> str:
    """What a claim says; without ``offset``, as claims said before they gave the UTC offset of their time."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %z" if offset else "%Y-%m-%d %H:%M:%S", time.localtime(since))
    return f"pid {pid} on {host or socket.gethostname()} since {stamp}\n"


def blind_original(path: Path) -> Path:
    """A checkpoint of the default network that never predicts class 0 (its logit is -1e4): a class it never learnt."""
    state = build_model("cnn", 10, 1).state_dict()
    last_bias = [k for k, v in state.items() if k.endswith("bias") and v.shape == (10,)][-1]
    state[last_bias][0] = -1e4
    torch.save({"state_dict": state}, path)
    return path


def prepared(tmp_path: Path, *overrides: str) -> dict:
    """What ``python run.py`` prepares before any training, in this process, its cache under ``tmp_path``."""
    return check_in_process(tmp_path, f"original.cache_dir={tmp_path}/cache", *overrides)


def image_folder(root: Path, train: int = 4, test: int = 2) -> Path:
    """Three classes of 8x8 PNGs: ``train`` training and ``test`` test images each."""
    for split, count in (("train", train), ("test", test)):
        for i, name in enumerate(("a", "b", "c")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for j in range(count):
                Image.new("RGB", (8, 8), (100 * i, 60 * j, 200)).save(folder / f"x{j}.png")
    return root


# --------------------------------------------------------------------------- figures that cannot be measured


def test_an_original_that_knows_nothing_of_the_class_finishes_with_relearn_not_measured_and_named_in_the_verdict(
    tmp_path,
):
    ckpt = blind_original(tmp_path / "blind.pt")
    overrides = [f"original.ckpt={ckpt}", "train.epochs=1", "method.recipe.epochs=1", "eval.probe=null"]
    run = cli_run(tmp_path / "run", tmp_path / "cache", *overrides, "eval.relearn.epochs=1")
    assert_ok(run)
    report = run.report()
    assert list(report["models"]) == ["original", "relevance", "retrain"]
    assert report["models"]["original"]["forget_acc"] == 0.0
    for name, row in report["models"].items():
        assert all(row[k] is None for k in RELEARN), name
        assert "nothing to relearn" in row[NOT_MEASURED]["relearn_steps"], name
        assert set(RELEARN) <= set(row[NOT_MEASURED]), name
        assert row["retain_attack_acc"] is not None, "the retain-only attack needs no relearn target"
    not_checked = report["verdict"]["not_checked"]
    assert set(not_checked) == {"anamnesis_index"} and "nothing to relearn" in not_checked["anamnesis_index"]
    assert "anamnesis_index" not in report["verdict"]["checks"]
    table = (run.run_dir / "report.md").read_text()
    assert "Not measured: relearn_acc_1, relearn_steps, relearn_target, anamnesis_index (original, relevance, " in table
    last = run.result.stdout.rstrip().splitlines()[-1]
    assert last.startswith("Forgotten: ") and "anamnesis_index not checked (the original model gets none" in last


def test_a_tiny_image_folder_run_finishes_with_smaller_verdict_probe_and_relearn_sets_and_says_so(tmp_path):
    root = image_folder(tmp_path / "images")
    dataset = ["dataset=imagefolder", f"dataset.root={root}", "dataset.image_size=8", "dataset.cache_dir=null"]
    run = cli_run(tmp_path / "run", tmp_path / "cache", *dataset, "forget.shots=2", "train.epochs=1", "baselines=[]")
    assert_ok(run)
    lowered = [
        "forget.verdict_per_class=10 lowered to 1: class 0 (a) has only 2 test images and half at most are taken.",
        "eval.probe.per_class=50 lowered to 2: class 0 (a) has only 2 training images besides its 2 few-shot ones.",
        "eval.relearn.per_class=20 lowered to 2: class 0 (a) has only 2 training images besides its 2 few-shot ones.",
    ]
    assert run.report()["eval_notes"] == lowered
    assert all(note in run.log() and note in (run.run_dir / "report.md").read_text() for note in lowered)
    assert run.log().index(lowered[0]) < run.log().index("Training the original model"), "told before training"
    assert run.report()["models"]["relevance"]["probe_forget_acc"] is not None


def test_a_few_shot_draw_that_takes_a_whole_class_skips_probe_and_relearn_and_every_row_says_why(tmp_path, caplog):
    root = image_folder(tmp_path / "images")
    dataset = ["dataset=imagefolder", f"dataset.root={root}", "dataset.image_size=8", "dataset.cache_dir=null"]
    run = prepared(tmp_path, *dataset, "forget.shots=4")
    assert "eval.probe skipped: class 0 (a) has no training image left outside the few-shot set" in caplog.text
    assert "eval.relearn skipped" in caplog.text and "lower forget.shots to measure it" in caplog.text
    model = run["make_model"]()
    figures = run["evaluate"](model, original=model, exclude_indices=run["few_shot"].indices)
    for name in ("probe_forget_acc", "probe_retain_acc", "relearn_steps", "retain_attack_acc"):
        assert figures[name] is None and "forget.shots=4 takes all of them" in figures[NOT_MEASURED][name], name
    assert figures["forget_acc"] is not None and figures["distance_l2"] == 0.0


def test_a_probe_that_cannot_find_a_custom_networks_final_layer_is_refused_before_training(tmp_path):
    for model, problem in (("ConvHead", "No nn.Linear with out_features=10"), ("TwoHeads", "2 nn.Linear layers")):
        custom = ["model=custom", f"model._target_=recovery_models.{model}"]
        with pytest.raises(SettingError) as refused:
            prepared(tmp_path, "baselines=[]", "eval.probe.per_class=5", *custom)
        message = app.refusal_message(refused.value)
        assert message.startswith(f"eval.probe: {problem}") and "\n" not in message
        assert "eval.probe.layer=" in message and message.endswith("or turn the probe off: eval.probe=null.")
        assert prepared(tmp_path, *LIGHT, *custom)["evaluate"], "without the probe it runs"
    named = ["+eval.probe.layer=second", "model=custom", "model._target_=recovery_models.TwoHeads"]
    assert prepared(tmp_path, "baselines=[]", *named)["evaluate"], "with the final layer named it runs"


def test_a_diverged_model_gets_mia_and_probe_not_measured_instead_of_ending_the_evaluation():
    dataset = tiny_loader(n_per_class=6).dataset
    net = tiny_net()
    with torch.no_grad():
        net[0].weight.fill_(float("nan"))  # a diverged first layer: features and logits are NaN
    evidence = {"probe": ProbeSettings(per_class=2), "relearn": RelearnSettings(per_class=2, epochs=1)}
    figures = evaluate_forgetting(net, dataset, dataset, [1], 4, original=tiny_net(), progress=False, **evidence)
    assert figures["mia"] is None and "not finite" in figures[NOT_MEASURED]["mia"]
    assert figures["probe_forget_acc"] is None and "penultimate features" in figures[NOT_MEASURED]["probe_forget_acc"]
    assert figures["forget_acc"] is not None and "relearn_steps" in figures


def test_an_original_with_all_zero_weights_leaves_only_the_weight_distance_not_measured():
    dataset = tiny_loader(n_per_class=6).dataset
    zero = tiny_net()
    for p in zero.parameters():
        torch.nn.init.zeros_(p)
    figures = integrity_evidence(tiny_net(), dataset, dataset, [1], 4, original=zero, probe=ProbeSettings(per_class=2))
    assert figures["distance_l2"] is None and "all 0" in figures[NOT_MEASURED]["changed_fraction"]
    assert figures["probe_forget_acc"] is not None


def test_data_without_test_images_of_a_forgotten_class_or_training_images_of_it_is_refused_before_training():
    loader = tiny_loader(n_per_class=4)
    full = loader.dataset
    without_1 = Subset(full, [i for i in range(len(full)) if int(full[i][1]) != 1])

    def data(train, test) -> ClassificationData:
        return ClassificationData(train, train, test, 4, 1, ["a", "b", "c", "d"])

    check_evaluable(data(full, full), [1])
    with pytest.raises(SettingError, match=r"class 1 \(b\) has no test images: its forgetting cannot be measured"):
        check_evaluable(data(full, without_1), [1])
    with pytest.raises(SettingError, match=r"class 1 \(b\) has no training images"):
        check_evaluable(data(without_1, full), [1])
    only_1 = Subset(full, [i for i in range(len(full)) if int(full[i][1]) == 1])
    with pytest.raises(SettingError, match="no images of the classes that are not forgotten"):
        check_evaluable(data(full, only_1), [1])


def test_evidence_sets_shrink_to_what_every_class_has_left_and_a_class_without_images_skips_the_probe(caplog):
    full = tiny_loader(n_per_class=4).dataset
    without_3 = Subset(full, [i for i in range(len(full)) if int(full[i][1]) != 3])
    data = ClassificationData(without_3, without_3, full, 4, 1, ["a", "b", "c", "d"])
    few_shot = few_shot_subset(without_3, 1)
    plan = plan_evidence(data, [1], few_shot, tiny_net(), ProbeSettings(per_class=2), RelearnSettings(per_class=5))
    assert plan.probe is None and "class 3 (d) has no training images" in plan.skipped["probe_forget_acc"]
    assert plan.relearn == RelearnSettings(per_class=3) and not set(plan.skipped) & {"relearn_steps"}
    lowered = "eval.relearn.per_class=5 lowered to 3: class 0 (a) has only 3 training images besides its 1 few-shot"
    assert plan.notes == [f"{lowered} ones."]
    assert "eval.probe skipped: class 3 (d)" in caplog.text and plan.notes[0] in caplog.text


def test_the_verdicts_test_images_leave_the_test_set_and_shrink_or_give_way_to_a_held_back_shot(caplog):
    full = tiny_loader(n_per_class=6).dataset
    data = ClassificationData(full, full, full, 4, 1, ["a", "b", "c", "d"])
    rest, judged, note = split_verdict_images(data, 2, seed=0)
    assert dataset_labels(judged).bincount().tolist() == [2, 2, 2, 2] and note == ""
    assert sorted([*judged.indices, *rest.test.indices]) == list(range(len(full))), "an image in both, or lost"
    assert split_verdict_images(data, 2, seed=0)[1].indices == judged.indices, "not reproducible from the seed"

    rest, judged, note = split_verdict_images(data, 5, seed=0)
    assert dataset_labels(judged).bincount().tolist() == [3, 3, 3, 3] and len(rest.test) == 12
    assert note == (
        "forget.verdict_per_class=5 lowered to 3: class 0 (a) has only 6 test images and half at most are taken."
    )
    assert note in caplog.text

    one_of_d = Subset(full, [i for i in range(len(full)) if int(full[i][1]) != 3 or i == len(full) - 1])
    sparse = ClassificationData(full, full, one_of_d, 4, 1, ["a", "b", "c", "d"])
    rest, judged, note = split_verdict_images(sparse, 2, seed=0)
    assert judged is None and rest is sparse and "class 3 (d) has only 1 test images" in note
    assert "judges a held-back shot instead" in note
    assert split_verdict_images(data, 0, seed=0) == (data, None, "")


def test_the_report_lists_what_was_not_measured_and_the_verdict_what_it_could_not_check():
    reason = "the original model gets none of the forgotten classes right: there is nothing to relearn"
    missing = {"relearn_steps": reason, "anamnesis_index": reason}
    row = {"forget_acc": 0.0, "retain_acc": 0.9, "per_class_acc": [0.0, 0.9], "seconds": 1.0}
    row |= {"mia": 0.1, "relearn_steps": None, "anamnesis_index": None, NOT_MEASURED: missing}
    retrain = row | {"mia": None, NOT_MEASURED: missing | {"mia": "x"}}
    models = {"original": dict(row), "m": dict(row), "retrain": retrain}
    report = build_report("m", [0], models)
    assert report["verdict"]["not_checked"] == {"mia": "retrain row: x", "anamnesis_index": reason}
    table = markdown_table(report)
    assert f"Not measured: relearn_steps, anamnesis_index (original, m, retrain): {reason}." in table
    assert "Not measured: mia (retrain): x." in table
    assert table.rstrip().endswith(f"mia not checked (retrain row: x); anamnesis_index not checked ({reason})).")
    assert "| - |" in table
    assert "not_checked" not in build_report("m", [0], {"m": row})["verdict"], "no retrain: nothing more to check"


# --------------------------------------------------------------------------- run folders nobody has to repair


def test_ctrl_c_during_training_releases_the_run_folder_and_a_rerun_into_it_finishes(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    command = [sys.executable, "run.py", f"hydra.run.dir={run_dir}", f"original.cache_dir={cache}", *LIGHT]
    with open(tmp_path / "out.txt", "w") as out:
        process = subprocess.Popen([*command, "train.epochs=1000"], cwd=REPO, stdout=out, stderr=out, env=clean_env())
        try:
            deadline = time.monotonic() + 120
            log = run_dir / "run.log"
            while not (log.is_file() and "GPU available" in log.read_text()):  # the original's Trainer is up
                assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "out.txt").read_text()
                time.sleep(0.1)
            assert (run_dir / CLAIM).is_file()
            time.sleep(0.5)
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=60) in (1, 130)
        finally:
            process.kill()
    assert not (run_dir / CLAIM).exists() and not (run_dir / "report.json").exists()
    assert "is released, a run into it starts over" in (run_dir / "run.log").read_text()
    assert not list(cache.glob("original-*.pt")), "an interrupted original is never cached"
    rerun = cli_run(run_dir, cache, *LIGHT, "train.epochs=1")
    assert_ok(rerun)
    assert rerun.report()["forget_classes"] == [0] and (run_dir / CLAIM).is_file()


def test_a_claim_left_by_a_killed_run_is_taken_over_by_the_next_run_with_a_warning(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = claim_text(gone_pid())
    (run_dir / CLAIM).write_text(stale)
    run = cli_run(run_dir, tmp_path / "cache", *LIGHT, "train.epochs=1")
    assert_ok(run)
    assert f"Took over {run_dir}: the run that claimed it ({stale.strip()}) is gone." in run.log()
    assert (run_dir / CLAIM).read_text() != stale and run.report()["forget_classes"] == [0]


def test_a_claim_is_taken_over_only_when_its_process_is_gone_from_this_machine(tmp_path, caplog):
    cases = {
        "running": (claim_text(os.getpid()), False),  # claimed after this process started
        "gone": (claim_text(gone_pid()), True),
        "pid reused": (claim_text(os.getpid(), since=time.time() - 3600), True),  # this process started later
        "pid reused, old claim": (claim_text(os.getpid(), since=time.time() - 3600, offset=False), True),
        "running, old claim": (claim_text(os.getpid(), offset=False), False),
        "other machine": (claim_text(gone_pid(), host="elsewhere.example"), False),
        "unreadable": ("garbage\n", False),
    }
    for name, (text, gone) in cases.items():
        assert holder_gone(text.strip()) is gone, name
        folder = tmp_path / name.replace(" ", "_").replace(",", "")
        folder.mkdir()
        (folder / CLAIM).write_text(text)
        if gone:
            assert claim(folder) == folder / CLAIM and f"Took over {folder}" in caplog.text, name
            assert (folder / CLAIM).read_text().startswith(f"pid {os.getpid()} on "), name
        else:
            with pytest.raises(FileExistsError, match="is already used by another run"):
                claim(folder)
            assert (folder / CLAIM).read_text() == text, name
    (tmp_path / SWEEP_CLAIM).write_text(claim_text(gone_pid()))
    with pytest.raises(FileExistsError, match="is already used by another run"):
        claim(tmp_path, SWEEP_CLAIM)  # a finished sweep's claim looks the same: never taken over


def test_release_removes_the_claim_of_this_process_only_and_keeps_what_the_run_wrote(tmp_path):
    claim(tmp_path)
    (tmp_path / "run.log").write_text("kept")
    release(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["run.log"]
    other = claim_text(os.getppid())
    (tmp_path / CLAIM).write_text(other)
    release(tmp_path)
    assert (tmp_path / CLAIM).read_text() == other


def test_seeds_that_seed_everything_cannot_take_are_refused_in_one_line_and_the_folder_is_untouched(tmp_path):
    def attempt(seed: int) -> tuple[Path, dict]:
        run_dir = tmp_path / str(seed)
        run_dir.mkdir()
        (run_dir / "notes.txt").write_text("mine")
        return run_dir, snapshot(run_dir)

    seeds = {seed: attempt(seed) for seed in (-1, 2**32)}
    with ThreadPoolExecutor(len(seeds)) as pool:  # both at once: each is seconds of imports
        runs = {s: pool.submit(cli_run, d, tmp_path / "cache", *LIGHT, f"seed={s}") for s, (d, _) in seeds.items()}
    for seed, (run_dir, before) in seeds.items():
        result = runs[seed].result().result
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr == f"error: seed={seed} is not allowed: expected an integer from 0 to 4294967295.\n"
        assert snapshot(run_dir) == before
    assert not (tmp_path / "cache").exists()


def test_evidence_seeds_out_of_range_are_refused_with_the_settings(tmp_path):
    for key in ("eval.probe.seed", "eval.relearn.seed"):
        with pytest.raises(SettingError, match=rf"^{key}=18446744073709551616 is not allowed"):
            prepared(tmp_path, "baselines=[]", f"+{key}={2**64}")
    assert prepared(tmp_path, *LIGHT, f"seed={2**32 - 1}")["seed"] == 2**32 - 1
