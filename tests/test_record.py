"""Deletion requests over time and the record that proves what was done (issue 19).

A second request keeps the first one's classes forgotten (library and app), every forgetting leaves a record (the
sha256 of the input and output weights, of the masks and of the samples; the classes, method, versions, verdict and
times) chained to the record of the request it started from, and ``python -m lightning_forget.verify`` checks a
record against the files without the data, naming what does not match.
"""

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TEST_SEED, bound, quiet_trainer
from test_app import REPO, assert_ok, check_in_process, clean_env, cli_run
from torch.utils.data import DataLoader

from lightning_forget import ClassForgetting, ClassifierModule, ForgettingModule, build_model, few_shot_subset
from lightning_forget.app.data import digits
from lightning_forget.app.settings import SettingError
from lightning_forget.plugin.few_shot import dataset_labels
from lightning_forget.plugin.masks import verify as masks_verify
from lightning_forget.plugin.record import (
    FORMAT,
    RECORD_FILE,
    check_record,
    forgotten_before,
    main,
    record_digest,
    state_digest,
    write_record,
)

# Runs of the app with the few settings a record needs: seconds each.
TINY_APP = ["train.epochs=3", "eval.probe=null", "eval.relearn=null", "baselines=[retrain]"]


@dataclass
class Chain:
    """Two requests on one digits network, through the library: class 3, then class 7 from the result."""

    folder: Path
    first: dict
    second: dict
    test_acc: dict[str, float]

    def path(self, name: str) -> str:
        return str(self.folder / name)


def class_accuracy(net: torch.nn.Module, dataset, classes: list[int], keep: bool) -> float:
    """Test accuracy on the samples of ``classes`` (``keep=False``: on every other class's)."""
    x, y = dataset.tensors
    rows = torch.isin(y, torch.tensor(classes)) == keep
    with torch.no_grad():
        return float((net.eval()(x[rows]).argmax(-1) == y[rows]).float().mean())


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Chain:
    folder = tmp_path_factory.mktemp("chain")
    L.seed_everything(TEST_SEED, verbose=False)
    data = digits()
    net = build_model("cnn", 10, 1)
    quiet_trainer(max_epochs=15).fit(ClassifierModule(net, 10), DataLoader(data.train, batch_size=64, shuffle=True))
    few = DataLoader(few_shot_subset(data.train, shots=10, seed=TEST_SEED), batch_size=32, shuffle=True)
    module = ForgettingModule(net, [3], 10)
    torch.save(module.state_dict(), folder / "original.pt")
    first = ClassForgetting([3])
    trainer = quiet_trainer(max_epochs=50, callbacks=[first])
    trainer.fit(module, few)
    trainer.save_checkpoint(folder / "first.ckpt")
    write_record(first.record(), folder / "first.json")

    earlier = forgotten_before(folder / "first.ckpt")  # what a later request reads from the model it starts from
    second = ClassForgetting([7], already_forgotten=earlier.classes, previous_record=earlier.record)
    trainer = quiet_trainer(max_epochs=50, callbacks=[second])
    trainer.fit(ForgettingModule(net, [3, 7], 10), few)
    trainer.save_checkpoint(folder / "second.ckpt")
    write_record(second.record(), folder / "second.json")
    test_acc = {
        "3": class_accuracy(net, data.test, [3], keep=True),
        "7": class_accuracy(net, data.test, [7], keep=True),
        "remaining": class_accuracy(net, data.test, [3, 7], keep=False),
    }
    return Chain(folder, first.record(), second.record(), test_acc)


# --------------------------------------------------------------------------- the library: two requests


def test_a_second_request_keeps_the_first_class_forgotten_and_its_record_chains_to_the_first(chain):
    bound("class 3 test accuracy after both requests", chain.test_acc["3"], "<=", 0.05)
    bound("class 7 test accuracy after both requests", chain.test_acc["7"], "<=", 0.05)
    bound("remaining classes' test accuracy after both requests", chain.test_acc["remaining"], ">=", 0.9)
    first, second = chain.first, chain.second
    assert first["previous_record"] is None and second["previous_record"] == record_digest(first)
    assert first["classes"] == {"forgotten": [3], "already_forgotten": [], "forgotten_so_far": [3], "names": None}
    assert second["classes"]["forgotten"] == [7] and second["classes"]["forgotten_so_far"] == [3, 7]
    # The second request started from the weights the first produced, and was judged on both classes.
    assert second["weights"]["input_sha256"] == first["weights"]["output_sha256"]
    assert "Classes [3, 7]" in second["verdict"]["text"] and second["evidence"]["after"]["forget_samples"] >= 2
    for record in (first, second):
        assert json.loads(json.dumps(record)) == record, "the record must be plain JSON"
        assert record["format"] == FORMAT and record["method"]["name"] == "ClassForgetting"
        assert set(record["versions"]) >= {"lightning_forget", "torch", "lightning"}
        assert record["samples"]["count"] == 100 and len(record["samples"]["sha256"]) == 64
        assert record["started"].endswith("Z") and record["started"] <= record["finished"]
    assert check_record(chain.path("first.json"), chain.path("original.pt"), chain.path("first.ckpt")).startswith(
        "verified: "
    )
    line = check_record(
        chain.path("second.json"), chain.path("first.ckpt"), chain.path("second.ckpt"), chain.path("first.json")
    )
    assert line.startswith("verified: ") and "chained to" in line and "entries outside the masks bit-identical" in line


def test_the_checkpoint_holds_what_the_next_request_reads(chain):
    earlier = forgotten_before(chain.path("first.ckpt"))
    assert earlier.classes == [3] and earlier.record == chain.first
    later = forgotten_before(chain.path("second.ckpt"))
    assert later.classes == [3, 7] and later.record_sha256 == record_digest(chain.second)
    state = torch.load(chain.path("second.ckpt"), weights_only=True)["callbacks"]["ClassForgetting"]
    assert state["forgotten_so_far"] == [3, 7] and state["already_forgotten"] == [3]


def test_already_forgotten_and_previous_record_are_checked():
    for bad, message in [
        ([3], "share class [3]"),
        (["a"], "already_forgotten must be integer class indices"),
        ([-1], "already_forgotten [-1] are not class indices"),
        ([1, 1], "already_forgotten lists class [1] more than once"),
    ]:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            ClassForgetting([3], already_forgotten=bad)
    with pytest.raises(ValueError, match="previous_record must be a record or its sha256"):
        ClassForgetting([3], previous_record="not a hash")
    assert ClassForgetting([7], already_forgotten=(5, 3)).forgotten_so_far == [3, 5, 7]
    with pytest.raises(RuntimeError, match="needs a finished fit"):
        ClassForgetting([3]).record()


def test_the_state_digest_is_the_documented_canonical_hash():
    state = {"b": torch.tensor([1.0, -0.0]), "a": torch.ones(2, 1, dtype=torch.bool)}
    expected = hashlib.sha256(b"lightning-forget state_dict v1\0")
    for name in ("a", "b"):
        t = state[name]
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        shape = ",".join(map(str, t.shape))
        expected.update(f"{name}\0{t.dtype}\0{shape}\0".encode() + len(raw).to_bytes(8, "little") + raw)
    assert state_digest(state) == expected.hexdigest() == state_digest(dict(reversed(state.items())))
    for changed in (
        {**state, "b": torch.tensor([1.0, 0.0])},  # -0.0 and 0.0 differ in their bits
        {**state, "b": torch.tensor([1.0, -0.0], dtype=torch.float64)},
        {**state, "a": torch.ones(1, 2, dtype=torch.bool)},
        {"c": state["b"], "a": state["a"]},
    ):
        assert state_digest(changed) != state_digest(state)


# --------------------------------------------------------------------------- verification without the data


def run_verify(capsys, *args: str) -> tuple[int, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    text = (out.out + out.err).strip()
    assert len(text.splitlines()) == 1, text
    return code, text


def test_tampering_fails_verification_naming_the_cause(chain, tmp_path, capsys):
    good = (chain.path("second.json"), "--original", chain.path("first.ckpt"), "--forgotten", chain.path("second.ckpt"))
    assert run_verify(capsys, *good, "--previous", chain.path("first.json"))[0] == 0

    # A weight outside the masks changed after the forgetting.
    saved = torch.load(chain.path("second.ckpt"), weights_only=True)
    masks = saved["callbacks"]["ClassForgetting"]["masks"]
    name = next(n for n, m in masks.items() if not m.all() and n.endswith("weight"))
    weight = saved["state_dict"][name]
    weight.view(-1)[(~masks[name]).view(-1).nonzero()[0]] += 0.5
    torch.save(saved, tmp_path / "tampered.ckpt")
    code, line = run_verify(capsys, chain.path("second.json"), "--original", chain.path("first.ckpt"),
                            "--forgotten", tmp_path / "tampered.ckpt")  # fmt: skip
    assert code == 1 and "1 entries outside the masks differ from the original" in line and name in line, line

    # A swapped file: the model before the first request given as the second's original.
    code, line = run_verify(capsys, chain.path("second.json"), "--original", chain.path("original.pt"))
    assert code == 1 and line.startswith("NOT verified: original:") and "not the record's input weights" in line

    # A swapped forgotten model: the first request's result given as the second's.
    code, line = run_verify(capsys, chain.path("second.json"), "--forgotten", chain.path("first.ckpt"))
    assert code == 1 and line.startswith("NOT verified: forgotten:") and "holds another record" in line, line

    # A broken chain: an earlier record that is not the one the second names (one figure edited).
    edited = json.loads(Path(chain.path("first.json")).read_text())
    edited["verdict"]["forgotten"] = not edited["verdict"]["forgotten"]
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    code, line = run_verify(capsys, *good, "--previous", tmp_path / "edited.json")
    assert code == 1 and line.startswith("NOT verified: chain:") and "is not the previous record" in line, line
    # ... and a record that names none given a previous one.
    code, line = run_verify(capsys, chain.path("first.json"), "--previous", chain.path("first.json"))
    assert code == 1 and "names no previous record" in line


def test_python_m_lightning_forget_verify_runs_and_lightning_forget_verify_stays_the_function(chain):
    def python_m(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "lightning_forget.verify", *args]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, env=clean_env())

    assert python_m("--help").returncode == 0
    done = python_m(chain.path("first.json"), "--original", chain.path("original.pt"),
                    "--forgotten", chain.path("first.ckpt"))  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("verified: ") and len(done.stdout.splitlines()) == 1
    refused = python_m(chain.path("first.json"), "--forgotten", chain.path("second.ckpt"))
    assert refused.returncode == 1 and refused.stderr.startswith("NOT verified: ") and refused.stdout == ""
    import lightning_forget.verify  # the CLI module: importing it must not replace the function

    assert lightning_forget.verify is masks_verify
    from lightning_forget import verify

    assert verify is masks_verify
    for name in ("forgotten_before", "record_digest", "state_digest", "check_record", "write_record", "verify"):
        assert name in lightning_forget.__all__ and getattr(lightning_forget, name) is not None, name


# --------------------------------------------------------------------------- the app: a second request


def test_an_app_run_from_a_forgotten_model_keeps_its_classes_forgotten_and_chains_its_record(tmp_path):
    cache = tmp_path / "cache"
    first = cli_run(tmp_path / "first", cache, "forget.classes=[3]", *TINY_APP)
    assert_ok(first)
    earlier = first.run_dir / "forgotten_model.pt"
    with pytest.raises(SettingError, match="forgot already"):  # a class forgotten before is refused, before work
        check_in_process(tmp_path, f"original.cache_dir={cache}", f"original.ckpt={earlier}", "forget.classes=[3]")
    second = cli_run(tmp_path / "second", cache, "forget.classes=[7]", f"original.ckpt={earlier}", *TINY_APP)
    assert_ok(second)

    report = second.report()
    assert report["forget_classes"] == [7] and report["already_forgotten"] == [3]
    assert report["forgotten_so_far"] == [3, 7]
    assert (
        "Forgotten classes: 7 (7); forgotten by earlier requests and kept forgotten: 3 (3)."
        in (second.run_dir / "report.md").read_text()
    )
    relevance, retrain = report["models"]["relevance"], report["models"]["retrain"]
    # The method held one shot of every class back from its fit, from the images without augmentation.
    assert "verdict_data samples it did not train on" in relevance["samples_verdict"]
    for c in (3, 7):
        bound(f"app: class {c} after the second request", relevance["per_class_acc"][c], "<=", 0.05)
    # The verdict's forget_acc is over both classes; retraining never saw either.
    assert report["verdict"]["checks"]["forget_acc"]["value"] == relevance["forget_acc"]
    labels = dataset_labels(digits().train)
    assert retrain["samples"] == int((~torch.isin(labels, torch.tensor([3, 7]))).sum())

    records = [json.loads((run.run_dir / RECORD_FILE).read_text()) for run in (first, second)]
    assert records[1]["previous_record"] == record_digest(records[0]) == first.report()["record_sha256"]
    assert records[1]["classes"]["names"] == {"3": "3", "7": "7"} and records[1]["verdict"] == report["verdict"]
    assert len(records[1]["samples"]["indices"]) == 100 and records[1]["weights"]["input_file"] == str(earlier)
    saved = torch.load(second.run_dir / "forgotten_model.pt", weights_only=True)
    assert saved["forgotten_so_far"] == [3, 7] and saved["record_sha256"] == record_digest(records[1])
    line = check_record(second.run_dir / RECORD_FILE, earlier, second.run_dir / "forgotten_model.pt",
                        first.run_dir / RECORD_FILE)  # fmt: skip
    assert line.startswith("verified: ") and "chained to" in line and "bit-identical" in line
