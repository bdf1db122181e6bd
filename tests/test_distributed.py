"""torch.distributed: two gloo processes on 127.0.0.1 (tests/dist_worker.py, launched once per
module) checked against references computed here: the single-process monitor over every rank's
batches (counts and histograms exactly equal) and plain torch norms of the gradients."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from prometheus_client.parser import text_string_to_metric_families

import actmon
from actmon.errors import ConfigError
from actmon.sinks.paths import rank_path
from actmon.sinks.prometheus import free_port
from actmon.store import RunStore
from tests import dist_worker as W
from tests.helpers import Server, http_get, start_pushgateway

ROOT = Path(__file__).resolve().parents[1]

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server | None]:
    if shutil.which("prometheus-pushgateway") is None:
        yield None
        return
    server = start_pushgateway(tmp_path_factory.mktemp("gateway"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ranks(
    tmp_path_factory: pytest.TempPathFactory, gateway: Server | None
) -> tuple[Path, list[dict[str, Any]]]:
    """Run every scenario once on two ranks; (their working directory, each rank's results)."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("ranks")
    env = dict(os.environ)
    env.pop("ACTMON_CONFIG", None)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(W.WORLD),
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    args = [sys.executable, str(ROOT / "tests" / "dist_worker.py"), str(out)]
    if gateway is not None:
        args.append(gateway.url)
    procs, logs = [], []
    for rank in range(W.WORLD):
        log = open(out / f"log{rank}.txt", "wb")  # noqa: SIM115 (closed below)
        logs.append(log)
        procs.append(
            subprocess.Popen(
                args,
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                cwd=out,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        for proc in procs:
            proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        for log in logs:
            log.flush()
        tails = [(out / f"log{r}.txt").read_text(errors="replace")[-3000:] for r in range(W.WORLD)]
        pytest.fail("the ranks did not finish in 240 s; their output:\n" + "\n---\n".join(tails))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    for rank, proc in enumerate(procs):
        text = (out / f"log{rank}.txt").read_text(errors="replace")
        assert proc.returncode == 0, f"rank {rank} exited with {proc.returncode}:\n{text[-4000:]}"
    results = []
    for rank in range(W.WORLD):
        with open(out / f"rank{rank}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return out, results


def scenario(ranks: tuple[Path, list[dict[str, Any]]], name: str) -> list[dict[str, Any]]:
    per_rank = [results[name] for results in ranks[1]]
    for rank, result in enumerate(per_rank):
        if "error" in result:
            pytest.fail(f"rank {rank} failed in scenario {name!r}:\n{result['error']}")
        if "skipped" in result:
            pytest.skip(result["skipped"])
    return per_rank


def single_process() -> list[actmon.Snapshot]:
    """The same training in one process: each step runs every rank's batch (one call each, so
    each call's output gradient is the one its rank computes) and passes the ranks' mean loss."""
    model = W.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = [W.rank_batches(rank) for rank in range(W.WORLD)]
    snapshots = []
    with actmon.watch(
        model, opt, run_name="single", log_every=W.LOG_EVERY, sample_every=1, sinks=W.QUIET
    ) as mon:
        for step in range(W.STEPS):
            losses = [W.loss_of(model(batches[rank][step])) for rank in range(W.WORLD)]
            sum(losses).backward()  # type: ignore[union-attr]
            opt.step()
            opt.zero_grad()
            snap = mon.step(loss=torch.stack(losses).mean())
            if snap is not None:
                snapshots.append(snap)
    return snapshots


def relu_outputs(rank: int, steps: range) -> list[torch.Tensor]:
    model = W.make_model()
    with torch.no_grad():
        return [model[1](model[0](W.rank_batches(rank)[s])) for s in steps]


# ---- reduce mode --------------------------------------------------------------------------


@needs_gloo
def test_reduced_window_equals_a_single_process_run_over_every_ranks_batches(ranks):
    reduced = scenario(ranks, "reduce")[0]["snapshots"]
    single = single_process()
    assert [s.window for s in reduced] == [s.window for s in single] == [(1, 3), (4, 6)]
    for got, want in zip(reduced, single, strict=True):
        names = ["0", "1", "2", "3", "4", "5"]  # no "module." of the DDP wrapper
        assert list(got.layers) == list(want.layers) == names
        for name, a in got.layers.items():
            b = want.layers[name]
            exact = ("count", "calls", "min", "max", "zero_fraction", "nan_count", "posinf_count")
            exact += ("neginf_count", "dead_units", "dead_fraction", "dormant_fraction")
            exact += ("saturation_fraction", "quantiles", "units")
            for field in exact:
                assert getattr(a, field) == getattr(b, field), (name, field)
            np.testing.assert_array_equal(a.hist_counts, b.hist_counts)
            np.testing.assert_array_equal(a.hist_edges, b.hist_edges)
            close = ("mean", "std", "softmax_max_prob", "softmax_entropy", "output_grad_norm")
            close += ("output_grad_abs_max", "weight_norm")
            for field in close:
                want_value = getattr(b, field)
                if want_value is None:
                    assert getattr(a, field) is None, field
                else:
                    assert getattr(a, field) == pytest.approx(want_value, rel=1e-6), field
            # DDP averages the ranks' gradients; the single process sums them.
            if b.grad_norm is None:  # a layer without parameters
                assert a.grad_norm is None
            else:
                assert a.grad_norm == pytest.approx(b.grad_norm / W.WORLD, rel=1e-5)
        assert got.loss == pytest.approx(want.loss, rel=1e-6)
        assert got.grad_norm_total == pytest.approx(want.grad_norm_total / W.WORLD, rel=1e-5)
        assert got.first_nonfinite is None
        assert got.layers["3"].saturation_fraction > 0  # the comparison covers saturation too
    assert reduced[0].layers["1"].calls == W.WORLD * W.LOG_EVERY  # every rank's calls


@needs_gloo
def test_unit_dead_on_one_rank_only_is_not_dead_per_batch_share_over_rank_batches(ranks):
    reduced = scenario(ranks, "reduce")[0]["snapshots"][0]
    window = range(W.LOG_EVERY)
    outputs = {rank: relu_outputs(rank, window) for rank in range(W.WORLD)}
    assert bool((torch.cat(outputs[0])[:, 0] == 0).all())  # unit 0: dead on rank 0's data ...
    assert bool((torch.cat(outputs[1])[:, 0] > 0).any())  # ... and alive on rank 1's
    never = torch.cat([h for hs in outputs.values() for h in hs]).amax(0) <= 0
    assert never.nonzero().flatten().tolist() == [1]  # only unit 1 is dead everywhere
    relu = reduced.layers["1"]
    assert (relu.dead_units, relu.dead_fraction) == (1, 1 / 16)
    # dead_fraction_batch: the mean over every rank's batches of the share dead in that batch.
    shares = [float((h.amax(0) <= 0).float().mean()) for hs in outputs.values() for h in hs]
    assert relu.dead_fraction_batch == pytest.approx(np.mean(shares))


@needs_gloo
def test_every_rank_gets_the_same_snapshots_and_only_rank_0_exports(ranks):
    out, _ = ranks
    results = scenario(ranks, "reduce")
    for a, b in zip(results[0]["snapshots"], results[1]["snapshots"], strict=True):
        assert a.run_metrics() == b.run_metrics()
        assert {n: la.metrics() for n, la in a.layers.items()} == {
            n: lb.metrics() for n, lb in b.layers.items()
        }
        assert a.rank is None
        assert b.rank is None
    assert (results[0]["sinks"], results[1]["sinks"]) == (["store"], [])
    with RunStore(out / "runs" / "reduce" / "actmon.db") as store:
        assert [w.step for w in store.windows()] == [3, 6]


@needs_gloo
def test_collectives_per_window_are_constant_and_none_between_flushes(ranks):
    reduce, deep = scenario(ranks, "reduce"), scenario(ranks, "deep")
    assert deep[0]["layers"] == 24
    for result in (*reduce, *deep):  # 6 and 24 layers; sampled and unsampled steps
        assert result["collectives"] == [0, 0, 3, 0, 0, 3]


@needs_gloo
def test_ddp_parameter_norms_are_norms_of_the_averaged_gradients(ranks):
    for result in scenario(ranks, "reduce"):
        averaged = result["averaged"]  # per step: plain norms of DDP's averaged gradients
        for k, snap in enumerate(result["snapshots"]):
            steps = averaged[k * W.LOG_EVERY : (k + 1) * W.LOG_EVERY]
            for name, stats in snap.params.items():
                rms = math.sqrt(np.mean([step[name] ** 2 for step in steps]))
                assert stats.grad_norm == pytest.approx(rms, rel=1e-5), name
            totals = [math.sqrt(sum(v**2 for v in step.values())) for step in steps]
            assert snap.grad_norms_total == pytest.approx(totals, rel=1e-5)
    # Without an optimizer the norms are taken at the end of backward: after DDP's all-reduce.
    for result in scenario(ranks, "no_optimizer"):
        for snap, averaged, own in zip(
            result["snapshots"], result["averaged"], result["own"], strict=True
        ):
            assert {n: p.grad_norm for n, p in snap.params.items()} == pytest.approx(
                averaged, rel=1e-5
            )
            assert averaged != pytest.approx(own, rel=1e-3)  # the rank's own gradients differ


@needs_gloo
def test_first_nonfinite_is_the_earliest_layer_over_every_rank(ranks):
    for result in scenario(ranks, "nonfinite"):
        snap = result["snapshot"]
        # Rank 0's first offender is "2" (its Scale turned NaN), rank 1's is "0" (a NaN input).
        assert snap.first_nonfinite == actmon.NonFinite(2, "activation", "0", 2)
        assert snap.layers["0"].nan_count == 4  # rank 1's NaN row
        assert snap.layers["2"].nan_count == 3 * 4 + 4  # all of rank 0's batch, rank 1's row


@needs_gloo
def test_units_discovered_on_one_rank_or_in_another_order_are_laid_out_alike(ranks):
    results = scenario(ranks, "uneven")
    offsets = [result["offsets"] for result in results]
    assert offsets[0] != offsets[1]  # the branch's units sit elsewhere in each rank's buffer
    model = W.Branchy()
    for window, (a, b) in enumerate(
        zip(results[0]["snapshots"], results[1]["snapshots"], strict=True)
    ):
        assert {n: la.metrics() for n, la in a.layers.items()} == {
            n: lb.metrics() for n, lb in b.layers.items()
        }
        seen: dict[str, list[torch.Tensor]] = {"act": [], "branch.1": [], "act2": []}
        with torch.no_grad():  # the forward again, in plain torch, per rank and step
            for rank in range(W.WORLD):
                for step in range(window * W.LOG_EVERY, (window + 1) * W.LOG_EVERY):
                    h = model.act(model.inp(W.branch_inputs(rank)[step]))
                    seen["act"].append(h)
                    if rank == 1 or window > 0:
                        seen["branch.1"].append(model.branch(h))
                        h = h + seen["branch.1"][-1].sum(-1, keepdim=True)
                    seen["act2"].append(model.act2(model.out(h)))
        for name, outputs in seen.items():
            joined = torch.cat(outputs)
            assert a.layers[name].count == joined.numel(), (window, name)
            assert a.layers[name].dead_units == int((joined.amax(0) <= 0).sum()), (window, name)
        assert a.layers["branch.1"].dead_units == 2
    # One more collective per window to agree on the layout; still not one per layer.
    for result in results:
        assert result["collectives"] == [0, 0, 4, 0, 0, 4]


@needs_gloo
def test_ranks_that_disagree_all_raise_at_the_flush(ranks):
    for result in scenario(ranks, "mismatch"):
        assert "linear bins range from 8 to 16 over the ranks" in result["raised"]


# ---- per-rank mode ------------------------------------------------------------------------


@needs_gloo
def test_per_rank_mode_exports_each_ranks_own_view(ranks):
    out, _ = ranks
    results = scenario(ranks, "per_rank")
    run = results[0]["run"]
    assert results[1]["run"] == run  # rank 0's default run name, broadcast at watch()
    for rank, result in enumerate(results):
        snap = result["snapshot"]
        assert snap.rank == rank
        assert result["sinks"] == ["prometheus", "store", "tensorboard"]
        relu = snap.layers["1"]
        assert relu.dead_units == (2 if rank == 0 else 1)  # rank 0 alone sees unit 0 dead
        with RunStore(out / "runs" / run / f"rank{rank}" / "actmon.db") as store:
            assert store.series("dead_fraction", "1") == [(3, relu.dead_fraction)]
        events = list((out / "runs" / run / "tensorboard" / f"rank{rank}").glob("events.*"))
        assert len(events) == 1
        samples = [
            s for f in text_string_to_metric_families(result["exposition"]) for s in f.samples
        ]
        assert samples
        assert {s.labels.get("rank") for s in samples} == {str(rank)}
        dead = [
            s.value
            for s in samples
            if s.name == "actmon_dead_fraction" and s.labels["layer"] == "1"
        ]
        assert dead == [relu.dead_fraction]


@needs_gloo
def test_per_rank_pushgateway_groups_by_rank(ranks, gateway):
    scenario(ranks, "per_rank")
    if gateway is None:
        pytest.skip("prometheus-pushgateway is not installed (Debian package)")
    groups = json.loads(http_get(f"{gateway.url}/api/v1/metrics"))["data"]
    pushed = {
        group["labels"].get("rank")
        for group in groups
        if group["labels"].get("run") == "pushed" and group["labels"]["job"] == "actmon"
    }
    assert pushed == {"0", "1"}


# ---- FSDP ---------------------------------------------------------------------------------


@needs_gloo
def test_fsdp_sharded_parameter_norms_are_global_norms(ranks):
    results = scenario(ranks, "fsdp")
    shapes = [result["local_shapes"] for result in results]
    assert shapes[0]["0.weight"][0] + shapes[1]["0.weight"][0] == 16  # really sharded: dim 0
    assert shapes[0]["2.weight"][0] + shapes[1]["2.weight"][0] == 5
    for result in results:
        for k, snap in enumerate(result["snapshots"]):  # one step per window
            grads, before, after = result["grads"][k], result["before"][k], result["after"][k]
            for name, stats in snap.params.items():
                assert stats.grad_norm == pytest.approx(float(grads[name].norm()), rel=1e-5)
                assert stats.weight_norm == pytest.approx(float(before[name].norm()), rel=1e-5)
                update = float((after[name] - before[name]).norm() / before[name].norm())
                assert stats.update_ratio == pytest.approx(update, rel=1e-4)
            total = math.sqrt(sum(float(g.norm()) ** 2 for g in grads.values()))
            assert snap.grad_norm_total == pytest.approx(total, rel=1e-5)
            layer = math.sqrt(
                float(grads["0.weight"].norm()) ** 2 + float(grads["0.bias"].norm()) ** 2
            )
            assert snap.layers["0"].grad_norm == pytest.approx(layer, rel=1e-5)
        no_opt = result["no_opt"]
        for name, grad in result["no_opt_grads"].items():
            assert no_opt.params[name].grad_norm == pytest.approx(float(grad.norm()), rel=1e-5)


# ---- single process -----------------------------------------------------------------------


def test_distributed_option_is_validated():
    with pytest.raises(
        ConfigError, match=r"field 'distributed': got 'sum'; Input should be 'reduce' or 'per_rank'"
    ):
        actmon.load_config(distributed="sum")


def test_process_group_without_an_initialised_group_is_an_error():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match=r"process_group=.*not initialised.*init_process_group"):
        actmon.watch(model, process_group=object(), sinks=W.QUIET)


def test_without_a_process_group_distributed_is_ignored():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    with actmon.watch(model, run_name="solo", distributed="per_rank", log_every=1) as mon:
        model(torch.randn(2, 3))
        snap = mon.step()
    assert snap is not None
    assert snap.rank is None
    assert Path("runs/solo/actmon.db").exists()


def test_rank_paths_never_collide():
    assert rank_path("runs/{run}/actmon.db", "r", None, directory=False) == "runs/r/actmon.db"
    assert rank_path("runs/{run}/actmon.db", "r", 1, directory=False) == "runs/r/rank1/actmon.db"
    assert rank_path("runs/{run}/tb", "r", 2, directory=True) == "runs/r/tb/rank2"
    assert rank_path("runs/{run}/{rank}.db", "r", 3, directory=False) == "runs/r/3.db"
