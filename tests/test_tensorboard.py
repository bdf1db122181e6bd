"""TensorBoard sink: event files read back with TensorBoard's own reader equal the Snapshots."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import actmon


def _read(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_scalars_and_histograms_read_back_equal_the_snapshots(tmp_path):
    log_dir = tmp_path / "tb"
    # Another writer in the same directory, as Lightning's TensorBoardLogger would be.
    other = SummaryWriter(str(log_dir))
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sinks = {"store": {"enabled": False}, "tensorboard": {"enabled": True, "log_dir": str(log_dir)}}
    with actmon.watch(model, optimizer=opt, log_every=3, sample_every=1, sinks=sinks) as monitor:
        for step in range(1, 7):
            loss = model(torch.randn(8, 6)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            monitor.step(loss=loss)
            other.add_scalar("train/loss", loss.item(), step)
    other.close()
    snaps = list(monitor.history)
    acc = _read(log_dir)
    tags = acc.Tags()
    assert "train/loss" in tags["scalars"]  # the other writer's data is intact
    assert [e.value for e in acc.Scalars("actmon.run/loss")] == pytest.approx(
        [s.loss for s in snaps], rel=1e-6
    )
    for name in (
        "dead_fraction",
        "mean",
        "std",
        "zero_fraction",
        "quantile_0.5",
        "output_grad_norm",
    ):
        events = acc.Scalars(f"actmon.{name}/1")
        assert [e.step for e in events] == [3, 6]
        expected = [s.layers["1"].metrics()[name] for s in snaps]
        assert [e.value for e in events] == pytest.approx(expected, rel=1e-6), name
    assert [e.value for e in acc.Scalars("actmon.grad_norm/0")] == pytest.approx(
        [s.layers["0"].grad_norm for s in snaps], rel=1e-6
    )
    hist = acc.Histograms("actmon.hist/0")
    assert [h.step for h in hist] == [3, 6]
    for event, snap in zip(hist, snaps, strict=True):
        layer = snap.layers["0"]
        value = event.histogram_value
        used = np.nonzero(layer.hist_counts)[0]
        lo, hi = used[0], used[-1] + 1
        np.testing.assert_allclose(value.bucket, layer.hist_counts[lo:hi])
        np.testing.assert_allclose(value.bucket_limit, layer.hist_edges[lo + 1 : hi + 1])
        assert value.num == layer.count
        assert value.min == pytest.approx(layer.min)
        assert value.max == pytest.approx(layer.max)


def test_alerts_are_written_as_text_summaries(tmp_path):
    from tests.test_monitor import NaNAt

    log_dir = tmp_path / "tb"
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), NaNAt(step=3), nn.Linear(8, 2))
    sinks = {"store": {"enabled": False}, "tensorboard": {"enabled": True, "log_dir": str(log_dir)}}
    with actmon.watch(model, log_every=3, sample_every=1, sinks=sinks) as monitor:
        active = []  # the monitor's own count of firing alerts after each window
        for _ in range(6):
            model(torch.randn(4, 6)).sum().backward()
            if monitor.step() is not None:
                active.append((monitor.step_count, float(len(monitor.active_alerts))))
    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    texts = [
        (e.step, e.tensor_proto.string_val[0].decode())
        for e in acc.Tensors("actmon.run/alerts/text_summary")
    ]
    expected = [(a.step, a.message()) for a in monitor.alerts]
    assert expected
    assert texts == expected
    # The alerts firing once each window's rules ran, as the monitor counts them.
    counts = [(e.step, e.value) for e in acc.Scalars("actmon.run/alerts_active")]
    assert counts == active
    assert active[0] == (3, 2.0)


def test_output_gradient_histograms_read_back_equal_plain_torch_binning(tmp_path):
    from actmon import histogram
    from tests.conftest import Capture, reference_raw_hist

    log_dir = tmp_path / "tb"
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    cap = Capture(model, ["1"], grads=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sinks = {"store": {"enabled": False}, "tensorboard": {"enabled": True, "log_dir": str(log_dir)}}
    with actmon.watch(
        model, opt, log_every=3, sample_every=1, sinks=sinks, gradients={"histogram": True}
    ) as monitor:
        for _ in range(3):
            model(torch.randn(8, 6)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            monitor.step()
    layer = monitor.snapshot().layers["1"]
    hc = monitor.config.histogram
    edges, want = histogram.symlog_view(
        reference_raw_hist(cap.grads["1"]), hc.min_exp, hc.max_exp, hc.bins_per_octave
    )
    np.testing.assert_array_equal(layer.output_grad_hist_counts, want)
    events = _read(log_dir).Histograms("actmon.grad_hist/1")
    assert [e.step for e in events] == [3]
    value = events[0].histogram_value
    used = np.nonzero(want)[0]
    lo, hi = used[0], used[-1] + 1
    np.testing.assert_allclose(value.bucket, want[lo:hi])
    np.testing.assert_allclose(value.bucket_limit, edges[lo + 1 : hi + 1])
    assert value.num == sum(g.numel() for g in cap.grads["1"])


def _group(tag: str) -> str:
    """TensorBoard's default tag grouping: the tag up to its first '/'."""
    return tag.split("/", 1)[0]


def test_tags_group_one_card_per_layer_under_each_metric_and_the_run_values_apart(tmp_path):
    log_dir = tmp_path / "tb"
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sinks = {"store": {"enabled": False}, "tensorboard": {"enabled": True, "log_dir": str(log_dir)}}
    with actmon.watch(model, optimizer=opt, log_every=2, sample_every=1, sinks=sinks) as monitor:
        for _ in range(4):
            loss = model(torch.randn(8, 6)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            monitor.step(loss=loss)
    snap = monitor.history[-1]
    tags = _read(log_dir).Tags()
    groups: dict[str, set[str]] = {}
    for tag in tags["scalars"]:
        groups.setdefault(_group(tag), set()).add(tag.split("/", 1)[1])
    # Run-level values in one group of their own, named after the run-level metric.
    assert groups.pop("actmon.run") == set(snap.run_metrics()) | {"alerts_active"}
    # Every other group is one metric, holding one card per layer that has it.
    expected: dict[str, set[str]] = {}
    for layer in snap.layers.values():
        for metric in layer.metrics():
            expected.setdefault(f"actmon.{metric}", set()).add(layer.name)
    assert groups == expected
    assert groups["actmon.dead_fraction"] == {"1"}
    assert groups["actmon.saturation_fraction"] == {"3"}
    assert groups["actmon.mean"] == {"0", "1", "2", "3", "4"}
    hist_groups: dict[str, set[str]] = {}
    for tag in tags["histograms"]:
        hist_groups.setdefault(_group(tag), set()).add(tag.split("/", 1)[1])
    assert hist_groups == {"actmon.hist": {"0", "1", "2", "3", "4"}}
