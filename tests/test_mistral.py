"""Mistral against transformers.MistralForCausalLM on small random configs (float32)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import MistralConfig as HFConfig, MistralForCausalLM

from convert import mistral as conv
from convert.common import ConversionError
from genllava_jax.models.mistral import generate
from oracle import assert_close, save_hf

CONFIGS = {
    # GQA ratio 1, tied head, the classic theta
    "mha_tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True, rope_theta=1e4),
    # GQA ratio 2, sliding window shorter than the sequence, theta != 1e4
    "gqa2_window": dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=5, rope_theta=5e5),
    # GQA ratio 4, untied, Mistral v0.2's theta, head_dim not hidden/heads
    "gqa4_v02": dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=1e6, head_dim=16),
}


def hf_model(tmp_path, seed=0, **kw):
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=8,
                sliding_window=None, tie_word_embeddings=False, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(seed)
    model = MistralForCausalLM(HFConfig(**{**base, **kw})).eval()
    return model, save_hf(model, tmp_path / "hf")


def padded_batch(rng, vocab=97, T=12):
    ids = rng.randint(1, vocab, (3, T))
    mask = np.ones((3, T), np.int64)
    mask[1, 8:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    return ids, mask


def hf_logits(model, ids, mask, positions=None):
    with torch.no_grad():
        kw = {} if positions is None else {"position_ids": torch.tensor(positions)}
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask), **kw).logits.numpy()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_hf(tmp_path, name):
    model, path = hf_model(tmp_path, **CONFIGS[name])
    ours = conv.from_hf(path)
    ids, mask = padded_batch(np.random.RandomState(0))
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    ref = hf_logits(model, ids, mask, positions)
    out = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask), positions=jnp.asarray(positions)).logits)
    valid = mask.astype(bool)  # padded query rows are undefined in both
    assert_close(out[valid], ref[valid], what=f"logits[{name}]")


def test_remat_and_unrolled_layers_give_same_logits(tmp_path):
    _, path = hf_model(tmp_path, **CONFIGS["gqa2_window"])
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 97, (2, 10)))
    base = conv.from_hf(path)(ids).logits
    for kw in (dict(remat="full"), dict(scan=False), dict(remat="dots_saveable", scan=False)):
        np.testing.assert_allclose(conv.from_hf(path, **kw)(ids).logits, base, atol=1e-6, err_msg=str(kw))


def test_cached_prefill_and_decode_equal_full_forward(tmp_path):
    _, path = hf_model(tmp_path, **CONFIGS["gqa2_window"])
    ours = conv.from_hf(path)
    ids = jnp.asarray(np.random.RandomState(2).randint(0, 97, (2, 11)))
    full = ours(ids).logits
    out = ours(ids[:, :7], cache=ours.init_cache(2, 16))
    steps = [out.logits]
    cache = out.cache
    for t in range(7, 11):
        out = ours(ids[:, t:t + 1], cache=cache)
        steps.append(out.logits)
        cache = out.cache
    assert_close(jnp.concatenate(steps, axis=1), full, what="cached logits")


@pytest.mark.parametrize("name", ["gqa2_window", "gqa4_v02"])
def test_greedy_generation_matches_hf_generate(tmp_path, name):
    model, path = hf_model(tmp_path, seed=3, **CONFIGS[name])
    ours = conv.from_hf(path)
    prompt = np.random.RandomState(3).randint(1, 97, (2, 9))
    mask = np.ones_like(prompt)
    mask[0, :3] = 0  # left-padded, as generation needs
    prompt[0, :3] = 0
    with torch.no_grad():
        ref = model.generate(torch.tensor(prompt), attention_mask=torch.tensor(mask), max_new_tokens=32,
                             do_sample=False, eos_token_id=None, pad_token_id=0)[:, prompt.shape[1]:].numpy()
    out = np.asarray(generate(ours, prompt, mask, max_new_tokens=32))
    np.testing.assert_array_equal(out, ref)


def test_generation_stops_rows_at_eos_and_samples_with_temperature(tmp_path):
    _, path = hf_model(tmp_path, **CONFIGS["gqa2_window"])
    ours = conv.from_hf(path)
    prompt = np.random.RandomState(4).randint(1, 97, (2, 6))
    greedy = np.asarray(generate(ours, prompt, max_new_tokens=8))
    eos = int(greedy[0, 2])
    stopped = np.asarray(generate(ours, prompt, max_new_tokens=8, eos_id=eos, pad_id=-1))
    first = int(np.argmax(greedy[0] == eos))
    np.testing.assert_array_equal(stopped[0, :first + 1], greedy[0, :first + 1])
    assert (stopped[0, first + 1:] == -1).all()
    a = generate(ours, prompt, max_new_tokens=8, temperature=1.0, rng=jax.random.key(0))
    b = generate(ours, prompt, max_new_tokens=8, temperature=1.0, rng=jax.random.key(0))
    c = generate(ours, prompt, max_new_tokens=8, temperature=1.0, top_p=0.5, rng=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert c.shape == (2, 8) and int(c.min()) >= 0 and int(c.max()) < 97


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_reloads_strictly_with_identical_logits(tmp_path, tied):
    model, path = hf_model(tmp_path, tie_word_embeddings=tied, num_key_value_heads=2, num_attention_heads=4)
    ours = conv.from_hf(path)
    out_dir = tmp_path / "back"
    conv.to_hf(ours, out_dir, max_shard_bytes=20_000)  # small shards: exercises the index on both sides
    assert (out_dir / "model.safetensors.index.json").exists()
    back, info = MistralForCausalLM.from_pretrained(str(out_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask = padded_batch(np.random.RandomState(5))
    np.testing.assert_array_equal(hf_logits(back.eval(), ids, mask), hf_logits(model, ids, mask))
    # and the sharded export reads back into ours
    again = conv.from_hf(out_dir)
    np.testing.assert_array_equal(again(jnp.asarray(ids)).logits, ours(jnp.asarray(ids)).logits)


def test_bfloat16_checkpoint_loads_into_float32_and_bfloat16(tmp_path):
    model, _ = hf_model(tmp_path, **CONFIGS["gqa2_window"])
    path = save_hf(model.to(torch.bfloat16), tmp_path / "bf16")
    ours32 = conv.from_hf(path)
    ours16 = conv.from_hf(path, param_dtype="bfloat16", dtype="bfloat16")
    assert ours32.layers.q.kernel.get_value().dtype == jnp.float32
    assert ours16.layers.q.kernel.get_value().dtype == jnp.bfloat16
    ids = jnp.asarray(np.random.RandomState(6).randint(0, 97, (1, 8)))
    l32, l16 = ours32(ids).logits, ours16(ids).logits.astype(jnp.float32)
    assert_close(l16, l32, rel=5e-2, what="bf16 logits")


def _rewrite(path, edit):
    from safetensors.numpy import load_file, save_file
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def test_bad_checkpoints_name_the_key(tmp_path):
    _, path = hf_model(tmp_path, **CONFIGS["gqa2_window"])
    key = "model.layers.1.mlp.up_proj.weight"
    _rewrite(path, lambda t: t.pop(key))
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        conv.from_hf(path)
    _, path = hf_model(tmp_path / "b", **CONFIGS["gqa2_window"])
    _rewrite(path, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ConversionError, match=r"unexpected.*model\.layers\.0\.extra\.weight"):
        conv.from_hf(path)
    _, path = hf_model(tmp_path / "c", **CONFIGS["gqa2_window"])
    _rewrite(path, lambda t: t.update({key: np.zeros((64, 31), np.float32)}))
    with pytest.raises(ConversionError, match=key.replace(".", r"\.") + r".*\(64, 31\)"):
        conv.from_hf(path)
    (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:100])
    with pytest.raises(ConversionError, match="model.safetensors"):
        conv.from_hf(path)


def test_unsupported_config_is_refused(tmp_path):
    _, path = hf_model(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="yarn"):
        conv.from_hf(path)
