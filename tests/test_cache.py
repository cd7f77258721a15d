"""The model cache: concurrent writers never see or leave half-written files; a broken file is ignored."""

import logging
from concurrent.futures import ThreadPoolExecutor

import torch
from conftest import quiet_trainer, tiny_loader, tiny_net
from torch.utils.data import Subset

from lightning_forget.app.cache import ModelCache
from lightning_forget.app.pipeline import compare
from lightning_forget.methods import ForgettingTask, Recipe, Retrain

KEY = {"dataset": "digits", "seed": 0, "trainer": {"precision": "32-true"}}


def test_concurrent_writers_of_one_key_leave_one_whole_file_and_no_temporary(tmp_path):
    cache = ModelCache(tmp_path)
    nets = [tiny_net() for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda net: cache.save(KEY, net, 1.5, prefix="original"), nets))
    assert len(set(paths)) == 1 and [p.name for p in tmp_path.iterdir()] == [paths[0].name]
    loaded = tiny_net()
    assert cache.load(KEY, loaded, prefix="original") == 1.5
    weights = loaded.state_dict().values()
    assert any(all(torch.equal(a, b) for a, b in zip(weights, n.state_dict().values())) for n in nets)


def test_a_corrupt_or_foreign_cached_file_is_ignored_with_a_warning(tmp_path, caplog):
    cache = ModelCache(tmp_path)
    path = cache.save(KEY, tiny_net(), 2.0, prefix="original")
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by a full disk
    with caplog.at_level(logging.WARNING, logger="lightning_forget.app.cache"):
        assert cache.load(KEY, tiny_net(), prefix="original") is None
    assert "Ignoring the cached model" in caplog.text
    other = cache.save({**KEY, "seed": 1}, tiny_net(), 2.0, prefix="original")
    other.rename(path)  # a file whose stored key is another run's
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lightning_forget.app.cache"):
        assert cache.load(KEY, tiny_net(), prefix="original") is None
    assert "its key differs" in caplog.text


def test_every_setting_that_shapes_the_model_is_in_the_file_name(tmp_path):
    cache = ModelCache(tmp_path)
    changed = [{**KEY, "trainer": {**KEY["trainer"], k: v}} for k, v in [("limit_train_batches", 1), ("max_steps", 5)]]
    names = {cache.path(key).name for key in [KEY, *changed]}
    assert len(names) == 3


def test_a_few_shot_retrain_is_cached_per_draw_of_the_few_samples(tmp_path):
    data = tiny_loader(n_per_class=6).dataset
    cache = ModelCache(tmp_path)

    def run(indices: list[int]) -> None:
        task = ForgettingTask(tiny_net(), tiny_net, data, Subset(data, indices), [1], 4, Recipe(epochs=1, batch_size=8))
        compare(task, {"retrain_few": Retrain("few_shot")}, lambda _: quiet_trainer,
                lambda _: {"forget_acc": 0.0, "retain_acc": 1.0}, seed=0, original_seconds=1.0,
                cache=cache, cache_key=KEY)  # fmt: skip

    run(list(range(0, 24, 2)))
    run(list(range(1, 24, 2)))  # other samples (shots or seed changed): not the first model
    run(list(range(0, 24, 2)))
    assert len(list(tmp_path.glob("retrain_few-*.pt"))) == 2
