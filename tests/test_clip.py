"""CLIP (both towers, projections, logit scale) against transformers on small random configs (float32)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                          CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection)

from convert import clip as conv
from convert.__main__ import main as cli
from convert.common import ConversionError
from genllava_jax import checkpoint, sharding as shd
from oracle import assert_close

VOCAB = 99
CONFIGS = {
    # 3 heads of 8, projection 20 != hidden 24, eos_token_id 2: the legacy pooling (argmax of the ids)
    "odd_legacy": dict(
        text=dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
                  max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1),
        vision=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3, image_size=20,
                    patch_size=5),
        projection_dim=20),
    # the current pooling (first eos_token_id; padding with the same id), gelu, another eps
    "new_eos": dict(
        text=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=16, bos_token_id=96, eos_token_id=97, pad_token_id=97, hidden_act="gelu",
                  layer_norm_eps=1e-6),
        vision=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=16,
                    patch_size=4, hidden_act="gelu", layer_norm_eps=1e-6),
        projection_dim=16),
}


def perturb(model, seed):
    """HF zero-initialises biases; random values make every mapping count."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def hf_clip(name, seed=0):
    c = CONFIGS[name]
    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=c["text"], vision_config=c["vision"], projection_dim=c["projection_dim"])
    return perturb(CLIPModel(cfg), seed)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """name -> (CLIPModel, its saved folder), built once."""
    out = {}
    for name in CONFIGS:
        model = hf_clip(name)
        path = tmp_path_factory.mktemp(name) / "clip"
        model.save_pretrained(str(path))
        out[name] = (model, path)
    return out


def text_inputs(name, batch=3, length=9, seed=0):
    """Random ids with BOS first, EOS then padding at different lengths per row (one row without padding)."""
    t = CONFIGS[name]["text"]
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB - 3, (batch, length))
    mask = np.ones((batch, length), np.int64)
    for b, n in enumerate([length, 5, 7][:batch]):
        ids[b, 0], ids[b, n - 1] = t["bos_token_id"], t["eos_token_id"] if t["eos_token_id"] != 2 else VOCAB - 1
        ids[b, n:], mask[b, n:] = t["pad_token_id"], 0
    return ids, mask


def pixels(name, batch=2, seed=0, size=None):
    s = size or CONFIGS[name]["vision"]["image_size"]
    h, w = (s, s) if isinstance(s, int) else s
    return np.random.RandomState(seed).randn(batch, h, w, 3).astype(np.float32)


def _everything(m, ids, x, mask):
    return (m(ids, x, mask), (m.get_text_features(ids, mask), m.get_image_features(x)), m.encode_text(ids, mask),
            m.encode_image(x))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _call(method, graphdef, state, *args):
    m = nnx.merge(graphdef, state)
    return _everything(m, *args) if method == "everything" else getattr(m, method)(*args)


def call(model, method, *args):
    """A jitted method call: one compile per (config, method, shapes) instead of eager dispatch."""
    return jax.tree.map(np.asarray, _call(method, *nnx.split(model), *(jnp.asarray(a) for a in args)))


def nchw(x):
    return torch.tensor(x).permute(0, 3, 1, 2)


def pooled(out):
    return getattr(out, "pooler_output", out)  # transformers 5 returns the outputs object, 4 the tensor


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_features_and_logits_match_hf(clips, name):
    model, path = clips[name]
    ours = conv.from_hf(path)
    ids, mask = text_inputs(name)
    x = pixels(name)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), pixel_values=nchw(x), attention_mask=torch.tensor(mask))
        text_features = pooled(model.get_text_features(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)))
        image_features = pooled(model.get_image_features(pixel_values=nchw(x)))
        towers = (model.text_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)),
                  model.vision_model(pixel_values=nchw(x)))
    out, feats, text, image = call(ours, "everything", ids, x, mask)
    for field in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        assert_close(getattr(out, field), getattr(ref, field).numpy(), what=f"{field}[{name}]")
    assert_close(feats[0], text_features.numpy(), what=f"text features[{name}]")
    assert_close(feats[1], image_features.numpy(), what=f"image features[{name}]")
    for a, b, what in ((text, towers[0], "text"), (image, towers[1], "vision")):
        assert_close(a.last_hidden_state, b.last_hidden_state.numpy(), what=f"{what} last_hidden_state[{name}]")
        assert_close(a.pooler_output, b.pooler_output.numpy(), what=f"{what} pooler_output[{name}]")


def test_pooling_rules_pick_hfs_positions(clips):
    """Legacy: the highest id, wherever it is; current: the first eos_token_id, even with later ones (padding)."""
    legacy = conv.from_hf(clips["odd_legacy"][1], towers=("text",))
    ids = np.array([[0, 5, 90, 7, 3], [0, 98, 4, 98, 1]])
    with torch.no_grad():
        ref = clips["odd_legacy"][0].text_model(input_ids=torch.tensor(ids)).pooler_output.numpy()
    out = call(legacy, "encode_text", ids)
    assert_close(out.pooler_output, ref, what="legacy pooling")
    np.testing.assert_allclose(out.pooler_output, out.last_hidden_state[[0, 1], [2, 1]])
    current = conv.from_hf(clips["new_eos"][1], towers=("text",))
    ids = np.array([[96, 5, 97, 97, 97], [96, 98, 4, 6, 97]])
    out = call(current, "encode_text", ids)
    np.testing.assert_allclose(out.pooler_output, out.last_hidden_state[[0, 1], [2, 4]])


def test_interpolated_position_embeddings_match_hf(clips):
    model, path = clips["new_eos"]
    ours = conv.from_hf(path, towers=("vision",))
    for size in (24, (12, 20)):  # a larger grid; a non-square one
        x = pixels("new_eos", seed=1, size=size)
        with torch.no_grad():
            ref = model.vision_model(pixel_values=nchw(x), interpolate_pos_encoding=True)
        out = call(ours, "encode_image", x)
        assert_close(out.last_hidden_state, ref.last_hidden_state.numpy(), what=f"interpolated {size}")


def test_round_trip_reloads_strictly_with_identical_outputs(clips, tmp_path):
    model, path = clips["odd_legacy"]
    ours = conv.from_hf(path)
    conv.to_hf(ours, tmp_path / "back", max_shard_bytes=20_000)  # small shards: exercises the index
    assert (tmp_path / "back" / "model.safetensors.index.json").exists()
    back, info = CLIPModel.from_pretrained(str(tmp_path / "back"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids, mask = text_inputs("odd_legacy", seed=2)
    x = pixels("odd_legacy", seed=2)
    with torch.no_grad():
        a = back.eval()(input_ids=torch.tensor(ids), pixel_values=nchw(x), attention_mask=torch.tensor(mask))
        b = model(input_ids=torch.tensor(ids), pixel_values=nchw(x), attention_mask=torch.tensor(mask))
    np.testing.assert_array_equal(a.logits_per_image.numpy(), b.logits_per_image.numpy())
    assert back.config.text_config.eos_token_id == 2 and back.config.projection_dim == 20
    again = conv.from_hf(tmp_path / "back")
    np.testing.assert_array_equal(call(again, "__call__", ids, x, mask).logits_per_image,
                                  call(ours, "__call__", ids, x, mask).logits_per_image)


SINGLE = {  # HF class, the tower, with a projection
    "CLIPTextModel": (CLIPTextModel, "text", False),
    "CLIPTextModelWithProjection": (CLIPTextModelWithProjection, "text", True),
    "CLIPVisionModel": (CLIPVisionModel, "vision", False),
    "CLIPVisionModelWithProjection": (CLIPVisionModelWithProjection, "vision", True),
}


@pytest.mark.parametrize("cls_name", sorted(SINGLE))
def test_single_tower_classes_load_and_round_trip(clips, tmp_path, cls_name):
    cls, tower, projected = SINGLE[cls_name]
    c = CONFIGS["new_eos"]
    cfg_cls = CLIPTextConfig if tower == "text" else CLIPVisionConfig
    torch.manual_seed(3)
    model = perturb(cls(cfg_cls(**c[tower], projection_dim=c["projection_dim"])), 3)
    model.save_pretrained(str(tmp_path / "hf"))  # transformers 5's layout: bare towers without a prefix
    ours = conv.from_hf(tmp_path / "hf")
    assert ours.cfg.hf_class == cls_name and (ours.cfg.projection_dim is not None) == projected
    if tower == "text":
        ids, mask = text_inputs("new_eos", seed=4)
        args, method = (ids, mask), "encode_text"
        with torch.no_grad():
            ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    else:
        x = pixels("new_eos", seed=4)
        args, method = (x,), "encode_image"
        with torch.no_grad():
            ref = model(pixel_values=nchw(x))
    out = call(ours, method, *args)
    assert_close(out.last_hidden_state, ref.last_hidden_state.numpy(), what=f"{cls_name} last_hidden_state")
    if projected:
        feats = call(ours, "get_text_features" if tower == "text" else "get_image_features", *args)
        assert_close(feats, (ref.text_embeds if tower == "text" else ref.image_embeds).numpy(),
                     what=f"{cls_name} embeds")
    else:
        assert_close(out.pooler_output, ref.pooler_output.numpy(), what=f"{cls_name} pooler_output")
    conv.to_hf(ours, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == [cls_name]
    back, info = cls.from_pretrained(str(tmp_path / "back"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k].numpy(), v.numpy(), err_msg=k)


def test_one_tower_of_a_clip_model_and_legacy_layouts(clips, tmp_path):
    """towers=("text",) takes a CLIPModel's text tower + projection; a transformers-4 CLIPTextModel folder (the
    `text_model.` prefix and a `position_ids` buffer, as SD's text encoders) loads too."""
    model, path = clips["new_eos"]
    text = conv.from_hf(path, towers=("text",))
    assert text.vision is None and text.logit_scale is None and text.visual_projection is None
    ids, mask = text_inputs("new_eos", seed=5)
    with torch.no_grad():
        ref = pooled(model.get_text_features(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)))
    assert_close(call(text, "get_text_features", ids, mask), ref.numpy(), what="text tower of CLIPModel")

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    tensors = {k: v for k, v in load_file(str(path / "model.safetensors")).items() if k.startswith("text_model.")}
    tensors["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    save_file(tensors, str(legacy / "model.safetensors"), metadata={"format": "pt"})
    hf = json.loads((path / "config.json").read_text())["text_config"]
    (legacy / "config.json").write_text(json.dumps({**hf, "architectures": ["CLIPTextModel"]}))
    bare = conv.from_hf(legacy)
    with torch.no_grad():
        ref = model.text_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    assert_close(call(bare, "encode_text", ids, mask).last_hidden_state, ref.numpy(), what="legacy CLIPTextModel")
    with pytest.raises(ValueError, match="has no text_projection"):
        call(bare, "get_text_features", ids, mask)


def test_remat_and_unrolled_layers_give_same_outputs(clips):
    _, path = clips["new_eos"]
    ids, mask = text_inputs("new_eos", seed=6)
    x = pixels("new_eos", seed=6)
    base = call(conv.from_hf(path), "__call__", ids, x, mask)
    for kw in (dict(remat="full"), dict(remat="dots_saveable", scan=False)):
        out = call(conv.from_hf(path, **kw), "__call__", ids, x, mask)
        for a, b in zip(out, base):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=str(kw))


def test_sharded_forward_equals_single_device(clips):
    _, path = clips["new_eos"]
    ids, mask = text_inputs("new_eos", batch=2, seed=7)
    x = jnp.asarray(pixels("new_eos", batch=4, seed=7))
    single = call(conv.from_hf(path), "__call__", ids, x, mask)
    mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
    sharded = conv.from_hf(path, mesh=mesh)
    fc1 = sharded.vision.layers.mlp.fc1.kernel.get_value()
    assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert fc1.addressable_shards[0].data.shape == (3, 8, 24)  # really split, not replicated
    batch = lambda a: jax.device_put(a, jax.sharding.NamedSharding(
        mesh, shd.logical_to_spec(("batch",) + (None,) * (a.ndim - 1), a.shape, mesh)))
    with jax.set_mesh(mesh):
        out = _call("__call__", *nnx.split(sharded), batch(jnp.asarray(ids)), batch(x), batch(jnp.asarray(mask)))
    for a, b in zip(out, single):
        np.testing.assert_allclose(np.asarray(a), b, atol=2e-5, rtol=1e-5)


def test_cli_round_trip_through_our_checkpoint(clips, tmp_path):
    model, path = clips["odd_legacy"]
    assert cli(["clip", "--from-hf", str(path), "--out", str(tmp_path / "ours")]) == 0
    ours = checkpoint.load_module(tmp_path / "ours")
    assert ours.cfg == conv.from_hf(path).cfg
    assert cli(["clip", "--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 0
    back = CLIPModel.from_pretrained(str(tmp_path / "back")).eval()
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k].numpy(), v.numpy(), err_msg=k)


def test_bad_checkpoints_name_the_key(clips, tmp_path):
    _, path = clips["odd_legacy"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((path / "config.json").read_text())
    tensors = load_file(str(path / "model.safetensors"))
    key = "vision_model.encoder.layers.1.self_attn.k_proj.bias"
    save_file({k: v for k, v in tensors.items() if k != key}, str(bad / "model.safetensors"))
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        conv.from_hf(bad)
    save_file(tensors | {key: np.zeros(7, np.float32)}, str(bad / "model.safetensors"))
    with pytest.raises(ConversionError, match=key.replace(".", r"\.") + r".*\(7,\)"):
        conv.from_hf(bad)
    save_file(tensors | {"text_model.encoder.layers.5.mlp.fc1.bias": np.zeros(40, np.float32)},
              str(bad / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"unexpected keys.*layers\.5"):
        conv.from_hf(bad)
    cfg = json.loads((path / "config.json").read_text())
    with pytest.raises(ConversionError, match="siglip_vision_model"):
        conv.from_hf(path, hf_config={**cfg["vision_config"], "model_type": "siglip_vision_model"})
    with pytest.raises(ConversionError, match="no vision tower"):
        conv.from_hf(path, hf_config={**cfg["text_config"], "architectures": ["CLIPTextModel"]},
                     towers=("vision",))


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing and tokenization


def test_preprocessing_equals_clip_image_processor():
    from PIL import Image
    from transformers import CLIPImageProcessor

    from genllava_jax.data.image import ImageConfig, clip_image_config, preprocess

    rng = np.random.RandomState(0)
    rgb = rng.randint(0, 256, (37, 53, 3)).astype(np.uint8)
    alpha = rng.randint(0, 256, (37, 53)).astype(np.uint8)
    transparent = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent.info["transparency"] = 3
    inputs = {
        "RGB": Image.fromarray(rgb), "L": Image.fromarray(rgb[..., 0]), "P+transparency": transparent,
        "RGBA": Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "CMYK": Image.fromarray(rgb).convert("CMYK"),
        "tall": Image.fromarray(rng.randint(0, 256, (300, 41, 3)).astype(np.uint8)),
        "square": Image.fromarray(rng.randint(0, 256, (64, 64, 3)).astype(np.uint8)),
        "tiny": Image.fromarray(rng.randint(0, 256, (5, 9, 3)).astype(np.uint8)),
        "array": rgb,
    }
    variants = {  # CLIP's defaults; odd sizes with a crop larger than the resized image (zero padding); no crop
        "default": {},
        "odd": {"size": {"shortest_edge": 31}, "crop_size": {"height": 33, "width": 27}, "resample": 2,
                "image_mean": [0.5, 0.4, 0.3], "image_std": [0.5, 0.2, 0.25]},
        "no_crop": {"size": {"shortest_edge": 20}, "do_center_crop": False},
    }
    for variant, hf_cfg in variants.items():
        proc, cfg = CLIPImageProcessor(**hf_cfg), clip_image_config(hf_cfg)
        for name, image in inputs.items():
            ref = proc(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
            ours = preprocess(image, cfg)
            assert ours.dtype == np.float32
            np.testing.assert_array_equal(ours, ref, err_msg=f"{variant}/{name}")
    assert ImageConfig.from_hf({"size": {"shortest_edge": 7}}).shortest_edge == 7


def test_clip_tokens_as_the_sd_pipeline_and_text_features(clips, tmp_path):
    """A CLIP tokenizer folder -> padded, truncated ids (as StableDiffusionPipeline.encode_prompt) -> text tower."""
    from transformers import CLIPTokenizer

    from genllava_jax.data.tokenizer import clip_tokens, load_clip_tokenizer

    vocab = {"<|startoftext|>": 96, "<|endoftext|>": 97, "!": 0, "a</w>": 3, "b</w>": 4, "c</w>": 5, "a": 6, "b": 7,
             "c": 8, "ab</w>": 9}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b</w>\n")
    CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=16,
                  pad_token="<|endoftext|>").save_pretrained(str(tmp_path / "tok"))
    tok = load_clip_tokenizer(tmp_path / "tok")
    texts = ["a b c", "ab", "", "c " * 30]  # the last is truncated to 16 tokens, its EOS kept
    ids, mask = clip_tokens(tok, texts)
    ref = CLIPTokenizer.from_pretrained(str(tmp_path / "tok"))(texts, padding="max_length", max_length=16,
                                                                 truncation=True, return_tensors="np")
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    assert ids.shape == (4, 16) and ids[1, :3].tolist() == [96, 9, 97] and ids[3, -1] == 97
    model, path = clips["new_eos"]
    ours = conv.from_hf(path, towers=("text",))
    with torch.no_grad():
        ref = model.text_model(input_ids=torch.tensor(ids, dtype=torch.long)).last_hidden_state.numpy()
    assert_close(call(ours, "encode_text", ids).last_hidden_state, ref, what="text states of tokenized prompts")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_clip_tokenizer(tmp_path / "nowhere")
