"""The joint model and its one jitted train step: loss goes down, gradients reach what they must, frozen parts stay
frozen, sharded equals single-device, and a resumed run continues exactly."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from micro import fast_compile, fixed_batch, load_config_file, logged_losses, metric_rows, micro_config, single_mesh

from genllava_jax import sharding as shd, train


def test_train_steps_lower_the_loss_and_leave_frozen_parts_bit_identical(built):
    c, cfg, tokenizer, fresh = built
    mesh = single_mesh()
    state, s = train.setup(fresh(), c.train, mesh)
    frozen_before = jax.tree.map(np.array, s.frozen)
    assert {p[0] for p, _ in nnx.to_flat_state(s.frozen)} == {"vae"}  # the tiny config trains all but the VAE
    step = train.jit_train_step(s)
    batch = train.to_global(fixed_batch(c, tokenizer), s)
    losses = []
    with jax.set_mesh(mesh):
        for _ in range(6):
            state, metrics = step(state, s.frozen, batch)
            losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.8 * losses[0], losses
    assert float(metrics["mse"]) > 0 and float(metrics["images"]) > 0
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(s.frozen)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_diffusion_loss_reaches_qformer_img_embeddings_and_llm(built):
    c, cfg, tokenizer, fresh = built
    model = fresh()
    batch = {k: jnp.asarray(v) for k, v in fixed_batch(c, tokenizer).items()}
    assert bool(batch["has_target"].any())
    graphdef, params = nnx.split(model, nnx.Param)
    grads = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p).loss(batch, jax.random.key(0))[1]["mse"]))(params)
    norm = lambda tree: float(optax.global_norm(tree))
    assert norm(grads["head"]) > 0
    assert norm(grads["llm"]["layers"]) > 0
    emb = np.asarray(grads["llm"]["embed"]["embedding"].get_value())
    assert np.abs(emb[list(cfg.img_token_ids)]).sum() > 0  # the [IMG] token embeddings learn from the diffusion loss
    assert norm(grads["vae"]) == 0  # latents are computed under stop_gradient


def test_sharded_train_step_equals_single_device(built):
    c, cfg, tokenizer, fresh = built
    batch = fixed_batch(c, tokenizer)

    def losses(mesh):
        model = shd.shard_module(fresh(), mesh)
        state, s = train.setup(model, c.train, mesh)
        step = train.jit_train_step(s)
        out = []
        with jax.set_mesh(mesh):
            for _ in range(3):
                state, metrics = step(state, s.frozen, train.to_global(batch, s))
                out.append(float(metrics["loss"]))
        return out, state

    single, _ = losses(single_mesh())
    sharded, state = losses(shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)
    kernel = state["params"]["llm"]["layers"]["up"]["kernel"].get_value()
    assert kernel.addressable_shards[0].data.size < kernel.size  # really sharded


@pytest.mark.slow
@fast_compile()
def test_resumed_run_continues_exactly(data_dir, tmp_path, monkeypatch):
    c = micro_config(data_dir)
    built, jit_eval_step = [], train.jit_eval_step
    monkeypatch.setattr(train, "jit_eval_step", lambda s: built.append(jit_eval_step(s)) or built[-1])
    mesh = single_mesh()
    straight = c.copy_and_resolve_references()
    straight.data.eval_path = str(data_dir / "eval.jsonl")
    straight.train.update(eval_every=3, eval_batches=1, sample_every=6, profile_steps=(2, 3))
    straight.sample.num_steps = 2
    train.run(straight, tmp_path / "straight", mesh=mesh)
    assert [r["step"] for r in metric_rows(tmp_path / "straight") if "eval/ce" in r] == [3, 6]
    rows = [r for r in metric_rows(tmp_path / "straight") if "loss" in r]
    assert all(r["model_flops_per_step"] > 0 for r in rows)  # the analytic count, and MFU from the step times
    assert all(0 < r["mfu"] < 1 and 0 < r["step_time_p50"] <= r["step_time_max"] for r in rows[1:]), rows
    assert list((tmp_path / "straight" / "profile").rglob("*.xplane.pb"))  # train.profile_steps
    assert len(built) == 1 and built[0]._cache_size() == 1  # two evaluations, one compilation
    assert (tmp_path / "straight" / "samples" / "step_0000006.png").exists()
    assert list((tmp_path / "straight" / "tb").iterdir())  # TensorBoard events
    train.run(c, tmp_path / "resumed", mesh=mesh, stop_after=3)  # "killed" after the step-3 checkpoint
    assert len(logged_losses(tmp_path / "resumed")) == 3
    train.run(c, tmp_path / "resumed", mesh=mesh)
    straight, resumed = logged_losses(tmp_path / "straight"), logged_losses(tmp_path / "resumed")
    assert len(straight) == 6 and len(resumed) == 6
    assert resumed == straight  # same data order, same rng, same state: bit-identical losses
    model, cfg = train.load_trained(tmp_path / "resumed", mesh)
    assert cfg.llm.num_layers == 2 and model.llm.layers.up.kernel.get_value().shape[0] == 2
    # load_trained reads the params alone; they equal those of the whole saved train state
    saved = ocp.StandardCheckpointer().restore((tmp_path / "resumed" / "checkpoints" / "6" / "state").absolute())
    loaded = jax.tree.leaves(nnx.state(model, train.trainable_filter(c.train.trainable)))
    assert len(loaded) == len(jax.tree.leaves(saved["params"])) and "opt" in saved
    assert all(np.array_equal(a, b) for a, b in zip(loaded, jax.tree.leaves(saved["params"])))


def test_config_mismatches_fail_at_start_with_what_to_change(data_dir):
    c = micro_config(data_dir)
    c.data.num_patches = 5
    with pytest.raises(ValueError, match="data.num_patches=4"):
        train.build(c, single_mesh())
    c = micro_config(data_dir)
    c.model.head.out_dim = 12
    with pytest.raises(ValueError, match="head.out_dim != unet.cross_attention_dim"):
        train.build(c, single_mesh())


@pytest.mark.slow
def test_7b_config_builds_the_papers_model_abstractly(data_dir):
    """configs/genllava_7b.py: shapes only (nnx.eval_shape), with the parameter counts of the published parts."""
    from genllava_jax.data.tokenizer import load_tokenizer
    from genllava_jax.models.genllava import GenLLaVA

    c = load_config_file("genllava_7b")
    c.data.tokenizer = str(data_dir / "tokenizer")
    cfg = train.model_config(c, load_tokenizer(c.data.tokenizer, c.data.num_img_tokens))
    model = nnx.eval_shape(lambda: GenLLaVA(cfg, rngs=nnx.Rngs(0)))
    count = lambda m: sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(m, nnx.Param)))
    assert abs(count(model.llm) - 7.24e9) < 0.01e9  # Mistral-7B
    assert abs(count(model.vision) - 0.413e9) < 0.002e9  # SigLIP So400m vision tower without its MAP head
    assert abs(count(model.unet) - 0.860e9) < 0.005e9  # SD v1.4 UNet
    assert abs(count(model.vae) - 0.0838e9) < 0.001e9  # SD VAE
    assert model.null_cond.get_value().shape == (77, 768)
    assert cfg.num_patches == 729


def test_latent_concat_editing_mode_feeds_source_latents_to_an_8_channel_unet(built):
    """Shapes only (jax.eval_shape): the InstructPix2Pix/MGIE mode wires source latents into the UNet input."""
    c, cfg, tokenizer, _ = built
    from genllava_jax.models.genllava import GenLLaVA

    with pytest.raises(ValueError, match="unet.in_channels must be 8"):
        cfg.replace(edit_mode="latent_concat")
    ip2p = cfg.replace(edit_mode="latent_concat", unet=cfg.unet.replace(in_channels=8))
    model = nnx.eval_shape(lambda: GenLLaVA(ip2p, rngs=nnx.Rngs(0)))
    assert model.unet.conv_in.kernel.get_value().shape[2] == 8
    batch = fixed_batch(c, tokenizer)
    graphdef, state = nnx.split(model)
    loss, metrics = jax.eval_shape(lambda s, b: nnx.merge(graphdef, s).loss(b, jax.random.key(0)), state, batch)
    assert loss.shape == () and metrics["mse"].shape == ()


@pytest.mark.slow
@fast_compile()
def test_latent_concat_training_starts_from_a_converted_sd_unet(data_dir, tmp_path):
    """init.unet from a text-to-image UNet converted with `python -m convert unet` widens conv_in to 8 channels (new
    ones zero: it starts as pretrained) and trains; an InstructPix2Pix UNet (8 channels already) loads as it is."""
    import torch
    from diffusers import UNet2DConditionModel

    from convert.__main__ import main as convert_cli
    from genllava_jax import checkpoint
    from genllava_jax.data.tokenizer import load_tokenizer

    c = micro_config(data_dir)
    c.model.update(edit_mode="latent_concat", diffusion_rows=0)
    c.model.unet.in_channels = 8
    cfg = train.model_config(c, load_tokenizer(c.data.tokenizer, c.data.num_img_tokens))
    for channels in (8, 4):
        torch.manual_seed(channels)
        hf = UNet2DConditionModel.from_config(cfg.unet.replace(in_channels=channels).to_hf())
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(0.1 * torch.randn_like(p))  # diffusers zero-initialises conv_out: make every tensor count
        hf.save_pretrained(str(tmp_path / f"hf{channels}"))
        assert convert_cli(["unet", "--from-hf", str(tmp_path / f"hf{channels}"),
                            "--out", str(tmp_path / f"unet{channels}")]) == 0
        c.init = dict(unet=str(tmp_path / f"unet{channels}"))
        if channels == 8:
            _, model, tokenizer, mesh = train.build(c, single_mesh())
        else:  # what build does after building (a second build costs a model initialisation): init.unet over it
            train.init_parts(model, c.init, mesh)
        ours = checkpoint.load_module(tmp_path / f"unet{channels}")
        kernel = np.asarray(model.unet.conv_in.kernel.get_value())
        assert kernel.shape[2] == 8
        np.testing.assert_array_equal(kernel[:, :, :channels], np.asarray(ours.conv_in.kernel.get_value()))
        assert not kernel[:, :, channels:].any()  # widened: the source-latent channels start at zero
        np.testing.assert_array_equal(np.asarray(model.unet.conv_out.kernel.get_value()),
                                      np.asarray(ours.conv_out.kernel.get_value()))

    # the widened one (built last) trains: editing rows reach the new channels through the source latents
    state, s = train.setup(model, c.train, mesh)
    step = train.jit_train_step(s)
    batch = fixed_batch(c, tokenizer, n=16)
    assert (batch["has_target"] & (np.abs(batch["source_image"]).reshape(16, -1).sum(1) > 0)).any()
    with jax.set_mesh(mesh):
        for _ in range(2):
            state, metrics = step(state, s.frozen, train.to_global(batch, s))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["mse"]) > 0
    new = np.asarray(state["params"]["unet"]["conv_in"]["kernel"].get_value())[:, :, 4:]
    assert np.abs(new).sum() > 0


def test_diffusion_repeats_equal_duplicatedmetric_rows(built):
    """repeats=2 gives the loss of a batch whose rows are each duplicated (same noise draws, no condition dropout)."""
    c, cfg, tokenizer, fresh = built
    model = fresh()
    batch = {k: np.asarray(v) for k, v in fixed_batch(c, tokenizer, n=4).items() if not k.startswith("_")}
    dup = {k: np.repeat(v, 2, axis=0) for k, v in batch.items()}

    def loss(b, **kw):  # jitted: op-by-op the loss takes a minute
        model.cfg = cfg.replace(cond_drop_prob=0.0, **kw)
        graphdef, state = nnx.split(model)
        return jax.jit(lambda s: nnx.merge(graphdef, s).loss(b, jax.random.key(1)))(state)

    loss_rep, m_rep = loss(batch, diffusion_repeats=2)
    loss_dup, m_dup = loss(dup, diffusion_repeats=1)
    np.testing.assert_allclose(float(loss_rep), float(loss_dup), rtol=1e-5)
    np.testing.assert_allclose(float(m_rep["mse"]), float(m_dup["mse"]), rtol=1e-5)
    assert float(m_rep["images"]) == batch["has_target"].sum() and float(m_dup["images"]) == 2 * float(m_rep["images"])


def test_vocab_tiled_cross_entropy_gives_the_plain_loss_and_gradients(built):
    """The joint loss's token losses with ce_vocab_tile=16 (the tiles do not divide the vocabulary) and with the
    whole logits: same CE, predictions and gradients into the LLM (its head included) and the hidden states."""
    c, cfg, tokenizer, fresh = built
    model = fresh()
    assert cfg.llm.vocab_size % 16
    r = np.random.default_rng(0)
    hidden = jnp.asarray(r.normal(size=(2, 7, cfg.llm.hidden_size)), jnp.float32)
    labels = jnp.asarray(r.integers(0, cfg.llm.vocab_size, (2, 7)))

    def run(tile):
        model.cfg = cfg.replace(ce_vocab_tile=tile)
        graphdef, state = nnx.split(model)

        def f(s, h):
            ce, pred = nnx.merge(graphdef, s).token_losses(h, labels)
            return ce.sum(), (ce, pred)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(state, hidden)

    (_, (ce_t, pred_t)), g_t = run(16)
    (_, (ce_p, pred_p)), g_p = run(0)
    np.testing.assert_allclose(ce_t, ce_p, rtol=1e-5)
    np.testing.assert_array_equal(pred_t, pred_p)
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_p))
    for a, b in zip(jax.tree.leaves(g_t), jax.tree.leaves(g_p)):
        np.testing.assert_allclose(a, b, atol=1e-5 * scale)


def test_lr_scales_multiply_the_learning_rate_of_matching_params():
    class Two(nnx.Module):
        def __init__(self, rngs):
            self.vision, self.llm = nnx.Linear(3, 4, rngs=rngs), nnx.Linear(3, 4, rngs=rngs)

    params = nnx.state(Two(nnx.Rngs(0)), nnx.Param)
    grads = jax.tree.map(jnp.ones_like, params)
    c = micro_config(Path("."))
    c.train.update(steps=10, warmup_steps=0, grad_clip=0.0, weight_decay=0.0, lr_scales=())  # tiny.py has some
    plain, _ = train.make_optimizer(c.train)
    c.train.lr_scales = (("vision/kernel$", 3.0), ("vision/.*", 0.5))
    scaled, _ = train.make_optimizer(c.train)
    u0 = plain.update(grads, plain.init(params), params)[0]
    u1 = scaled.update(grads, scaled.init(params), params)[0]
    assert np.any(np.asarray(u0["vision"]["kernel"][...]) != 0)
    np.testing.assert_allclose(u1["vision"]["kernel"][...], 3.0 * u0["vision"]["kernel"][...], rtol=1e-6)
    np.testing.assert_allclose(u1["vision"]["bias"][...], 0.5 * u0["vision"]["bias"][...], rtol=1e-6)  # first match
    np.testing.assert_array_equal(u1["llm"]["kernel"][...], u0["llm"]["kernel"][...])
    from genllava_jax import config_check

    bad = c.to_dict()
    bad["train"]["lr_scales"] = 3.0
    with pytest.raises(ValueError, match="train.lr_scales=3.0 is a float"):
        config_check.validate(bad)
