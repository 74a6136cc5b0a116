"""llava-hf LlavaForConditionalGeneration <-> our vision tower + projector + LLM (convert/llava.py): the imported
parts give Llava's logits (through GenLLaVA's own splicing of image features), and the export reloads strictly with
the same tensors and logits. A SigLIP tower (GenLLaVA's) and a CLIP one (LLaVA-1.5's), small random configs."""

import dataclasses
import json
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig, \
    SiglipVisionConfig

from convert.llava import main as llava_cli
from genllava_jax import checkpoint, errors
from genllava_jax.models import abstract_model
from genllava_jax.models.genllava import GenLLaVA
from oracle import assert_close

IMAGE_TOKEN = 95
TOWERS = {
    "siglip": (SiglipVisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
                                  image_size=16, patch_size=8), "full"),
    "clip": (CLIPVisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=12), "default"),
}


def llava(tower: str, tmp_path):
    vision, strategy = TOWERS[tower]
    text = MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                      vision_feature_layer=-2, vision_feature_select_strategy=strategy, image_seq_length=4)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # biases start at 0 and norms at 1: make every tensor's conversion count
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / f"llava_{tower}"
    model.save_pretrained(str(path), max_shard_size="60KB")
    return model, path


def inputs(seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, 90, (2, 9))
    ids[:, 2:6] = IMAGE_TOKEN  # the 2x2 patch grid of a 16 px image at patch 8
    pixels = rng.randn(2, 3, 16, 16).astype(np.float32)
    return ids, pixels


def truncated_clip(vision, layers: int):
    """Our CLIP vision tower with its first `layers` layers: its last hidden state is HF's hidden_states[layers]."""
    cfg = vision.cfg.replace(vision=dataclasses.replace(vision.cfg.vision, num_layers=layers))
    graphdef, abs_state = nnx.split(abstract_model(type(vision), cfg))
    full = dict(nnx.to_flat_state(nnx.state(vision)))
    flat = [(p, v.replace(full[p].get_value()[:layers] if "layers" in p else full[p].get_value()))
            for p, v in nnx.to_flat_state(abs_state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def our_logits(out_dir, tower, ids, pixels):
    """Llava's forward from our parts: GenLLaVA.embed_inputs splices the projected features into the tokens."""
    vision = checkpoint.load_module(out_dir / "vision")
    projector, llm = checkpoint.load_module(out_dir / "projector"), checkpoint.load_module(out_dir / "llm")
    image = jnp.asarray(pixels.transpose(0, 2, 3, 1))
    if tower == "siglip":
        tower_fn = vision
    else:  # LLaVA-1.5: CLIP's hidden_states[-2] without the class token
        short = truncated_clip(vision, vision.cfg.vision.num_layers - 1)
        tower_fn = lambda x: types.SimpleNamespace(features=short.encode_image(x).last_hidden_state[:, 1:])  # noqa
    half = types.SimpleNamespace(vision=tower_fn, projector=projector, llm=llm,
                                 cfg=types.SimpleNamespace(image_token_id=IMAGE_TOKEN))
    embeds = GenLLaVA.embed_inputs(half, jnp.asarray(ids), image, jnp.ones(len(ids), bool))
    return np.asarray(llm(inputs_embeds=embeds).logits)


@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_llava_round_trip_gives_llavas_logits(tower, tmp_path):
    model, path = llava(tower, tmp_path)
    ids, pixels = inputs()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()

    assert llava_cli(["--from-hf", str(path), "--out", str(tmp_path / "ours")]) == 0
    kept = json.loads((tmp_path / "ours" / "llava.json").read_text())
    assert kept["image_token_index"] == IMAGE_TOKEN and kept["vision_feature_layer"] == -2
    parts = {d: json.loads((tmp_path / "ours" / d / "config.json").read_text())["part"]
             for d in ("vision", "projector", "llm")}
    assert parts == {"vision": tower, "projector": "projector", "llm": "mistral"}
    assert_close(our_logits(tmp_path / "ours", tower, ids, pixels), ref, what=f"logits from our parts [{tower}]")

    assert llava_cli(["--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back"),
                      "--max-shard-size", str(50_000 / 2**30)]) == 0
    back, info = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "back"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        out = back.eval()(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
    np.testing.assert_array_equal(out, ref)
    # transformers 5 writes the tower without `vision_model.`; we write llava-hf's layout, which it reads too
    source, exported = ({k.replace("vision_tower.vision_model.", "vision_tower."): v
                         for f in sorted(p.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
                        for p in (path, tmp_path / "back"))
    dropped = {k for k in source if ".head." in k}  # SigLIP's pooling head: LLaVA never uses it, we do not keep it
    assert bool(dropped) == (tower == "siglip")
    assert exported.keys() == source.keys() - dropped
    for key, t in exported.items():
        assert torch.equal(t, source[key]), key


def test_unsupported_llava_configs_are_refused_by_name(tmp_path, capsys):
    _, path = llava("siglip", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    capsys.readouterr()  # save_pretrained's progress bar
    for change, text in ((dict(vision_feature_select_strategy="default"), "vision_feature_select_strategy"),
                         (dict(vision_feature_layer=[-2, -1]), "vision_feature_layer"),
                         (dict(projector_hidden_act="relu"), "GELU")):
        (path / "config.json").write_text(json.dumps({**cfg, **change}))
        assert errors.guard(llava_cli, ["--from-hf", str(path), "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert text in err and str(path / "config.json") in err and err.count("\n") == 1, err
        assert not (tmp_path / "x").exists()
