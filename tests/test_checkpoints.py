"""Loading the checkpoint formats users have into their own network: lightning_forget.plugin.checkpoints."""

import re

import pytest
import torch
from app_models import TinyNet, Wrapped
from conftest import quiet_trainer, tiny_loader
from torch import nn

from lightning_forget.plugin.checkpoints import load_checkpoint


def trained_net() -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    return net


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda s: s, id="plain-state-dict"),
        pytest.param(lambda s: {"state_dict": s, "epoch": 3}, id="state_dict-key"),
        pytest.param(lambda s: {"model_state_dict": s, "optimizer_state_dict": {}}, id="model_state_dict-key"),
        pytest.param(lambda s: {"model": s, "step": 7}, id="model-key"),
        pytest.param(lambda s: {"state_dict": {f"net.{k}": v for k, v in s.items()}}, id="prefixed"),
        pytest.param(lambda s: {f"_orig_mod.{k}": v for k, v in s.items()}, id="torch-compile-prefix"),
    ],
)
def test_every_common_format_loads_into_a_fresh_network(tmp_path, wrap):
    source = trained_net()
    torch.save(wrap(source.state_dict()), tmp_path / "weights.pt")
    assert same_weights(load_checkpoint(TinyNet(), tmp_path / "weights.pt"), source)


def test_a_lightning_checkpoint_loads_whatever_the_module_calls_the_network(tmp_path):
    module = Wrapped()
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(module, tiny_loader(num_classes=4))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    net = load_checkpoint(TinyNet(), tmp_path / "model.ckpt")
    assert same_weights(net, module.backbone)
    assert same_weights(load_checkpoint(TinyNet(), tmp_path / "model.ckpt", key_prefix="backbone."), module.backbone)


def test_two_copies_of_the_network_need_the_prefix_named(tmp_path):
    source, other = trained_net(), TinyNet()
    state = {f"student.{k}": v for k, v in source.state_dict().items()}
    state |= {f"teacher.{k}": v for k, v in other.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "two.ckpt")
    with pytest.raises(ValueError, match=r"several prefixes \(student\., teacher\.\).*key_prefix='student\.'"):
        load_checkpoint(TinyNet(), tmp_path / "two.ckpt")
    assert same_weights(load_checkpoint(TinyNet(), tmp_path / "two.ckpt", key_prefix="student."), source)


def test_other_keys_are_listed_with_the_prefix_to_set(tmp_path):
    state = {f"encoder.{k}".replace("head", "classifier"): v for k, v in trained_net().state_dict().items()}
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(ValueError) as refused:
        load_checkpoint(TinyNet(), tmp_path / "renamed.pt")
    message = str(refused.value)
    assert "missing 9 of 9 (features.0.weight, features.0.bias," in message and "unexpected 9 (encoder." in message
    assert "start with encoder." in message and "original.key_prefix=encoder." in message
    expected = "missing 2 of 9 (head.weight, head.bias); unexpected 2 (classifier.weight, classifier.bias)"
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_checkpoint(TinyNet(), tmp_path / "renamed.pt", key_prefix="encoder.")


def test_other_shapes_name_the_tensors(tmp_path):
    torch.save(TinyNet(outputs=5).state_dict(), tmp_path / "five.pt")
    with pytest.raises(ValueError, match=r"other shapes \(head\.weight: \(5, 32\) there, \(10, 32\) in the model"):
        load_checkpoint(TinyNet(), tmp_path / "five.pt")


def test_non_finite_weights_are_refused_and_the_model_left_as_it_was(tmp_path):
    state = trained_net().state_dict()
    state["head.bias"][3] = float("nan")
    state["features.0.weight"][0, 0, 0, 0] = float("inf")
    torch.save(state, tmp_path / "nan.pt")
    net = TinyNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"NaN or infinite values in 2 tensors \(features\.0\.weight, head\.bias\)"):
        load_checkpoint(net, tmp_path / "nan.pt")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_files_that_need_unpickling_code_missing_files_and_non_weights_are_refused(tmp_path):
    torch.save(trained_net(), tmp_path / "module.pt")  # the whole module: loading it would run code
    with pytest.raises(ValueError, match=r"cannot be read with torch.load\(weights_only=True\).*state_dict\(\)"):
        load_checkpoint(TinyNet(), tmp_path / "module.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(TinyNet(), tmp_path / "missing.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(ValueError, match=r"holds no weights.*'epoch', 'lr'"):
        load_checkpoint(TinyNet(), tmp_path / "meta.pt")
