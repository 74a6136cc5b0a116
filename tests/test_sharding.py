"""The mesh, the rules, sharded creation, and sharded forward passes equal to the single-device one."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from genllava_jax import checkpoint, sharding as shd
from genllava_jax.layers import Linear
from genllava_jax.models.mistral import Mistral, MistralConfig

TINY = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, rope_theta=1e4)


def test_make_mesh_fills_minus_one_and_explains_bad_shapes():
    mesh = shd.make_mesh({"data": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    with pytest.raises(ValueError, match="do not divide the 8 devices"):
        shd.make_mesh({"data": -1, "fsdp": 3})
    with pytest.raises(ValueError, match="6 slots but there are 8 devices"):
        shd.make_mesh({"data": 3, "fsdp": 2})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        shd.make_mesh({"model": 8})


def test_logical_spec_drops_axes_that_do_not_divide_or_repeat():
    mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
    assert shd.logical_to_spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
    assert shd.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 1, 16), mesh) == P("fsdp", None, None)
    assert shd.logical_to_spec(("batch", "length"), (8, 5), mesh) == P("fsdp", None)
    assert shd.logical_to_spec(("batch", "length"), (6, 5), mesh) == P(None, None)
    with pytest.raises(KeyError, match="no_such_axis"):
        shd.logical_to_spec(("no_such_axis",))


def test_create_sharded_matches_plain_init_and_shards_parameters():
    mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
    sharded = shd.create_sharded(lambda: Mistral(TINY, rngs=nnx.Rngs(0)), mesh)
    plain = Mistral(TINY, rngs=nnx.Rngs(0))
    q = sharded.layers.q.kernel.get_value()
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 16, 2, 16)
    # same draws; the one-off init is compiled without backend optimisations, which may round the RNG's
    # transcendental maths differently in the last bit
    np.testing.assert_allclose(q, plain.layers.q.kernel.get_value(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("axes", [{"data": 8}, {"fsdp": 8}, {"fsdp": 4, "tensor": 2}])
def test_sharded_forward_equals_single_device(axes):
    model = Mistral(TINY, rngs=nnx.Rngs(1))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 128, (8, 16)))
    mask = jnp.ones((8, 16), jnp.int32).at[3, 10:].set(0)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, attention_mask=m).logits)
    single = fwd(state, ids, mask)

    mesh = shd.make_mesh(axes)
    sharded = shd.shard_module(model, mesh)
    _, sstate = nnx.split(sharded)
    batch = jax.sharding.NamedSharding(mesh, shd.logical_to_spec(("batch", "length"), ids.shape, mesh))
    with jax.set_mesh(mesh):
        out = fwd(sstate, jax.device_put(ids, batch), jax.device_put(mask, batch))
    np.testing.assert_allclose(out, single, atol=2e-5, rtol=1e-5)
    kernel = sharded.layers.up.kernel.get_value()
    expected = shd.logical_to_spec(("layers", "embed", "mlp"), kernel.shape, mesh)
    assert kernel.sharding.spec == expected
    if axes.get("fsdp", 1) > 1:
        assert kernel.addressable_shards[0].data.size < kernel.size  # really split, not replicated


def test_cli_checkpoint_restores_onto_mesh_with_rule_shardings(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import MistralConfig as HFConfig, MistralForCausalLM
    torch.manual_seed(0)
    hf = MistralForCausalLM(HFConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    hf.save_pretrained(str(tmp_path / "hf"))
    run = lambda *a: subprocess.run([sys.executable, "-m", "convert", "mistral", *a], check=True,
                                    capture_output=True, text=True)
    run("--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours"))
    mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
    model = checkpoint.load_module(tmp_path / "ours", mesh)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata()["out_sharding"]
        arr = var.get_value()
        assert arr.sharding.spec == shd.logical_to_spec(names, arr.shape, mesh), path
    ids = np.random.RandomState(0).randint(0, 128, (2, 8))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    with jax.set_mesh(mesh):
        out = model(jnp.asarray(ids)).logits
    np.testing.assert_allclose(out, ref, atol=1e-5)
    run("--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back"))
    back = MistralForCausalLM.from_pretrained(str(tmp_path / "back"))
    with torch.no_grad():
        np.testing.assert_array_equal(back(torch.tensor(ids)).logits.numpy(), hf(torch.tensor(ids)).logits.numpy())
    with pytest.raises(subprocess.CalledProcessError) as e:  # never overwrites silently
        run("--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back"))
    assert "exists" in e.value.stderr


class _TwoLinears(nnx.Module):
    def __init__(self, rngs):
        self.even = Linear(16, 32, ("embed", "mlp"), rngs=rngs)  # 16 splits over fsdp=8
        self.odd = Linear(12, 32, ("embed", "mlp"), rngs=rngs)  # 12 does not: replicated over fsdp


def test_a_dropped_axis_is_reported_and_an_error_when_strict():
    mesh = shd.make_mesh({"fsdp": 8})
    abstract = nnx.state(nnx.eval_shape(lambda: _TwoLinears(nnx.Rngs(0))), nnx.Param)
    text, dropped = shd.sharding_report(abstract, mesh)
    assert dropped == ["odd/kernel (12, 32): fsdp=8 does not divide embed=12"]
    rows = {line.split()[0]: line for line in text.splitlines()[2:-1]}
    # part, logical axes, spec, arrays, bytes per device, whole, what stayed replicated and why
    assert rows["even"].split("  ")[-1] == "" and "('fsdp', None)" in rows["even"]
    assert " 256.0 B " in rows["even"] and " 2.0 KiB " in rows["even"]  # 16 x 32 float32 over 8 devices
    assert "(None, None)" in rows["odd"] and rows["odd"].count("1.5 KiB") == 2  # whole on every device
    assert rows["odd"].endswith("fsdp=8 does not divide embed=12")
    assert text.splitlines()[-1] == ("  1 arrays keep a dimension unsplit over an axis that does not divide it; "
                                     "1.8 KiB of parameters per device")
    with pytest.raises(ValueError, match=r"strict_sharding: 1 parameters .*odd/kernel \(12, 32\): fsdp=8 does not "
                                         r"divide embed=12"):
        shd.create_sharded(lambda: _TwoLinears(nnx.Rngs(0)), mesh, strict=True)
    model = shd.create_sharded(lambda: _TwoLinears(nnx.Rngs(0)), mesh)  # not strict: replicated, as before
    assert model.odd.kernel.get_value().sharding.spec == P(None, None)
    assert model.even.kernel.get_value().sharding.spec == P("fsdp", None)


def test_strict_sharding_config_key_stops_the_build_before_anything_is_allocated(data_dir):
    from micro import micro_config

    from genllava_jax import train

    c = micro_config(data_dir)
    c.strict_sharding = True
    with pytest.raises(ValueError, match=r"strict_sharding: \d+ parameters would be replicated .*does not divide"):
        train.build(c, shd.make_mesh({"fsdp": 8}))


def test_a_conv_kernel_sharded_over_fsdp_is_gathered_whole_not_windowed(monkeypatch):
    """Compiled for a TPU (v5e-16 through libtpu, nothing runs): a 3x3 conv whose kernel is fsdp-sharded on its
    output channels, as the UNet and VAE hold theirs. As sharded, XLA:TPU runs it as a windowed all-gather loop of
    16 narrow convs (8 of 128 channels each; 20x the cycles of the gathered conv here); gathered whole
    (`Conv.gather_kernel`, the default) it is one conv on the batch shard."""
    from genllava_jax.layers import Conv
    from launch import aot
    from launch import simulate as sim

    devices = aot.target_devices("v5e:4x4")
    mesh = aot.build_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
    conv = nnx.eval_shape(lambda: Conv(128, 128, 3, padding=1, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    graphdef, params = nnx.split(conv)
    params = shd.with_shardings(params, shd.state_shardings(params, mesh))
    assert params["kernel"].sharding.spec == P(None, None, None, "fsdp")
    x = jax.ShapeDtypeStruct((16, 256, 256, 128), jnp.bfloat16, sharding=jax.sharding.NamedSharding(mesh, P("fsdp")))

    def compiled(gather: bool) -> tuple[bool, float]:
        monkeypatch.setattr(Conv, "gather_kernel", gather)
        with jax.set_mesh(mesh):
            text = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)).lower(params, x).compile().as_text()
        parts = sim.simulate(text, sim.CHIPS[devices[0].device_kind])["parts"].values()
        return "windowed_dot_general" in text, sum(c.cycles for c in parts)

    (windowed, as_sharded), (windowed_gathered, gathered) = compiled(False), compiled(True)
    assert windowed and not windowed_gathered
    assert gathered < as_sharded / 4, (gathered, as_sharded)
