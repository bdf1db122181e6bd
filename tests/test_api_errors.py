"""Wrong arguments to the API fail at once with an ActmonError naming the argument, what it got
and what is allowed (also a TypeError / ValueError, as Python's own errors would be)."""

from __future__ import annotations

import logging
import re
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actmon
from actmon import ActmonError, ArgumentError, ConfigError


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _fn(x):
    return x


def _no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_watch_a_function():
    with pytest.raises(
        ArgumentError,
        match=r"watch\(model=...\): got the function '_fn'; a torch.nn.Module is allowed \(the"
        r" model whose layers are watched\); to watch a function's activations, call it inside"
        r" an nn.Module's forward",
    ) as info:
        actmon.watch(_fn)
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, ActmonError)


def test_watch_a_module_class_or_a_string():
    with pytest.raises(ArgumentError, match=r"got type .*; pass an instance, e.g. Linear\(...\)"):
        actmon.watch(nn.Linear)
    with pytest.raises(ArgumentError, match=r"watch\(model=...\): got str 'resnet'"):
        actmon.watch("resnet")


@pytest.mark.parametrize(
    ("optimizer", "where", "got"),
    [
        ("adam", "optimizer", "str 'adam'"),
        (3, "optimizer", "int 3"),
        ([None], "optimizer[0]", "NoneType None"),
    ],
)
def test_an_optimizer_that_is_not_one(optimizer, where, got):
    model = _model()
    threads = threading.active_count()
    with pytest.raises(
        ArgumentError,
        match=rf"watch\({re.escape(where)}=...\): got {got}; a torch.optim.Optimizer \(or a"
        r" framework's wrapper of one\), a list of them, or None is allowed",
    ) as info:
        actmon.watch(model, optimizer=optimizer)
    assert isinstance(info.value, TypeError)
    assert _no_hooks_left(model)
    assert threading.active_count() == threads


def test_a_list_of_optimizers_and_a_wrapper_are_allowed():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    class Wrapper:  # like Lightning's LightningOptimizer
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.optimizer = optimizer

    with actmon.watch(model, optimizer=[Wrapper(opt)], log_every=1) as monitor:
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        snap = monitor.step()
    assert snap.layers["0"].update_ratio is not None  # the wrapped optimizer's hooks fired


def test_config_of_the_wrong_type():
    with pytest.raises(
        ArgumentError,
        match=r"config: got int 3; a YAML file path \(str or os.PathLike\), a dict, an"
        r" actmon.Config or None is allowed",
    ) as info:
        actmon.watch(_model(), config=3)
    assert isinstance(info.value, TypeError)


def test_a_missing_actmon_config_file_names_the_variable(monkeypatch, tmp_path):
    missing = tmp_path / "nonexistent.yaml"
    monkeypatch.setenv("ACTMON_CONFIG", str(missing))
    with pytest.raises(
        ConfigError,
        match=rf"\$ACTMON_CONFIG='{missing}': config file '{missing}' does not exist \(point"
        r" \$ACTMON_CONFIG at an actmon YAML config, or unset it\)",
    ) as info:
        actmon.watch(_model())
    assert isinstance(info.value, ValueError)


def test_loss_fn_that_is_not_callable():
    with pytest.raises(
        ArgumentError,
        match=r"watch\(loss_fn=...\): got str 'ce'; a loss module \(e.g. nn.CrossEntropyLoss\(\)\),"
        r" a loss function \(e.g. F.cross_entropy\) or None is allowed",
    ):
        actmon.watch(_model(), loss_fn="ce")


def _double_softmax_alerts(loss_fn, softmax: bool) -> list[actmon.Alert]:
    model = nn.Sequential(_model(), nn.Softmax(dim=1)) if softmax else _model()
    with actmon.watch(model, loss_fn=loss_fn, log_every=2) as monitor:
        for _ in range(2):
            loss = loss_fn(model(torch.randn(8, 4)), torch.randint(0, 3, (8,)))
            loss.backward()
            monitor.step(loss=loss)
    assert _no_hooks_left(model)
    return [a for a in monitor.alerts if a.rule == "double_softmax"]


def test_a_loss_function_is_checked_on_the_model_output_like_the_loss_module():
    by_function = _double_softmax_alerts(F.cross_entropy, softmax=True)
    by_module = _double_softmax_alerts(nn.CrossEntropyLoss(), softmax=True)
    assert len(by_function) == 1
    assert by_function == by_module  # the same alert: metric, value, step and summary
    assert by_function[0].summary == (
        "CrossEntropyLoss receives softmax probabilities (rows >= 0 summing to 1); it expects"
        " logits"
    )
    assert _double_softmax_alerts(F.cross_entropy, softmax=False) == []


def test_an_unknown_loss_function_is_accepted_and_said_so(caplog):
    def my_loss(out, y):
        return F.cross_entropy(out, y)

    with caplog.at_level(logging.WARNING, logger="actmon"):
        alerts = _double_softmax_alerts(my_loss, softmax=True)
    assert "is not a loss the model checks know; its input is not checked" in caplog.text
    assert (
        "the function 'test_an_unknown_loss_function_is_accepted_and_said_so.<locals>.my_loss'"
        in caplog.text
    )
    # The structural check (a Softmax as the model's last layer) still runs.
    assert [a.metric for a in alerts] == ["last_layer_softmax"]
