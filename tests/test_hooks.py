"""The train loop's pieces (genllava_jax.hooks, metrics.Accumulator, flops.peak_flops) without a model; the loop
itself runs in test_genllava (resume), test_reliability (SIGTERM, kill -9, skipped steps) and test_multihost."""

import types

import jax
import jax.numpy as jnp
import pytest

from genllava_jax import flops, hooks
from genllava_jax.metrics import Accumulator


def test_accumulator_means_rates_and_step_times():
    acc = Accumulator()
    for loss in (1.0, 2.0, 6.0):
        acc.add({"loss": jnp.float32(loss), "tokens": jnp.int32(10), "images": jnp.int32(2),
                 "skipped": jnp.int32(0)})
    row = acc.flush()
    assert row["loss"] == 3.0 and "tokens" not in row and "skipped" not in row
    assert row["tokens_per_s"] > 0 and row["images_per_s"] == pytest.approx(row["tokens_per_s"] / 5)
    # three steps: two gaps between results (the first step, a compile in training, has none)
    assert 0 <= row["step_time_p50"] <= row["step_time_p90"] <= row["step_time_max"]
    acc.add({"loss": jnp.float32(4.0), "tokens": jnp.int32(1), "images": jnp.int32(0), "skipped": jnp.int32(0)})
    assert acc.flush()["loss"] == 4.0  # a new window


def test_peak_flops_by_device_kind():
    dev = lambda kind: types.SimpleNamespace(platform="tpu" if "TPU" in kind else "gpu", device_kind=kind)
    assert flops.peak_flops(dev("TPU v5 lite")) == 197e12  # v5e, not v5p
    assert flops.peak_flops(dev("TPU v5p")) == flops.peak_flops(dev("TPU v5")) == 459e12
    assert flops.peak_flops(dev("TPU v6 lite")) == 918e12 and flops.peak_flops(dev("TPU v4")) == 275e12
    assert flops.peak_flops(dev("NVIDIA H100 80GB HBM3")) == 989e12
    assert flops.peak_flops(dev("NVIDIA H100 PCIe")) == 756e12
    assert flops.peak_flops(dev("NVIDIA A100-SXM4-80GB")) == 312e12
    assert flops.peak_flops(dev("Some NPU")) is None
    cpu = flops.peak_flops(jax.devices()[0])  # measured: a float32 matmul on this host, shared by its devices
    assert 1e8 < cpu * len(jax.devices()) < 1e13


def _ticks(hook, steps, stop_at=None, state=None):
    hook.begin(steps[0] - 1)
    for step in steps:
        t = hooks.Tick(step, state, end=step == steps[-1], stop=step == stop_at)
        hook(t)
    hook.close()


def test_checkpoints_are_forced_at_the_final_step_and_on_preemption_only():
    calls = []
    _ticks(hooks.Checkpoint(lambda step, state, force: calls.append((step, force)), final_step=5), [1, 2, 3])
    assert calls == [(1, False), (2, False), (3, False)]  # ended early (stop_after): not forced
    calls.clear()
    _ticks(hooks.Checkpoint(lambda step, state, force: calls.append((step, force)), final_step=5), [4, 5])
    assert calls == [(4, False), (5, True)]
    calls.clear()
    _ticks(hooks.Checkpoint(lambda step, state, force: calls.append((step, force)), final_step=5), [1, 2],
           stop_at=2)
    assert calls == [(1, False), (2, True)]


def test_skip_limit_stops_the_run_with_the_newest_checkpoint():
    limit = hooks.SkipLimit(2, every=1, newest_checkpoint=lambda: 4)
    limit(hooks.Tick(5, {"skipped": jnp.int32(2)}, end=False))
    with pytest.raises(FloatingPointError, match=r"3 steps had a non-finite loss or gradient \(limit train."
                                                 r"max_skipped_steps=2\); stopping at step 6.*newest checkpoint is "
                                                 r"step 4"):
        limit(hooks.Tick(6, {"skipped": jnp.int32(3)}, end=False))


def test_profile_traces_the_chosen_steps(tmp_path):
    f = jax.jit(lambda x: x @ x / 64)
    x = jnp.ones((64, 64))
    messages = []
    profile = hooks.Profile((2, 3), tmp_path / "profile", messages.append)
    profile.begin(0)
    for step in range(1, 6):
        x = f(x)
        assert profile.running == (step in (2, 3)), step  # starts after step 1: steps 2 and 3 run inside it
        profile(hooks.Tick(step, x, end=step == 5))
    assert messages == [f"profile of steps 2..3: {tmp_path / 'profile'}"] and not profile.running
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))
    _ticks(hooks.Profile((), tmp_path / "none", messages.append), [1, 2])  # no steps: no trace
    assert not (tmp_path / "none").exists()
