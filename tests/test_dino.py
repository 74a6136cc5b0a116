"""The DINO ViT against transformers' ViTModel (float32, small random configs): last hidden state and pooler output,
position-embedding interpolation, the converter both ways, bad checkpoints."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import ViTConfig, ViTForImageClassification, ViTModel

from convert import dino as conv
from convert.common import ConversionError
from oracle import assert_close, save_hf

# ViT-S/16's shape at a small size: 3 layers, an odd head count, layer_norm_eps as transformers' default
BASE = dict(hidden_size=36, intermediate_size=64, num_hidden_layers=3, num_attention_heads=3, image_size=32,
            patch_size=8)


def hf_vit(path, seed=0, cls=ViTModel, **kw):
    torch.manual_seed(seed)
    model = cls(ViTConfig(**BASE, **kw))
    with torch.no_grad():  # HF zero-initialises biases and the tokens: random values make every mapping count
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval(), save_hf(model, path)


@functools.partial(jax.jit, static_argnames=("graphdef", "interpolate"))
def _forward(graphdef, state, x, interpolate):
    return nnx.merge(graphdef, state)(x, interpolate)


def run(model, x_NCHW, interpolate=False):
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, jnp.asarray(x_NCHW.transpose(0, 2, 3, 1)), interpolate)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return hf_vit(tmp_path_factory.mktemp("vit") / "hf")


def test_vit_equals_transformers(vit):
    hf, path = vit
    ours = conv.from_hf(path)
    assert ours.cfg.use_pooler and ours.cfg.layer_norm_eps == 1e-12
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(x))
    got = run(ours, x)
    assert_close(got.last_hidden_state, ref.last_hidden_state, what="last_hidden_state")
    assert_close(got.pooler_output, ref.pooler_output, what="pooler_output")
    assert_close(ours.features(jnp.asarray(x.transpose(0, 2, 3, 1))), ref.last_hidden_state[:, 0], what="[CLS]")
    # another resolution, non-square: HF's bicubic interpolation of the position embeddings
    x = np.random.default_rng(1).normal(size=(1, 3, 40, 56)).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(x), interpolate_pos_encoding=True)
    assert_close(run(ours, x, True).last_hidden_state, ref.last_hidden_state, what="interpolated")
    with pytest.raises(ValueError, match="does not match the model's 4x4"):
        run(ours, x, False)


def test_round_trip_task_model_prefix_and_bad_checkpoints(vit, tmp_path):
    hf, path = vit
    ours = conv.from_hf(path)
    conv.to_hf(ours, tmp_path / "out")
    back, info = ViTModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ref_sd, back_sd = hf.state_dict(), back.state_dict()
    assert all(torch.equal(ref_sd[k], back_sd[k]) for k in ref_sd)
    # a classification model's `vit.` (its head ignored), and a ViTModel saved without the pooler
    _, cls_path = hf_vit(tmp_path / "cls", cls=ViTForImageClassification, num_labels=5)
    assert not conv.from_hf(cls_path).cfg.use_pooler
    # a mis-shaped, a missing and an unexpected key are each refused by name
    tensors = load_file(path / "model.safetensors")
    cases = {"shape": ("encoder.layer.1.attention.attention.key.weight", np.zeros((3, 3), np.float32)),
             "missing": ("encoder.layer.2.intermediate.dense.bias", None),
             "unexpected": ("encoder.layer.3.output.dense.bias", np.zeros(36, np.float32))}
    for name, (key, value) in cases.items():
        bad = dict(tensors)
        if value is None:
            del bad[key]
        else:
            bad[key] = value
        (tmp_path / name).mkdir()
        save_file(bad, tmp_path / name / "model.safetensors")
        (tmp_path / name / "config.json").write_text((path / "config.json").read_text())
        with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
            conv.from_hf(tmp_path / name)
    (tmp_path / "swin").mkdir()
    (tmp_path / "swin" / "config.json").write_text(json.dumps({"model_type": "swin"}))
    save_file(tensors, tmp_path / "swin" / "model.safetensors")
    with pytest.raises(ValueError, match="model_type='swin' is not a ViT config"):
        conv.from_hf(tmp_path / "swin")
