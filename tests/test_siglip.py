"""SigLIP vision tower, image preprocessing and projector against transformers / torch (float32)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file, save_file
from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipVisionConfig, SiglipVisionModel

from convert import projector as pconv, siglip as conv
from convert.__main__ import main as cli
from convert.common import ConversionError
from genllava_jax import checkpoint, sharding as shd
from genllava_jax.data.image import ImageConfig, preprocess
from oracle import assert_close, save_hf

BASE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4)
CONFIGS = {
    "odd_size": dict(image_size=30, patch_size=6, vision_use_head=False),  # 5x5 grid, no head
    "head": dict(image_size=32, patch_size=8, vision_use_head=True, layer_norm_eps=1e-5),
}


def perturb(model, seed):
    """HF zero-initialises biases (and the head's in_proj bias); random values make every mapping count."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def hf_vision(tmp_path, name="head", seed=0):
    torch.manual_seed(seed)
    model = perturb(SiglipVisionModel(SiglipVisionConfig(**BASE, **CONFIGS[name])), seed)
    return model, save_hf(model, tmp_path / "hf")


@functools.partial(jax.jit, static_argnames=("graphdef", "feature_layer"))
def _forward(graphdef, state, x, feature_layer):
    return nnx.merge(graphdef, state)(x, feature_layer)


def run(model, x_NHWC, feature_layer=None):
    """Jitted forward: one compile per (config, shape) instead of eager op-by-op dispatch."""
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, jnp.asarray(x_NHWC), feature_layer)


def images(size, batch=2, seed=0, width=None):
    return np.random.RandomState(seed).randn(batch, size, width or size, 3).astype(np.float32)


def hf_forward(model, x_NHWC, **kw):
    with torch.no_grad():
        return model(torch.tensor(x_NHWC).permute(0, 3, 1, 2), output_hidden_states=True, **kw)


def check_outputs(ours, ref, what):
    assert_close(ours.last_hidden_state, ref.last_hidden_state, what=f"last_hidden_state[{what}]")
    assert_close(ours.features, ref.hidden_states[-2], what=f"hidden_states[-2][{what}]")
    if ref.pooler_output is None:
        assert ours.pooler_output is None
    else:
        assert_close(ours.pooler_output, ref.pooler_output, what=f"pooler_output[{what}]")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_outputs_match_hf(tmp_path, name):
    model, path = hf_vision(tmp_path, name)
    ours = conv.from_hf(path)
    size = CONFIGS[name]["image_size"]
    x = images(size)
    ref = hf_forward(model, x)
    check_outputs(run(ours, x), ref, name)


def test_any_feature_layer_matches_hf_hidden_states(tmp_path):
    model, path = hf_vision(tmp_path, "odd_size")
    ours = conv.from_hf(path)
    x = images(30, seed=9)
    ref = hf_forward(model, x)
    for k in (0, 1, -1):  # the embeddings, the first layer, the last layer before the post-layernorm
        assert_close(run(ours, x, k).features, ref.hidden_states[k], what=f"layer {k}")
    with pytest.raises(ValueError, match="feature_layer=4"):
        run(ours, x, 4)


def test_remat_and_unrolled_layers_give_same_outputs(tmp_path):
    _, path = hf_vision(tmp_path, "head")
    x = images(32, seed=1)
    base = run(conv.from_hf(path), x)
    for kw in (dict(remat="full"), dict(remat="dots_saveable", scan=False)):
        out = run(conv.from_hf(path, **kw), x)
        for a, b in zip(out, base):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=str(kw))


@pytest.mark.parametrize("hw", [(48, 48), (16, 40)])  # a larger grid; a non-square one, smaller in height
def test_position_embeddings_interpolate_like_hf(tmp_path, hw):
    model, path = hf_vision(tmp_path, "head")
    ours = conv.from_hf(path)  # converted at 32 px (a 4x4 grid)
    x = images(hw[0], width=hw[1], seed=2)
    check_outputs(run(ours, x), hf_forward(model, x, interpolate_pos_encoding=True), f"{hw}")


def test_round_trip_reloads_strictly_with_identical_outputs(tmp_path):
    model, path = hf_vision(tmp_path, "head")
    ours = conv.from_hf(path)
    conv.to_hf(ours, tmp_path / "back", max_shard_bytes=20_000)  # small shards: exercises the index
    assert (tmp_path / "back" / "model.safetensors.index.json").exists()
    back, info = SiglipVisionModel.from_pretrained(str(tmp_path / "back"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    x = images(32, seed=3)
    a, b = hf_forward(back.eval(), x), hf_forward(model, x)
    for k in ("last_hidden_state", "pooler_output"):
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())
    again = conv.from_hf(tmp_path / "back")
    np.testing.assert_array_equal(run(again, x).pooler_output, run(ours, x).pooler_output)


def test_full_siglip_model_loads_and_round_trips(tmp_path):
    torch.manual_seed(0)
    cfg = SiglipConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=64, bos_token_id=1, eos_token_id=2),
                       vision_config=dict(**BASE, **CONFIGS["odd_size"]))
    full = perturb(SiglipModel(cfg), 0)
    full.save_pretrained(str(tmp_path / "full"))
    ours = conv.from_hf(tmp_path / "full")  # finds "vision_model.", ignores the text tower
    x = images(30, seed=4)
    ref = hf_forward(full.vision_model, x)
    check_outputs(run(ours, x), ref, "SiglipModel")
    conv.to_hf(ours, tmp_path / "back")
    back, info = SiglipVisionModel.from_pretrained(str(tmp_path / "back"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    np.testing.assert_array_equal(hf_forward(back.eval(), x).last_hidden_state.numpy(),
                                  ref.last_hidden_state.numpy())


def torch_projector(vision, text, seed=0):
    torch.manual_seed(seed)
    return perturb(torch.nn.Sequential(torch.nn.Linear(vision, text), torch.nn.GELU(),
                                       torch.nn.Linear(text, text)), seed)


def llava_folder(tmp_path, tower, projector):
    """An original-LLaVA-style folder: config naming its tower, the tower and projector under LLaVA's prefixes,
    and an LLM key that neither converter may touch."""
    tensors = {"model.vision_tower.vision_tower.vision_model." + k: v.numpy() for k, v in tower.state_dict().items()}
    tensors |= {"model.mm_projector." + k: v.numpy() for k, v in projector.state_dict().items()}
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((4, 4), np.float32)
    path = tmp_path / "llava"
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({
        "model_type": "llava_mistral", "mm_vision_tower": "google/siglip-so400m-patch14-384",
        "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 32, "hidden_size": 24}))
    return path


def test_llava_layout_loads_tower_and_projector(tmp_path):
    tower, _ = hf_vision(tmp_path, "head")
    proj = torch_projector(32, 24)
    path = llava_folder(tmp_path, tower, proj)
    with pytest.raises(ConversionError, match="hf_config"):  # LLaVA's config only names its tower
        conv.from_hf(path)
    ours = conv.from_hf(path, hf_config=tower.config.to_dict(), use_head=False)  # the head's keys are dropped
    x = images(32, seed=5)
    out = run(ours, x)
    assert out.pooler_output is None
    ref = hf_forward(tower, x)
    assert_close(out.features, ref.hidden_states[-2], what="LLaVA tower features")
    projected = pconv.from_hf(path)(out.features)
    with torch.no_grad():
        want = proj(ref.hidden_states[-2]).numpy()
    assert_close(projected, want, what="projected features")


def test_projector_matches_torch_and_round_trips(tmp_path):
    proj = torch_projector(32, 24, seed=1)
    path = tmp_path / "p"
    path.mkdir()
    save_file({"model.mm_projector." + k: v.numpy() for k, v in proj.state_dict().items()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"mm_hidden_size": 32, "hidden_size": 24}))
    ours = pconv.from_hf(path)
    x = np.random.RandomState(6).randn(2, 7, 32).astype(np.float32)
    with torch.no_grad():
        assert_close(ours(jnp.asarray(x)), proj(torch.tensor(x)).numpy(), what="projector")
    pconv.to_hf(ours, tmp_path / "back")
    back = torch_projector(32, 24, seed=2)
    sd = {k.removeprefix("model.mm_projector."): torch.tensor(v)
          for k, v in load_file(str(tmp_path / "back" / "model.safetensors")).items()}
    back.load_state_dict(sd, strict=True)
    for a, b in zip(back.state_dict().values(), proj.state_dict().values()):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    (path / "config.json").write_text(json.dumps({"mm_hidden_size": 32, "hidden_size": 24,
                                                  "mm_projector_type": "linear"}))
    with pytest.raises(ValueError, match="linear"):
        pconv.from_hf(path)


def test_sharded_forward_equals_single_device(tmp_path):
    _, path = hf_vision(tmp_path, "head")
    model = conv.from_hf(path)
    x = jnp.asarray(images(32, batch=4, seed=7))
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    single = fwd(state, x)

    mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
    sharded = shd.shard_module(model, mesh)
    loaded = conv.from_hf(path, mesh=mesh)  # the converter places parameters the same way
    for (p, v), (_, w) in zip(nnx.to_flat_state(nnx.state(sharded, nnx.Param)),
                              nnx.to_flat_state(nnx.state(loaded, nnx.Param))):
        arr = v.get_value()
        assert arr.sharding.spec == shd.logical_to_spec(v.get_metadata()["out_sharding"], arr.shape, mesh), p
        assert w.get_value().sharding.spec == arr.sharding.spec, p
    fc1 = sharded.layers.mlp.fc1.kernel.get_value()
    assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert fc1.addressable_shards[0].data.shape == (3, 8, 24)  # really split, not replicated
    batch = jax.sharding.NamedSharding(mesh, shd.logical_to_spec(("batch", None, None, None), x.shape, mesh))
    with jax.set_mesh(mesh):
        out = fwd(nnx.state(sharded), jax.device_put(x, batch))
    for a, b in zip(out, single):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


def test_cli_round_trip_through_our_checkpoint(tmp_path):
    model, path = hf_vision(tmp_path, "odd_size")
    assert cli(["siglip", "--from-hf", str(path), "--out", str(tmp_path / "ours")]) == 0
    ours = checkpoint.load_module(tmp_path / "ours")
    assert ours.cfg == conv.from_hf(path).cfg
    assert cli(["siglip", "--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 0
    back = SiglipVisionModel.from_pretrained(str(tmp_path / "back")).eval()
    x = images(30, seed=8)
    np.testing.assert_array_equal(hf_forward(back, x).last_hidden_state.numpy(),
                                  hf_forward(model, x).last_hidden_state.numpy())


def test_bad_checkpoints_name_the_key(tmp_path):
    _, path = hf_vision(tmp_path, "head")
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    key = "encoder.layers.2.self_attn.q_proj.bias"
    save_file({k: v for k, v in tensors.items() if k != key}, str(f), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        conv.from_hf(path)
    save_file(tensors | {key: np.zeros(31, np.float32)}, str(f), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=key.replace(".", r"\.") + r".*\(31,\)"):
        conv.from_hf(path)
    save_file(tensors | {"vision_model.embeddings.patch_embedding.weight": tensors[conv.ANCHOR]}, str(f),
              metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="pass prefix="):
        conv.from_hf(path)
    cfg = json.loads((path / "config.json").read_text()) | {"model_type": "clip_vision_model"}
    with pytest.raises(ValueError, match="clip_vision_model"):
        conv.from_hf(path, hf_config=cfg)


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing


def test_preprocessing_equals_hf_processor_for_sizes_and_modes():
    rng = np.random.RandomState(0)
    rgb = rng.randint(0, 256, (37, 53, 3)).astype(np.uint8)
    alpha = rng.randint(0, 256, (37, 53)).astype(np.uint8)
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent = palette.copy()
    transparent.info["transparency"] = 3
    inputs = {
        "RGB": Image.fromarray(rgb), "L": Image.fromarray(rgb[..., 0]), "P": palette, "P+transparency": transparent,
        "RGBA": Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "CMYK": Image.fromarray(rgb).convert("CMYK"),
        "LA": Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA"),
        "large": Image.fromarray(rng.randint(0, 256, (300, 200, 3)).astype(np.uint8)),
        "tiny": Image.fromarray(rng.randint(0, 256, (5, 9, 3)).astype(np.uint8)),
        "array": rgb,
    }
    hf_cfg = {"size": {"height": 48, "width": 40}, "resample": 3, "rescale_factor": 1 / 255,
              "image_mean": [0.5, 0.4, 0.3], "image_std": [0.5, 0.2, 0.25]}
    for proc, cfg in ((SiglipImageProcessor(**hf_cfg), ImageConfig.from_hf(hf_cfg)),
                      (SiglipImageProcessor(), ImageConfig.from_hf({}))):
        for name, image in inputs.items():
            ref = proc(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
            ours = preprocess(image, cfg)
            assert ours.dtype == np.float32
            np.testing.assert_array_equal(ours, ref, err_msg=name)
        # 16-bit grey: HF's convert("RGB") clips it to white; ours is HF's result on its 8-bit scaling (issue 16)
        grey16 = rgb[..., 0].astype(np.uint16) * 257
        ref = proc(Image.fromarray(rgb[..., 0]), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        np.testing.assert_array_equal(preprocess(Image.fromarray(grey16).convert("I;16"), cfg), ref)
        assert not np.array_equal(proc(Image.fromarray(grey16), return_tensors="np")["pixel_values"][0]
                                  .transpose(1, 2, 0), ref)  # HF's own reading would differ (clipped)
    with pytest.raises(ValueError, match="longest_edge"):
        ImageConfig.from_hf({"size": {"longest_edge": 224}})
