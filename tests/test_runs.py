"""Run folders: one run per folder, a refused run leaves the folder as it found it, a finished run's files load."""

import logging
from functools import partial

import pytest
import torch
from conftest import tiny_net
from torch import nn

from lightning_forget.app.pipeline import build_report
from lightning_forget.app.runs import CLAIM, MODEL_FILE, SWEEP_CLAIM, claim, give_back, load_line, write_run
from lightning_forget.methods import Outcome

TINY = {"_target_": "conftest.tiny_net"}


def test_a_claimed_folder_is_refused_to_the_next_claim_naming_its_holder(tmp_path):
    path = claim(tmp_path)
    assert path == tmp_path / CLAIM and path.read_text().startswith("pid ")
    with pytest.raises(FileExistsError, match=r"is already used by another run \(pid .*\): choose another"):
        claim(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [CLAIM]


def test_a_finished_run_folder_is_refused_to_a_run_but_not_to_a_sweep(tmp_path):
    (tmp_path / "report.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already holds a finished run"):
        claim(tmp_path)
    assert not (tmp_path / CLAIM).exists()
    assert claim(tmp_path, SWEEP_CLAIM) == tmp_path / SWEEP_CLAIM


def test_giving_back_removes_what_the_run_added_and_closes_its_log(tmp_path):
    (tmp_path / "old.txt").write_text("kept")
    (tmp_path / "sub").mkdir()
    found = set(tmp_path.iterdir())
    claim(tmp_path)
    log_file = logging.FileHandler(tmp_path / "run.log")
    elsewhere = logging.FileHandler(tmp_path / "sub" / "other.log")
    root = logging.getLogger()
    root.addHandler(log_file)
    root.addHandler(elsewhere)
    try:
        give_back(tmp_path, found)
        assert log_file not in root.handlers and log_file.stream is None
        assert elsewhere in root.handlers
    finally:
        root.removeHandler(log_file)
        root.removeHandler(elsewhere)
        elsewhere.close()
    assert set(tmp_path.iterdir()) == found and (tmp_path / "sub" / "other.log").exists()


def test_a_finished_run_writes_its_files_and_its_line_loads_the_forgotten_model(tmp_path, monkeypatch, capsys):
    net = tiny_net(num_classes=2)
    masks = {"0.weight": torch.zeros_like(net[0].weight, dtype=torch.bool)}
    figures = {"forget_acc": 0.0, "retain_acc": 1.0, "per_class_acc": [0.0, 1.0], "seconds": 1.0}
    report = build_report("m", [0], {"m": figures}) | {"class_names": ["a", "b"]}
    loading = partial(load_line, TINY, {"num_classes": 2})
    write_run(tmp_path, report, Outcome(net, 1.0, 4, "few_shot", masks), ["a", "b"], loading)
    assert {p.name for p in tmp_path.iterdir()} == {"report.json", "report.md", "per_class_accuracy.png", MODEL_FILE}
    saved = torch.load(tmp_path / MODEL_FILE, weights_only=True)
    assert saved["report"]["method"] == "m" and torch.equal(saved["masks"]["0.weight"], masks["0.weight"])
    out = capsys.readouterr().out
    assert f"Load the forgotten model: {loading(str(tmp_path / MODEL_FILE))}" in out and "| m |" in out
    line = loading()
    assert line in (tmp_path / "report.md").read_text()
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(line, namespace)
    assert isinstance(namespace["net"], nn.Sequential)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in namespace["net"].state_dict().items())
