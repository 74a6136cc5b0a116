"""The TPU fit check (launch/aot.py): FLOP counting, the batch search, and a real compile for a v5e:2x2 slice on
this CPU through libtpu (`make install` puts it in .venv/libtpu-aot; the test fails, never skips, without it)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from genllava_jax import flops
from launch import aot


def tiny_config(**mesh):
    c = aot.configure(tiny.get_config(), mesh=mesh or dict(data=1, fsdp=-1, tensor=1))
    c.model.llm.vocab_size = 1024  # no tokenizer directory in CI: the stand-in vocabulary
    c.data.tokenizer = ""
    return c


def test_program_flops_counts_scan_bodies_once_or_by_trip_count():
    def f(ws, x):
        return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0]

    ws, x = jax.ShapeDtypeStruct((5, 16, 16), jnp.float32), jax.ShapeDtypeStruct((4, 16), jnp.float32)
    assert flops.program_flops(f, ws, x) == 5 * 2 * 4 * 16 * 16
    assert flops.program_flops(f, ws, x, scale_loops=False) == 2 * 4 * 16 * 16
    # a 3x3 convolution, 8 -> 6 channels, 10x10 output: 2 * 100 * 6 * 9 * 8
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert flops.program_flops(conv, jax.ShapeDtypeStruct((1, 10, 10, 8), jnp.float32),
                               jax.ShapeDtypeStruct((3, 3, 8, 6), jnp.float32)) == 2 * 100 * 6 * 9 * 8


@pytest.mark.slow
def test_analytic_count_matches_the_traced_train_step():
    """6·N·tokens + attention (and the per-part forwards) equal the matmul FLOPs of the traced step; full remat
    adds up to one forward of the LLM and UNet on top."""
    program = {}
    for remat in ("none", "full"):
        c = aot.configure(tiny_config(), remat=remat)
        state, s, cfg, model = aot.abstract_setup(c, aot.build_mesh(dict(data=1), jax.devices()[:1]))
        batch = aot.abstract_batch(c, cfg, s, 4)
        program[remat] = flops.program_flops(aot.train.jit_train_step(s), state, s.frozen, batch)
    parts = flops.analytic(model, cfg, rows=4, seq_len=c.data.max_len, target_px=c.data.target_image_size,
                           trainable=set(state["params"].keys()))
    assert set(parts) == {"llm", "vision", "projector", "head", "unet", "vae"}
    assert sum(parts.values()) == pytest.approx(program["none"], rel=0.02)
    forward = parts["llm"] / 3 + parts["unet"] / 2  # trainable: 3 passes; frozen, gradient through: 2
    assert 0.3 * forward < program["full"] - program["none"] <= forward  # less what the backward does not need


def test_topology_names_give_the_slices_chips():
    for name, n, kind in [("v5p-8", 4, "TPU v5"), ("v4-8", 4, "TPU v4"), ("v5e-16", 16, "TPU v5 lite"),
                          ("v5e:2x2", 4, "TPU v5 lite")]:
        devices = aot.target_devices(name)
        assert (len(devices), devices[0].device_kind) == (n, kind), name
    with pytest.raises(ValueError, match="v5p-8"):
        aot.target_devices("tpu-8")


def test_over_hbm_is_reported_as_oom_with_xla_numbers():
    device = aot.target_devices("v5e:2x2")[0]
    big = jax.ShapeDtypeStruct((6 * 2 ** 30,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device))
    r, _ = aot.compile_report(jax.jit(lambda x: x * 2), (big,), 16 * aot.GiB)
    assert not r["fits"]
    assert r["total"] >= 2 * 24 * aot.GiB * 0.99  # input and output, 24 GiB each
    assert 14 * aot.GiB < r["hbm_xla"] <= 16 * aot.GiB


def test_largest_batch_follows_the_memory_line(monkeypatch):
    """Memory 3 + 2·b GiB on a 16 GiB chip: the largest batch is 6, found from batches 1, 2 and the prediction."""
    tried = []

    def fake_check(c, devices, *, per_device_batch, **kw):
        tried.append(per_device_batch)
        total = (3 + 2 * per_device_batch) * aot.GiB
        return {"global_batch": 4 * per_device_batch,
                "train": {"total": total, "fits": total <= 16 * aot.GiB, "hbm": 16 * aot.GiB, "compile_s": 0.0}}

    monkeypatch.setattr(aot, "check", fake_check)
    b, oom, r = aot.largest_batch(None, [None] * 4, log=lambda s: None)
    assert (b, oom, r["global_batch"]) == (6, None, 24)
    assert tried == [1, 2, 6]
    rows = [{"mesh": dict(data=1, fsdp=4, tensor=1), "remat": "full", "per_device_batch": 6, "global_batch": 24},
            {"mesh": dict(data=1, fsdp=4, tensor=1), "remat": "dots_saveable", "per_device_batch": 6,
             "global_batch": 24},
            {"mesh": dict(data=1, fsdp=2, tensor=2), "remat": "none", "per_device_batch": 0, "global_batch": 0}]
    assert aot.best_row(rows)["remat"] == "dots_saveable"  # same batch, less recompute


def test_remat_flags_take_named_policies_per_part():
    assert aot.parse_remat("save_dots_except_mlp") == {"llm": "save_dots_except_mlp", "unet": "save_dots_except_mlp"}
    assert aot.parse_remat("llm=save:q_proj,mlp_in;vision=offload_layer_input") == {
        "llm": "save:q_proj,mlp_in", "vision": "offload_layer_input"}
    c = aot.configure(tiny_config(), remat="llm=offload_dots_except_mlp;head=full")
    assert (c.model.llm.remat, c.model.head.remat, c.model.unet.get("remat", "none")) == (
        "offload_dots_except_mlp", "full", "none")
    assert aot.parse_remats("full,save_qkv_proj") == ["full", "save_qkv_proj"]
    assert aot.parse_remats("full;save:q_proj,k_proj") == ["full", "save:q_proj,k_proj"]
    for bad, msg in [("fulll", "unknown remat policy 'fulll'"), ("llm=full;decoder=full", "'decoder=full' is not")]:
        with pytest.raises(ValueError, match=msg):
            aot.parse_remat(bad)
    rows = [{"mesh": dict(tensor=1), "remat": r, "per_device_batch": 2, "global_batch": 8}
            for r in ("full", "save:mlp_in", "save_dots_except_mlp")]
    assert aot.best_row(rows)["remat"] == "save_dots_except_mlp"  # a name list ranks after the known policies


def test_largest_batch_bisects_where_memory_bends(monkeypatch):
    """Memory 1 + b²/100 GiB: the line from batches 1, 2 overshoots far; bisection then closes in on 38."""
    tried = []

    def fake_check(c, devices, *, per_device_batch, **kw):
        tried.append(per_device_batch)
        total = (1 + per_device_batch ** 2 / 100) * aot.GiB
        return {"global_batch": per_device_batch,
                "train": {"total": total, "fits": total <= 16 * aot.GiB, "hbm": 16 * aot.GiB, "compile_s": 0.0}}

    monkeypatch.setattr(aot, "check", fake_check)
    b, oom, _ = aot.largest_batch(None, [None], log=lambda s: None, max_compiles=12)
    assert (b, oom) == (38, 39) and len(tried) <= 12
    b, oom, _ = aot.largest_batch(None, [None], log=lambda s: None, max_compiles=5)
    assert b <= 38 < oom and b > 2  # stopped early: an honest bracket, not a guess


def test_search_tries_the_meshes_given_and_parse_mesh_names_a_bad_axis(monkeypatch):
    assert aot.parse_mesh("fsdp=8,tensor=2") == {"data": 1, "fsdp": 8, "tensor": 2}
    assert aot.parse_mesh("data=2,fsdp=-1") == {"data": 2, "fsdp": -1, "tensor": 1}
    for bad in ["fsdp:8", "model=2", "fsdp=x"]:
        with pytest.raises(ValueError, match="is not AXIS=SIZE"):
            aot.parse_mesh(bad)
    tried = []
    monkeypatch.setattr(aot, "largest_batch", lambda c, devices, log, simulate: (
        tried.append((dict(c.mesh), c.model.llm.remat)) or (0, 1, None)))
    rows = aot.search(tiny_config(), [None] * 16, ["full"], [aot.parse_mesh("fsdp=16")], log=lambda s: None)
    assert tried == [({"data": 1, "fsdp": 16, "tensor": 1}, "full")] and rows[0]["per_device_batch"] == 0
    tried.clear()
    aot.search(tiny_config(), [None] * 16, ["full", "none"], log=lambda s: None)  # default: mesh_candidates(16)
    assert len(tried) == 2 * len(aot.mesh_candidates(16)) == 8


@pytest.mark.slow
def test_fit_check_compiles_the_tiny_model_for_v5e_2x2():
    c = tiny_config()
    r = aot.check(c, aot.target_devices("v5e:2x2"), per_device_batch=2, simulate=aot.Simulation())
    t = r["train"]
    assert t["fits"] and r["eval"]["fits"]
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and r["global_batch"] == 8
    # the arguments a chip holds are its shards: at least the sharded state, well under the whole of it
    assert r["state_bytes"]["per_chip"] <= t["arguments"] < r["state_bytes"]["whole"]
    assert r["param_bytes"]["per_chip"] < t["total"] < t["hbm"]
    assert t["aliased"] > 0  # the donated train state is updated in place
    f = r["flops"]
    assert f["program"] > f["program_once"]  # the scanned LLM, SigLIP and Q-former layers
    assert f["program"] == pytest.approx(f["analytic"], rel=0.02)  # the tiny config has no remat
    assert 0.8 < f["xla_scaled"] * r["chips"] / f["program"] < 1.25
    text = aot.format_report(r)
    for field in ["memory per chip: arguments", "temporaries", "total", "of 16.00 GiB HBM -> FITS",
                  "FLOPs per step: analytic", "scaled by the trip counts", "train step: lower", "eval step:",
                  "mesh data=1 fsdp=4 tensor=1"]:
        assert field in text, field
    assert text.endswith("FITS")
    # the simulated step: every part of the joint step is attributed, the parts add up to the total, and the
    # headline line carries the step time, tokens/s/chip and MFU of the analytic model FLOPs
    s = t["sim"]
    assert {p for p, x in s["parts"].items() if x["xla_s"] > 0} >= {"llm", "ce", "vision", "projector", "head",
                                                                     "unet", "vae", "optimizer"}
    assert sum(x["compute_s"] for x in s["parts"].values()) == pytest.approx(s["compute_s"])
    assert s["parts"]["other"]["compute_s"] < 0.25 * s["compute_s"]
    assert sorted(x["trips"] for x in s["loops"]) == sorted([c.model.llm.num_layers] * 2 + [
        c.model.vision.num_layers] * 2 + [c.model.head.num_layers // c.model.head.cross_attention_frequency] * 2)
    assert s["model_flops"] == f["analytic"] and 0 < s["overlapped"]["mfu"] < 1
    assert s["serial"]["step_s"] >= s["overlapped"]["step_s"] > 0
    assert f"simulated step: {s['overlapped']['step_s']:.3f} s, tokens/s/chip" in text
    np.testing.assert_equal(r["per_device_batch"], 2)


def test_programs_other_than_the_fit_check_print_no_libtpu_start_up_errors():
    """libtpu is kept out of site-packages (Makefile): JAX's backend discovery would load it in every program and
    print its errors on a machine without a TPU. The fit check finds it (the tests above compile through it)."""
    import importlib.util
    import os
    import subprocess
    import sys

    assert importlib.util.find_spec("libtpu") is None, "libtpu is importable: every JAX program will initialise it"
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TPU_LIBRARY_PATH")}
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # another process's libtpu lock would hide the errors
    out = subprocess.run([sys.executable, "-c", "import jax, genllava_jax.train; print(jax.devices())"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "CpuDevice" in out.stdout, out.stderr[-2000:]
    noise = [line for line in out.stderr.splitlines() if "libtpu" in line or "TPU" in line or "E0000" in line]
    assert not noise, noise
