"""Q-former and generation head against transformers.Blip2QFormerModel on small random configs (float32)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2QFormerModel

from convert import qformer as conv
from convert.__main__ import main as convert_cli
from convert.common import ConversionError
from genllava_jax import checkpoint, sharding as shd
from genllava_jax.models.qformer import TINY_HEAD, QFormerConfig, QFormerHead, QFormerHeadConfig
from oracle import assert_close, save_hf

CONFIGS = {
    # cross-attention in every layer, encoder narrower than the queries
    "freq1": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  encoder_hidden_size=24, cross_attention_frequency=1),
    # BLIP-2's pattern: cross-attention in layers 0 and 2 only; 6 heads, encoder wider than the queries
    "freq2": dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=6, intermediate_size=80,
                  encoder_hidden_size=40, cross_attention_frequency=2, layer_norm_eps=1e-6),
    # 3 layers at frequency 2: cross-attention in layers 0 and 2, a last group of one layer after the scanned one
    "freq2_odd": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                      encoder_hidden_size=24, cross_attention_frequency=2),
}


def perturb(model, seed):
    """HF initialises biases to 0 and LayerNorms to 1: add noise so every tensor's conversion matters."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def hf_qformer(tmp_path, name, seed=0):
    torch.manual_seed(seed)
    model = perturb(Blip2QFormerModel(Blip2QFormerConfig(**CONFIGS[name])), seed + 1)
    return model, save_hf(model, tmp_path / f"hf_{name}")


def inputs(cfg, B=2, Q=5, S=7, seed=0):
    rng = np.random.RandomState(seed)
    q = rng.randn(B, Q, cfg["hidden_size"]).astype(np.float32)
    enc = rng.randn(B, S, cfg["encoder_hidden_size"]).astype(np.float32)
    mask = np.ones((B, S), np.int64)
    mask[1, 4:] = 0  # the second row attends to its first 4 encoder states only
    return q, enc, mask


def hf_out(model, q, enc, mask=None):
    kw = {} if mask is None else {"encoder_attention_mask": torch.tensor(mask)}
    return model(query_embeds=torch.as_tensor(q), encoder_hidden_states=torch.as_tensor(enc), **kw).last_hidden_state


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, *args):
    return nnx.merge(graphdef, state)(*args)


def run(model, *args):
    """model(*args), jitted (eager dispatch of every small op is what makes tests slow)."""
    return _apply(*nnx.split(model), *args)


def random_head(cfg=TINY_HEAD, seed=0) -> QFormerHead:
    """Our head with every parameter random (biases and norms too), without compiling an initialiser."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: QFormerHead(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.RandomState(seed)
    return nnx.merge(graphdef, jax.tree.map(lambda a: jnp.asarray(0.2 * rng.randn(*a.shape), a.dtype), state))


def grads(model, w, args, argnums):
    """d <model(*args), w> / d args[argnums], jitted."""
    graphdef, state = nnx.split(model)
    loss = lambda *a: jnp.sum(nnx.merge(graphdef, state)(*a) * w)
    return jax.jit(jax.grad(loss, argnums))(*args)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_hf_with_and_without_encoder_mask(tmp_path, name):
    model, path = hf_qformer(tmp_path, name)
    ours = conv.from_hf(path)
    q, enc, mask = inputs(CONFIGS[name])
    with torch.no_grad():
        ref, ref_masked = hf_out(model, q, enc).numpy(), hf_out(model, q, enc, mask).numpy()
    assert np.abs(ref - ref_masked).max() > 1e-2  # the mask matters for this input
    assert_close(run(ours, q, enc), ref, what=f"{name} unmasked")
    assert_close(run(ours, q, enc, mask), ref_masked, what=f"{name} masked")


def test_remat_and_unrolled_layers_give_same_output(tmp_path):
    _, path = hf_qformer(tmp_path, "freq2")
    q, enc, mask = inputs(CONFIGS["freq2"])
    base = run(conv.from_hf(path), q, enc, mask)
    for kw in (dict(remat="full"), dict(remat="dots_saveable", scan=False)):
        np.testing.assert_allclose(run(conv.from_hf(path, **kw), q, enc, mask), base, atol=1e-5, err_msg=str(kw))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_grad_wrt_encoder_states_matches_torch(tmp_path, name):
    model, path = hf_qformer(tmp_path, name, seed=2)
    ours = conv.from_hf(path)
    q, enc, mask = inputs(CONFIGS[name], seed=2)
    w = np.random.RandomState(3).randn(*q.shape).astype(np.float32)  # loss = <out, w>: every output counts
    enc_t = torch.tensor(enc, requires_grad=True)
    (hf_out(model, q, enc_t, mask) * torch.tensor(w)).sum().backward()
    grad = grads(ours, w, (q, enc, mask), 1)
    assert_close(grad, enc_t.grad.numpy(), what=f"d loss / d encoder states [{name}]")
    assert np.all(np.asarray(grad)[1, 4:] == 0)  # masked states get no gradient


@pytest.mark.parametrize("name", ["freq2", "freq2_odd"])
def test_round_trip_reloads_strictly_with_identical_outputs(tmp_path, name):
    model, path = hf_qformer(tmp_path, name)
    out_dir = tmp_path / "back"
    conv.to_hf(conv.from_hf(path), out_dir, max_shard_bytes=30_000)  # small shards: the index on both sides
    assert (out_dir / "model.safetensors.index.json").exists()
    back, info = Blip2QFormerModel.from_pretrained(str(out_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    q, enc, mask = inputs(CONFIGS[name])
    with torch.no_grad():
        np.testing.assert_array_equal(hf_out(back.eval(), q, enc, mask).numpy(), hf_out(model, q, enc, mask).numpy())


# ---------------------------------------------------------------------------------------------------------------
# Full BLIP-2 checkpoints and the generation head


def tiny_blip2(tmp_path):
    """A BLIP-2 with the text FFN in its Q-former layers (use_qformer_text_input), a vision tower and an OPT."""
    torch.manual_seed(0)
    cfg = Blip2Config(
        vision_config=dict(hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        qformer_config={**CONFIGS["freq2"], "use_qformer_text_input": True},
        text_config=dict(model_type="opt", vocab_size=50, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                         num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=64),
        num_query_tokens=6)
    model = perturb(Blip2ForConditionalGeneration(cfg), 1)
    return model, save_hf(model, tmp_path / "blip2")


def test_loads_qformer_and_query_tokens_from_full_blip2_checkpoint(tmp_path):
    model, path = tiny_blip2(tmp_path)
    head = conv.from_hf(path)
    assert isinstance(head, QFormerHead) and head.in_proj is None and head.out_proj is None
    assert head.cfg.encoder_hidden_size == 24 and head.cfg.num_query_tokens == 6  # from the vision width
    np.testing.assert_array_equal(head.query_tokens.get_value(), model.query_tokens.detach().numpy())
    _, enc, mask = inputs({"hidden_size": 48, "encoder_hidden_size": 24})
    with torch.no_grad():
        ref = hf_out(model.qformer, model.query_tokens.expand(2, -1, -1).numpy(), enc, mask).numpy()
    assert_close(run(head, enc, np.zeros_like(enc), mask), ref, what="BLIP-2 query output")
    with pytest.raises(ConversionError, match=r"gen_head\.out_proj\.weight"):  # asked for a linear it lacks
        conv.from_hf(path, out_dim=16)


def torch_head(path):
    """The head in torch from our export (convert.torch_genllava's: a Blip2QFormerModel loaded strictly from
    `qformer.*`, plus the linears), after checking the export's keys."""
    from safetensors.torch import load_file

    from convert.torch_genllava import TorchHead

    sd = load_file(str(path / "model.safetensors"))
    assert set(sd) - {k for k in sd if k.startswith("qformer.")} == {
        "query_tokens", "gen_head.in_proj.weight", "gen_head.in_proj.bias", "gen_head.out_proj.weight",
        "gen_head.out_proj.bias"}
    return TorchHead(path).eval()


def test_head_matches_torch_and_passes_gradient_to_states_and_embeddings(tmp_path):
    head = random_head()
    conv.to_hf(head, tmp_path / "head")
    ref_head = torch_head(tmp_path / "head")
    rng = np.random.RandomState(0)
    hidden, embeds = (rng.randn(2, 4, TINY_HEAD.llm_hidden_size).astype(np.float32) for _ in range(2))
    w = rng.randn(2, TINY_HEAD.num_query_tokens, TINY_HEAD.out_dim).astype(np.float32)
    h_t, e_t = torch.tensor(hidden, requires_grad=True), torch.tensor(embeds, requires_grad=True)
    ref = ref_head(h_t, e_t)
    (ref * torch.tensor(w)).sum().backward()

    out = run(head, hidden, embeds)
    assert out.shape == (2, TINY_HEAD.num_query_tokens, TINY_HEAD.out_dim)
    assert_close(out, ref.detach().numpy(), what="head output")
    g_h, g_e = grads(head, w, (hidden, embeds), (0, 1))
    assert np.abs(np.asarray(g_h)).min() > 0 and np.abs(np.asarray(g_e)).min() > 0  # every [IMG] input learns
    assert_close(g_h, h_t.grad.numpy(), what="d loss / d LLM states")
    assert_close(g_e, e_t.grad.numpy(), what="d loss / d [IMG] input embeddings")
    # and the export reads back into ours
    np.testing.assert_array_equal(run(conv.from_hf(tmp_path / "head"), hidden, embeds), out)


def test_7b_head_maps_img_states_to_sd_conditioning_shape():
    cfg = QFormerHeadConfig()
    abstract = nnx.eval_shape(lambda: QFormerHead(cfg, rngs=nnx.Rngs(0)))
    assert abstract.in_proj is None  # Mistral-7B's 4096-d states are the Q-former's encoder width
    graphdef, state = nnx.split(abstract)
    x = jax.ShapeDtypeStruct((2, 16, 4096), jnp.float32)
    out = jax.eval_shape(lambda s, h, e: nnx.merge(graphdef, s)(h, e), state, x, x)
    assert out.shape == (2, 77, 768)
    with pytest.raises(ValueError, match="cross_attention_frequency"):
        QFormerConfig(num_layers=3, cross_attention_frequency=0)


def test_checkpoint_and_cli_round_trip_of_the_head(tmp_path):
    head = random_head(seed=1)
    checkpoint.save_module(tmp_path / "ours", head, "qformer")
    assert convert_cli(["qformer", "--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 0
    assert convert_cli(["qformer", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "again")]) == 0
    back = checkpoint.load_module(tmp_path / "again")
    x = np.random.RandomState(0).randn(2, 4, TINY_HEAD.llm_hidden_size).astype(np.float32)
    np.testing.assert_array_equal(run(back, x, x), run(head, x, x))


def test_sharded_head_equals_single_device_with_parameters_split(tmp_path):
    mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
    plain = random_head(seed=2)
    conv.to_hf(plain, tmp_path / "head")

    rng = np.random.RandomState(0)
    hidden, embeds = (rng.randn(4, 6, TINY_HEAD.llm_hidden_size).astype(np.float32) for _ in range(2))
    mask = np.ones((4, 6), bool)
    mask[2, 3:] = False
    graphdef, state = nnx.split(plain)
    fwd = jax.jit(lambda s, h, e, m: nnx.merge(graphdef, s)(h, e, m))
    single = fwd(state, hidden, embeds, mask)
    batch = NamedSharding(mesh, shd.logical_to_spec(("batch", "length"), mask.shape, mesh))
    put = lambda a: jax.device_put(a, batch)
    for model in (shd.shard_module(plain, mesh), conv.from_hf(tmp_path / "head", mesh=mesh)):
        with jax.set_mesh(mesh):
            out = fwd(nnx.state(model), put(hidden), put(embeds), put(mask))
        np.testing.assert_allclose(out, single, atol=2e-5, rtol=1e-5)
        q = model.qformer.groups.layers[0].cross_attn.q.kernel.get_value()
        assert q.sharding.spec == P(None, "fsdp", "tensor", None)
        assert q.addressable_shards[0].data.shape == (2, 8, 2, 8)  # really split: embed over 4, heads over 2
        k = model.qformer.groups.layers[0].fc1.kernel.get_value()
        assert k.sharding.spec == P(None, "fsdp", "tensor") and k.addressable_shards[0].data.size < k.size
