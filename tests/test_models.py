"""Real model code under the monitor: conv + BN + inplace ReLU, Hugging Face GPT-2, bf16."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import actmon
from tests.conftest import Capture, reference_stats


def conv_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


def test_conv_bn_inplace_relu_reads_bn_output_before_the_relu_overwrites_it():
    model = conv_net()
    # Our reference hooks are registered first, so they clone BN's output before the ReLU.
    cap = Capture(model, ["1", "2", "5", "6"], grads=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = actmon.watch(model, optimizer=opt, log_every=3, sample_every=1, strict=True)
    for _ in range(3):
        x, y = torch.randn(4, 3, 12, 12), torch.randint(0, 5, (4,))
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        monitor.step()
    monitor.close()
    snap = monitor.snapshot()
    bn, relu = snap.layers["1"], snap.layers["2"]
    ref_bn = reference_stats(cap.outputs["1"], unit_axis=1)
    ref_relu = reference_stats(cap.outputs["2"], unit_axis=1)
    assert bn.min == ref_bn["min"] < 0  # an inplace ReLU must not turn this into 0
    assert bn.mean == pytest.approx(ref_bn["mean"], abs=1e-6)
    assert bn.std == pytest.approx(ref_bn["std"], rel=1e-5)
    assert relu.min == 0.0
    assert relu.zero_fraction == ref_relu["zeros"] / ref_relu["count"]
    assert relu.units == 8
    assert relu.dead_units == ref_relu["dead_units"]
    # The output gradient of BN is the gradient before the ReLU's mask, and differs from it.
    bn_sq = [float(g.double().pow(2).sum()) for g in cap.grads["1"]]
    relu_sq = [float(g.double().pow(2).sum()) for g in cap.grads["2"]]
    assert bn.output_grad_norm == pytest.approx((sum(bn_sq) / 3) ** 0.5, rel=1e-5)
    assert relu.output_grad_norm == pytest.approx((sum(relu_sq) / 3) ** 0.5, rel=1e-5)
    assert monitor.internal_errors_total == 0


def make_tiny_gpt2() -> nn.Module:
    """A 2-layer GPT-2 built from a config (no download): width 32, vocabulary 100."""
    transformers = pytest.importorskip("transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=100,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


@pytest.fixture
def tiny_gpt2() -> nn.Module:
    return make_tiny_gpt2()


def test_hugging_face_gpt2_trains_under_the_monitor(tiny_gpt2):
    model = tiny_gpt2
    cap = Capture(model, ["transformer.h.0.mlp.act", "transformer.h.1.mlp.c_fc"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = actmon.watch(model, optimizer=opt, log_every=3, sample_every=1, strict=True)
    for _ in range(3):
        ids = torch.randint(0, 100, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        monitor.step()
    monitor.close()
    kinds = {info.name: info for info in monitor.layers}
    assert kinds["transformer.h.0.mlp.act"].kind is actmon.Kind.SMOOTH_GATED
    assert kinds["transformer.h.0.ln_1"].kind is actmon.Kind.NORM
    assert kinds["transformer.h.0.attn.c_attn"].kind is actmon.Kind.LINEAR
    assert (
        kinds["transformer.h.1.mlp.c_fc"].unit_axis,
        kinds["transformer.h.1.mlp.c_fc"].units,
    ) == (-1, 128)
    snap = monitor.snapshot()
    act = snap.layers["transformer.h.0.mlp.act"]
    ref = reference_stats(cap.outputs["transformer.h.0.mlp.act"], unit_axis=-1)
    assert act.count == ref["count"] == 3 * 2 * 16 * 128
    assert act.mean == pytest.approx(ref["mean"], rel=1e-5)
    assert act.min == ref["min"]
    assert act.max == ref["max"]
    assert act.dormant_fraction == ref["dead_units"] / 128
    assert act.dead_fraction is None
    fc = snap.layers["transformer.h.1.mlp.c_fc"]
    assert fc.std == pytest.approx(
        reference_stats(cap.outputs["transformer.h.1.mlp.c_fc"])["std"], rel=1e-5
    )
    assert snap.params["transformer.wte.weight"].grad_norm > 0
    assert monitor.internal_errors_total == 0
    # Every leaf that ran was summarised; SDPA attention never calls the attn_dropout module.
    missing = {info.name for info in monitor.layers} - set(snap.layers)
    assert missing <= {"transformer.h.0.attn.attn_dropout", "transformer.h.1.attn.attn_dropout"}


def test_bf16_autocast_on_cpu_accumulates_in_float32():
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    cap = Capture(model, ["0", "1"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = actmon.watch(model, optimizer=opt, log_every=4, sample_every=1, strict=True)
    for _ in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.randn(32, 16))
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        monitor.step()
    monitor.close()
    assert cap.outputs["0"][0].dtype == torch.bfloat16
    snap = monitor.snapshot()
    for name in ("0", "1"):
        ref = reference_stats(cap.outputs[name], unit_axis=-1)
        got = snap.layers[name]
        assert got.count == ref["count"]
        assert got.mean == pytest.approx(ref["mean"], rel=1e-5)  # float32 sums of bf16 values
        assert got.std == pytest.approx(ref["std"], rel=1e-5)
        assert got.max == ref["max"]
        assert got.zero_fraction == ref["zeros"] / ref["count"]
