"""bench/forgetting.py and bench/tuning.py: peers tuned on images no model trains on, and a table that only
marks a lead larger than the spread over seeds; bench/probe_projection.py and bench/frontier.py."""

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _imported(*names: str):
    """The bench scripts as modules, with bench/ on the path while a test uses them (they import each other)."""
    sys.path.insert(0, str(BENCH))
    try:
        modules = tuple(importlib.import_module(name) for name in names)
        yield modules if len(modules) > 1 else modules[0]
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def bench():
    yield from _imported("forgetting", "tuning")


@pytest.fixture(scope="module")
def probe_projection():
    yield from _imported("probe_projection")


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory) -> Path:
    """The scikit-learn digits as 16x16 RGB images in ImageFolder layout: 24 training and 6 test images a class."""
    root = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    counts: dict[tuple[str, int], int] = {}
    for image, label in zip(digits.images, digits.target, strict=True):
        split = "train" if counts.get(("train", label), 0) < 24 else "test"
        if counts.get((split, label), 0) >= (24 if split == "train" else 6):
            continue
        counts[split, label] = counts.get((split, label), 0) + 1
        folder = root / split / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.repeat((image * 255 / 16).astype(np.uint8)[..., None], 3, axis=2)
        Image.fromarray(pixels).resize((16, 16)).save(folder / f"{counts[split, label]}.png")
    return root


def _args(root: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--root", str(root), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "models"),
        "--train-per-class", "16", "--tune-per-class", "4", "--epochs", "1", "--seeds", "0", "--forget", "1",
        "--probe-per-class", "2", "--relearn-per-class", "2", "--relearn-epochs", "1", *extra,
    ]  # fmt: skip


def test_the_validation_split_holds_training_images_that_no_model_trains_on(bench, digit_folder, tmp_path):
    forgetting, tuning = bench
    args = forgetting.parse_args(_args(digit_folder, tmp_path))
    data = forgetting.load_data(args)
    validation = tuning.validation_split(data, 4, seed=0)
    assert validation.dataset is data.train_eval.dataset  # the training folder, never the test set
    assert not set(validation.indices) & set(data.train_eval.indices)
    labels = [int(validation.dataset[i][1]) for i in validation.indices]
    assert sorted(labels) == sorted(list(range(10)) * 4)

    everything = forgetting.load_data(forgetting.parse_args(_args(digit_folder, tmp_path, "--train-per-class", "0")))
    with pytest.raises(ValueError, match="--tune-per-class 0"):
        tuning.validation_split(everything, 4, seed=0)


def test_every_peer_gets_a_tuned_row_at_its_grid_point_closest_to_retraining(bench, digit_folder, tmp_path):
    forgetting, _ = bench
    forgetting.main(_args(digit_folder, tmp_path, "--methods", "relevance", "retrain", "delete", "ssd"))
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    (report,) = results["reports"]
    names = list(report["models"])
    for peer in ("delete", "ssd"):  # published and tuned side by side
        assert names.index(f"{peer}_tuned") == names.index(peer) + 1
    assert report["models"]["delete_tuned"]["retain_acc"] is not None
    target = report["tuning"]["retrain_validation"]
    for peer in ("delete", "ssd"):
        search = report["tuning"][peer]
        assert [row["point"] for row in search["grid"]] == results["meta"]["grids"][peer]
        for row in search["grid"]:
            gap = abs(row["forget_acc"] - target["forget_acc"]) + abs(row["retain_acc"] - target["retain_acc"])
            assert row["gap"] == pytest.approx(gap)
        assert search["chosen"] == min(search["grid"], key=lambda row: row["gap"])["point"]
    assert results["meta"]["validation_images"] == 40
    assert set(results["meta"]["time_spent"]) == set(forgetting.TIME_PARTS)
    assert (tmp_path / "out" / "tradeoff.png").stat().st_size > 0
    assert "delete_tuned" in (tmp_path / "out" / "results.md").read_text()


def test_peers_without_retraining_to_aim_at_are_refused_before_any_work(bench, digit_folder, tmp_path):
    forgetting, _ = bench
    with pytest.raises(SystemExit):
        forgetting.parse_args(_args(digit_folder, tmp_path, "--methods", "relevance", "delete"))
    assert not (tmp_path / "out").exists()


def test_projecting_out_a_class_direction_puts_its_mean_on_the_others_and_keeps_the_rest(probe_projection):
    torch.manual_seed(0)
    features, labels = torch.randn(60, 5), torch.arange(60) % 3
    features[labels == 1] += torch.tensor([3.0, -2.0, 0.0, 0.0, 1.0])
    projection = probe_projection.projection_from(features, labels, [1])
    moved = projection(features)
    gap = moved[labels == 1].mean(0) - moved[labels != 1].mean(0)
    assert gap.abs().max() < 1e-5 < (features[labels == 1].mean(0) - features[labels != 1].mean(0)).abs().max()
    direction = features[labels == 1].mean(0) - features[labels != 1].mean(0)
    other = torch.randn(5)
    other -= (other @ direction) / (direction @ direction) * direction  # every direction but the class's is kept
    assert torch.allclose(projection.projector @ other, other, atol=1e-5)


def test_the_orthogonal_projection_keeps_every_remaining_class_mean_and_removes_only_what_sets_the_class_apart(
    probe_projection,
):
    torch.manual_seed(0)
    features, labels = torch.randn(90, 6), torch.arange(90) % 3
    features[labels == 0] += torch.tensor([2.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    features[labels == 1] += torch.tensor([1.0, 0.0, 3.0, 0.0, 0.0, 0.0])  # shares dim 0 with class 0
    moved = probe_projection.projection_from(features, labels, [1], orthogonal=True)(features)
    for kept in (0, 2):
        assert torch.allclose(moved[labels == kept].mean(0), features[labels == kept].mean(0), atol=1e-4)
    full = probe_projection.projection_from(features, labels, [1])(features)
    assert not torch.allclose(full[labels == 0].mean(0), features[labels == 0].mean(0), atol=1e-2)
    # what it removes is the class's own dimension, not the one it shares with class 0
    assert moved[labels == 1, 2].mean().abs() < 0.5 < features[labels == 1, 2].mean()


def test_the_probe_projection_script_writes_every_cell_with_the_protocols_options(
    probe_projection, digit_folder, tmp_path
):
    out = tmp_path / "projection"
    probe_projection.main([
        "--out", str(out), "--root", str(digit_folder), "--cache-dir", str(tmp_path / "models"), "--seeds", "0",
        "--forget", "1", "2,3", "--shots", "3", "--probe-per-class", "4", "--train-per-class", "16", "--epochs", "1",
    ])  # fmt: skip
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [row["forget"] for row in rows] == ["1", "2,3"]
    for row in rows:
        for source in probe_projection.SOURCES:
            assert set(row[source]) == {"probe_forget_acc", "probe_retain_acc", "retain_acc"}
    assert (out / "results.md").read_text().count("\n| 0 |") == 2


def _report(seed: int, rows: dict[str, dict[str, float]]) -> dict:
    return {"setting": {"forget": "1 (a)", "shots": 10, "seed": seed}, "models": rows}


def test_a_row_is_bold_only_where_it_leads_the_next_by_more_than_both_stds(bench):
    forgetting, _ = bench
    # retain_acc: ours 0.60 ± 0.01 against 0.50 ± 0.01 (a clear lead); probe: 0.50 ± 0.10 against 0.55 ± 0.01.
    reports = [
        _report(
            seed,
            {
                "retrain": {"retain_acc": 0.9, "probe_forget_acc": 0.1},  # a reference: never ranked
                "ours": {
                    "retain_acc": 0.60 + d,
                    "probe_forget_acc": 0.50 + 10 * d,
                    "relearn_steps": None,
                    "relearn_budget": 60,
                },  # never relearned: counted as the budget, a lower bound
                "peer": {"retain_acc": 0.50 + d, "probe_forget_acc": 0.55 + d, "relearn_steps": 20},
            },
        )
        for seed, d in enumerate((-0.01, 0.0, 0.01))
    ]
    table = forgetting.headline(reports)
    ours = next(line for line in table.splitlines() if "| ours |" in line)
    peer = next(line for line in table.splitlines() if "| peer |" in line)
    assert "**0.600 ± 0.010**" in ours
    assert "**" not in peer and "0.500 ± 0.100" in ours  # a lead of 0.05 inside a std of 0.10
    assert "**≥ 60.0 ± 0.0**" in ours and "| 20.0 ± 0.0 |" in peer


@pytest.fixture(scope="module")
def frontier():
    yield from _imported("frontier")


def test_the_frontier_places_each_row_against_its_own_runs_original_and_retraining(frontier, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    reports = [
        _report(seed, {name: {"probe_forget_acc": p, "retain_acc": r, "probe_retain_acc": q} for name, p, r, q in rows})
        for seed, rows in enumerate((
            (("original", 0.7, 0.6, 0.55), ("retrain", 0.5, 0.6, 0.56), ("ours", 0.6, 0.59, 0.50)),
            (("original", 0.8, 0.5, 0.55), ("retrain", 0.4, 0.6, 0.54), ("ours", 0.5, 0.58, 0.52)),
        ))
    ]  # fmt: skip
    (run / "results.json").write_text(json.dumps({"meta": {}, "reports": reports}))
    points = {p.row: p for p in frontier.points_of(run / "results.json")}
    assert set(points) == {"ours", "retrain"}
    assert points["ours"].setting == "1 (a), 10 shots"  # another shot count is another protocol
    ours = points["ours"]
    assert ours.seeds == 2
    assert ours.probe_share == pytest.approx((0.5 + 0.75) / 2)  # each seed's share of its own gap
    assert ours.retain_gap == pytest.approx((-0.01 - 0.02) / 2)
    assert ours.probe_retain_change == pytest.approx((-0.05 - 0.03) / 2)  # against the original, per seed
    assert points["retrain"].probe_share == pytest.approx(1.0)
    assert ours.meets_both
    frontier.main([str(run), "--out", str(tmp_path / "out")])
    text = (tmp_path / "out" / "results.md").read_text()
    assert "Inside both targets: 1 of 1 points: `run` ours" in text  # retraining is the reference, not a point
    assert "share is 0.5 or more: -0.040 to -0.040 (1 points); retraining: +0.000 to +0.000" in text
    assert (tmp_path / "out" / "frontier.png").stat().st_size > 0


def test_the_frontier_refuses_a_folder_without_a_benchmark_run(frontier, tmp_path, capsys):
    with pytest.raises(SystemExit):
        frontier.main([str(tmp_path), "--out", str(tmp_path / "out")])
    assert "no results.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
