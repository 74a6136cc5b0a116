"""LoRA (genllava_jax.lora, convert/lora.py): trained in the one jitted step with the base kernels frozen, sharded by
the rules, merged into the kernels, exported as a PEFT adapter that `peft` loads onto the exported base with the same
logits (small random Mistral from transformers; also diffusers' UNet and the Q-former head), and PEFT adapters
imported back."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from micro import logged_losses, micro_config, single_mesh
from oracle import assert_close, save_hf
from safetensors import safe_open
from transformers import MistralConfig as HFConfig, MistralForCausalLM

from convert import lora as peft_io, mistral as conv, qformer as head_conv, unet as unet_conv
from convert.common import ConversionError
from genllava_jax import checkpoint, config_check, errors, flops, lora, sharding as shd, train
from genllava_jax.models.mistral import Mistral, MistralConfig

HF = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, head_dim=8, sliding_window=None, tie_word_embeddings=False, pad_token_id=0,
          eos_token_id=None, rope_theta=1e6)
PEFT_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = np.random.RandomState(0).randint(1, 97, (2, 9))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_hf(MistralForCausalLM(HFConfig(**HF)).eval(), tmp_path_factory.mktemp("mistral") / "hf")


def randomize(module, seed=0, scale=0.3):
    """Non-zero B (and a fresh A): a trained adapter, not the identity it starts as. Drawn with numpy (eager jax
    draws compile once per shape) and placed like the values they replace."""
    rng = np.random.RandomState(seed)
    for lo in lora.adapted(module).values():
        for var in (lo.a, lo.b):
            x = var.get_value()
            var.set_value(jax.device_put((scale * rng.standard_normal(x.shape)).astype(x.dtype), x.sharding))
    return module


def adapted_mistral(hf_dir, targets=("layers/.*",), rank=4, alpha=8.0, seed=0):
    return randomize(lora.add(conv.from_hf(hf_dir), lora.LoRAConfig(rank=rank, alpha=alpha, targets=targets),
                              None), seed)


def logits(model, ids=IDS):
    return np.asarray(model(jnp.asarray(ids)).logits)


def torch_logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


# ---------------------------------------------------------------------------------------------------------------
# The factors, merging, dropout


def test_factors_start_as_identity_and_merge_into_base_plus_adapter(hf_dir):
    base = conv.from_hf(hf_dir)
    ref = logits(base)
    model = lora.add(conv.from_hf(hf_dir), lora.LoRAConfig(rank=4, alpha=8.0, targets=("layers/.*", "lm_head")),
                     None)
    assert sorted(lora.adapted(model)) == ["layers/down", "layers/gate", "layers/k", "layers/o", "layers/q",
                                           "layers/up", "layers/v", "lm_head"]
    q = lora.adapted(model)["layers/q"]
    # A (layers, embed, rank), B (layers, rank, heads, head_dim): the kernel's axes
    assert q.a.get_value().shape == (2, 32, 4) and q.b.get_value().shape == (2, 4, 4, 8)
    np.testing.assert_array_equal(logits(model), ref)  # B starts at zero
    randomize(model)
    unmerged = logits(model)
    assert np.abs(unmerged - ref).max() > 0.1
    kernels = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(base, nnx.Param))}
    factors = {p: (np.asarray(lo.a.get_value()), np.asarray(lo.b.get_value()), lo.scale)
               for p, lo in lora.adapted(model).items()}
    lora.merge(model)
    assert not lora.adapted(model) and not jax.tree.leaves(nnx.state(model, lora.LoRAParam))
    after = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, (a, b, scale) in factors.items():  # W + alpha/r · A @ B, layer by layer, in the kernel's layout
        key = tuple(path.split("/")) + ("kernel",)
        merged = np.asarray(after[key].get_value())
        lead = a.shape[:1] if path.startswith("layers/") else ()
        want = kernels[key] + scale * np.einsum("...ir,...ro->...io", a.reshape(lead + (-1, a.shape[-1])),
                                                b.reshape(lead + (b.shape[len(lead)], -1))).reshape(kernels[key].shape)
        np.testing.assert_allclose(merged, want, rtol=1e-5, atol=1e-6, err_msg=path)
    assert_close(logits(model), unmerged, what="merged vs unmerged logits")


def test_dropout_only_where_a_training_step_sets_its_keys(hf_dir):
    def model(dropout):
        return randomize(lora.add(conv.from_hf(hf_dir), lora.LoRAConfig(rank=4, dropout=dropout), None))

    plain, dropped = model(0.0), model(0.5)
    np.testing.assert_array_equal(logits(dropped), logits(plain))  # no keys: evaluation and inference
    lora.set_dropout_keys(dropped, jax.random.PRNGKey(0))
    first = logits(dropped)
    assert np.abs(first - logits(plain)).max() > 1e-3
    np.testing.assert_array_equal(logits(dropped), first)  # the same keys, the same masks
    lora.set_dropout_keys(dropped, jax.random.PRNGKey(1))
    assert np.abs(logits(dropped) - first).max() > 1e-3
    lora.set_dropout_keys(plain, jax.random.PRNGKey(0))  # dropout 0 sets none
    assert all(lo.key is None for lo in lora.adapted(plain).values())


def test_factors_shard_like_their_kernels_and_sharded_equals_single_device():
    cfg = MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8)
    targets = lora.LoRAConfig(rank=4, targets=("layers/.*", "lm_head"))

    def make():
        rngs = nnx.Rngs(0)
        return lora.add(Mistral(cfg, rngs=rngs), targets, rngs)

    mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
    model = shd.create_sharded(make, mesh)
    def spec(var):  # the PartitionSpec padded to the array's rank
        x = var.get_value()
        return tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))

    ad = lora.adapted(model)
    assert spec(ad["layers/q"].a) == (None, "fsdp", None)  # (layers, embed, lora)
    assert spec(ad["layers/q"].b) == (None, None, "tensor", None)  # (layers, lora, heads, head_dim)
    assert spec(ad["layers/o"].a) == (None, "tensor", None, None)  # (layers, heads, head_dim, lora)
    assert spec(ad["layers/down"].a) == (None, "tensor", None)  # (layers, mlp, lora)
    assert spec(ad["layers/down"].b) == (None, None, "fsdp")  # (layers, lora, embed)
    assert spec(ad["lm_head"].b) == (None, "tensor")  # (lora, vocab)
    randomize(model)  # B at zero does not test the sharded forward: random factors, kept sharded
    ids = jnp.asarray(np.random.RandomState(3).randint(0, 96, (8, 6)))
    with jax.set_mesh(mesh):
        sharded = np.asarray(jax.jit(lambda m, x: m(x).logits)(model, ids))
    graphdef, state = nnx.split(model)
    single = nnx.merge(graphdef, jax.device_put(jax.device_get(state), jax.devices()[0]))
    assert_close(sharded, logits(single, ids), what="sharded vs single-device logits")


# ---------------------------------------------------------------------------------------------------------------
# Training


def lora_config(c, rank=4, dropout=0.1):
    c.train.lora.llm.update(rank=rank, alpha=2.0 * rank, dropout=dropout)
    return c


def test_a_lora_on_the_lm_head_reaches_the_loss_when_the_vocabulary_is_tiled(built):
    """The vocabulary-tiled CE reads the head's kernel alone: with a LoRA on lm_head the loss must still be the
    cross-entropy of the adapted logits."""
    import dataclasses

    import optax

    _, _, _, fresh = built
    model = fresh()
    model.cfg = dataclasses.replace(model.cfg, ce_vocab_tile=8)
    assert model.cfg.llm.vocab_size > 8
    randomize(lora.add(model.llm, lora.LoRAConfig(rank=2, targets=("lm_head",)), None))
    h = jnp.asarray(np.random.RandomState(0).standard_normal((2, 5, model.cfg.llm.hidden_size)), jnp.float32)
    labels = jnp.asarray(np.random.RandomState(1).randint(0, model.cfg.llm.vocab_size, (2, 5)))
    ce, _ = model.token_losses(h, labels)
    want = optax.softmax_cross_entropy_with_integer_labels(model.llm.logits(h).astype(jnp.float32), labels)
    assert_close(np.asarray(ce), np.asarray(want), what="CE with a LoRA on lm_head")


@pytest.mark.slow
def test_a_lora_run_lowers_the_loss_then_merges_and_exports_through_the_cli(data_dir, tmp_path, built):
    """train.run from a converted LLM with LoRA (the 7B `:lora` recipe, small): the loss falls while the kernels
    LoRA adapts stay bit-identical; the checkpoint holds the factors beside them; load_trained merges them; the CLI
    exports a PEFT adapter + base that peft loads with our logits, and a merged HF Mistral with the same logits."""
    _, _, _, fresh = built
    checkpoint.save_module(tmp_path / "llm", fresh().llm, "mistral")
    c = lora_config(micro_config(data_dir))
    c.init.llm = str(tmp_path / "llm")
    c.train.update(steps=8, lr=1e-2, warmup_steps=1, checkpoint_every=8)
    train.run(c, tmp_path / "run", mesh=single_mesh())
    losses = logged_losses(tmp_path / "run")
    assert len(losses) == 8 and np.mean(losses[-2:]) < 0.8 * losses[0], losses
    base = checkpoint.load_module(tmp_path / "llm")
    unmerged, _ = train.load_trained(tmp_path / "run", merge_lora=False)
    after = dict(nnx.to_flat_state(nnx.state(unmerged.llm, nnx.Param)))
    for p, v in nnx.to_flat_state(nnx.state(base, nnx.Param)):  # LoRA kept the kernels it adapts frozen
        if p[-1] == "kernel" and p[0] == "layers":
            np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(after[p].get_value()))
    assert float(jnp.abs(lora.adapted(unmerged.llm)["layers/q"].b.get_value()).max()) > 0  # the factors trained
    ids = np.random.RandomState(1).randint(0, base.cfg.vocab_size, (2, 7))
    ours = logits(unmerged.llm, ids)
    merged, _ = train.load_trained(tmp_path / "run")
    assert not lora.adapted(merged) and lora.adapted(unmerged.llm)
    assert_close(logits(merged.llm, ids), ours, what="load_trained merged")

    run = str(tmp_path / "run")
    assert peft_io.main(["to-peft", "--workdir", run, "--out", str(tmp_path / "adapter"),
                         "--base-out", str(tmp_path / "base")]) == 0
    assert peft_io.main(["merge", "--workdir", run, "--out", str(tmp_path / "merged"), "--hf"]) == 0
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(MistralForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert_close(torch_logits(peft_model.eval(), ids), ours, what="peft from the CLI's adapter")
    assert_close(torch_logits(MistralForCausalLM.from_pretrained(tmp_path / "merged").eval(), ids), ours,
                 what="the CLI's merged HF export")


@pytest.mark.slow
def test_fit_check_reports_what_lora_saves_and_counts_its_flops():
    """launch/aot.py on the tiny config with LoRA on the LLM (the 7B config's `:lora`, small): the report's counts,
    and the analytic FLOPs (frozen kernels: no weight gradient) equal the matmul FLOPs of the traced step."""
    from configs import tiny
    from launch import aot

    c = aot.configure(tiny.get_config(), remat="none", mesh=dict(data=1, fsdp=-1, tensor=1))
    c.model.llm.vocab_size, c.data.tokenizer = 1024, ""  # the fit check's stand-in vocabulary
    c.train.lora.llm.update(rank=4, alpha=8.0)
    state, s, cfg, model = aot.abstract_setup(c, aot.build_mesh(dict(data=1), jax.devices()[:1]))
    m = cfg.llm
    q, kv, mlp = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim, m.intermediate_size
    d = m.hidden_size
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, mlp), (d, mlp), (mlp, d)]  # q k v o gate up down
    r = aot.lora_report(model, s.frozen)
    assert r["factors"] == m.num_layers * 4 * sum(i + o for i, o in shapes)
    assert r["base_frozen"] == m.num_layers * sum(i * o for i, o in shapes) and r["kernels"] == 7
    assert r["moments_per_chip"] == 2 * 4 * r["base_frozen"] and r["ranks"] == [("llm", 4)]
    assert "llm/layers/q/kernel" not in {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(state["params"])}
    batch = aot.abstract_batch(c, cfg, s, 4)
    program = flops.program_flops(aot.train.jit_train_step(s), state, s.frozen, batch)
    parts = flops.analytic(model, cfg, rows=4, seq_len=c.data.max_len, target_px=c.data.target_image_size,
                           trainable=set(state["params"].keys()))
    assert sum(parts.values()) == pytest.approx(program, rel=0.02)


# ---------------------------------------------------------------------------------------------------------------
# PEFT


def test_peft_export_is_what_peft_writes_and_loads_with_the_same_logits(hf_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = adapted_mistral(hf_dir, targets=("layers/.*", "lm_head"))
    ours = logits(model)
    peft_io.write_peft(model, conv.layout(model), tmp_path / "adapter")
    conv.to_hf(lora.strip(model), tmp_path / "base")

    # the same adapter made by peft itself: the same file names, keys, shapes and dtypes
    ref = get_peft_model(MistralForCausalLM(HFConfig(**HF)), LoraConfig(r=4, lora_alpha=8,
                                                                       target_modules=PEFT_NAMES + ["lm_head"]))
    # (peft would also store the whole embedding and head here, as it does when lm_head is a target)
    ref.save_pretrained(tmp_path / "ref", save_embedding_layers=False)
    files = lambda d: sorted(p.name for p in (tmp_path / d).iterdir() if p.suffix != ".md")  # and a model card
    assert files("adapter") == files("ref")

    def tensors(folder):
        with safe_open(str(folder / "adapter_model.safetensors"), "np") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}

    assert tensors(tmp_path / "adapter") == tensors(tmp_path / "ref")
    got, want = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("adapter", "ref"))
    for key in ("peft_type", "r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "use_dora", "fan_in_fan_out"):
        assert got[key] == want[key], key
    assert sorted(got["target_modules"]) == sorted(want["target_modules"])

    peft_model = PeftModel.from_pretrained(MistralForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert_close(torch_logits(peft_model.eval()), ours, what="peft logits vs ours")
    merged = peft_model.merge_and_unload()
    assert_close(torch_logits(merged), ours, what="peft merge_and_unload")


def test_peft_adapters_import_back(hf_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    # ours -> PEFT -> ours: the same factors
    model = adapted_mistral(hf_dir)
    peft_io.write_peft(model, conv.layout(model), tmp_path / "ours")
    back = conv.from_hf(hf_dir)
    peft_io.read_peft(back, conv.layout(back), tmp_path / "ours")
    assert sorted(lora.adapted(back)) == sorted(lora.adapted(model))
    for p, lo in lora.adapted(model).items():
        np.testing.assert_array_equal(np.asarray(lora.adapted(back)[p].a.get_value()), np.asarray(lo.a.get_value()))
        np.testing.assert_array_equal(np.asarray(lora.adapted(back)[p].b.get_value()), np.asarray(lo.b.get_value()))
        assert lora.adapted(back)[p].scale == lo.scale
    np.testing.assert_array_equal(logits(back), logits(model))

    # an adapter trained in torch (random B), q and v only, regex targets: our logits are peft's
    torch.manual_seed(1)
    base = MistralForCausalLM.from_pretrained(hf_dir)
    made = get_peft_model(base, LoraConfig(r=2, lora_alpha=6, target_modules=r".*\.(q|v)_proj",
                                           init_lora_weights=False))
    made.save_pretrained(tmp_path / "torch")
    ref = torch_logits(made.eval())
    ours = peft_io.read_peft(conv.from_hf(hf_dir), conv.layout(back), tmp_path / "torch")
    assert sorted(lora.adapted(ours)) == ["layers/q", "layers/v"] and lora.adapted(ours)["layers/q"].scale == 3.0
    assert_close(logits(ours), ref, what="imported torch adapter")

    # the CLI: adapter onto our converted checkpoint, merged, as our checkpoint
    checkpoint.save_module(tmp_path / "ckpt", conv.from_hf(hf_dir), "mistral")
    assert peft_io.main(["from-peft", str(tmp_path / "torch"), "--base", str(tmp_path / "ckpt"),
                         "--out", str(tmp_path / "merged")]) == 0
    assert_close(logits(checkpoint.load_module(tmp_path / "merged")), ref, what="from-peft CLI, merged")


def test_adapters_we_cannot_read_name_the_field_or_key(hf_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    def make(name, **kw):
        get_peft_model(MistralForCausalLM.from_pretrained(hf_dir), LoraConfig(r=2, **kw)).save_pretrained(
            tmp_path / name)
        return tmp_path / name

    def read(folder):
        m = conv.from_hf(hf_dir)
        return peft_io.read_peft(m, conv.layout(m), folder)

    with pytest.raises(ConversionError, match="use_dora=True is not supported"):
        read(make("dora", target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ConversionError, match="adapts 1 of the 2 layers of model.layers.0.self_attn.q_proj"):
        read(make("some_layers", target_modules=r"model\.layers\.0\.self_attn\.q_proj"))
    with pytest.raises(ConversionError, match="match none of the model's linear layers"):
        read(_retarget(make("none", target_modules=["q_proj"]), ["nothing_here"]))
    folder = make("extra", target_modules=["q_proj"])
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(folder / "adapter_model.safetensors"))
    save_file({**weights, "base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight": np.zeros((2, 2),
                                                                                                     np.float32)},
              str(folder / "adapter_model.safetensors"))
    with pytest.raises(ConversionError, match="unexpected keys .*lora_C"):
        read(folder)
    assert issubclass(ConversionError, errors.UserError)


def _retarget(folder, targets):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": targets}))
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Config


def test_lora_config_errors_name_the_key(data_dir):
    c = micro_config(data_dir)
    c.train.lora.llm.update(rank=4, dropout=1.5)
    c.train.lora.head = dict(rank=2, alpah=4.0)
    c.train.lora.tower = dict(rank=2)
    with pytest.raises(errors.BadValue) as e:
        config_check.validate(c)
    for msg in ["train.lora.llm: dropout=1.5 must be in [0, 1)", "unknown key train.lora.head.alpah: did you mean "
                "train.lora.head.alpha?", "train.lora.tower: the model has no part 'tower'"]:
        assert msg in str(e.value)
    c = micro_config(data_dir)
    c.train.lora.llm.update(rank=4, targets=("layers/qq",))
    with pytest.raises(errors.BadValue, match=r"train.lora.llm.targets=\['layers/qq'\] match no linear layer; its "
                                              r"linear layers are \['layers/down', .*'lm_head'\]"):
        train.build(c, single_mesh())
    assert lora.configs(micro_config(data_dir).train.lora) == {}  # rank 0 by default: no LoRA


# ---------------------------------------------------------------------------------------------------------------
# The UNet and the Q-former head: the same export, keys from their converters' tables

UNET = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=24,
            attention_head_dim=4, use_linear_projection=True, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
# self-attention but not cross-attention (attn1.to_q, not to_q), the GEGLU feed-forward (ff.net.0.proj, ff.net.2),
# the linear proj_in, and the time embedding's linears
UNET_TARGETS = (r".*/attn1/to_(q|k|v|out)", r".*/ff_(in|out)", r".*/proj_in", r"time_embedding/linear_1",
                r".*/time_emb_proj")


def peft_tensors(folder):
    with safe_open(str(folder / "adapter_model.safetensors"), "np") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def factors(module):
    """{path: (A, B, scale)} of every LoRA in `module`, on the host."""
    return {p: (np.asarray(lo.a.get_value()), np.asarray(lo.b.get_value()), lo.scale)
            for p, lo in lora.adapted(module).items()}


def assert_same_factors(got, want):
    assert sorted(got) == sorted(want)
    for p, (a, b, scale) in want.items():
        np.testing.assert_array_equal(got[p][0], a, err_msg=p)
        np.testing.assert_array_equal(got[p][1], b, err_msg=p)
        assert got[p][2] == scale, p


@pytest.mark.slow  # 19-24 s on the shared machine: a UNet compile, 4 torch forwards, the CLI
def test_unet_lora_exports_to_peft_and_diffusers_and_imports_back(tmp_path):
    """A LoRA on our UNet: the adapter peft writes for UNet2DConditionModel with the same target_modules (keys,
    shapes, dtypes), loaded by PeftModel and by diffusers' load_lora_adapter onto the exported UNet with our output;
    read back, the same factors; the from-peft CLI's merged diffusers folder gives the same output."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    save_hf(UNet2DConditionModel(**UNET), tmp_path / "hf")
    model = randomize(lora.add(unet_conv.from_hf(tmp_path / "hf"), lora.LoRAConfig(rank=4, alpha=8.0,
                                                                                    targets=UNET_TARGETS), None))
    assert len(lora.adapted(model)) == 4 * 7 + 1 + 8  # 4 transformers (6 linears + proj_in), 8 resnets
    rng = np.random.RandomState(0)
    x, t, ctx = rng.randn(2, 8, 8, 4).astype(np.float32), np.array([999, 17]), rng.randn(2, 7, 24).astype(np.float32)
    graphdef, state = nnx.split(model)
    ours = np.asarray(jax.jit(lambda s: nnx.merge(graphdef, s)(x, t, ctx))(state))
    peft_io.write_peft(model, unet_conv.layout(model), tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["attn1.to_k", "attn1.to_out.0", "attn1.to_q", "attn1.to_v", "linear_1",
                                     "net.2", "proj", "proj_in", "time_emb_proj"] and cfg["task_type"] is None
    trained = factors(model)
    unet_conv.to_hf(lora.strip(model), tmp_path / "base")
    checkpoint.save_module(tmp_path / "ckpt", model, "unet")  # stripped: the base in our format

    ref = get_peft_model(UNet2DConditionModel(**UNET), LoraConfig(r=4, lora_alpha=8,
                                                                 target_modules=cfg["target_modules"]))
    ref.save_pretrained(tmp_path / "ref")
    assert peft_tensors(tmp_path / "adapter") == peft_tensors(tmp_path / "ref")

    def torch_out(unet):
        with torch.no_grad():
            out = unet(torch.tensor(x.transpose(0, 3, 1, 2)), torch.tensor(t), torch.tensor(ctx)).sample
        return out.numpy().transpose(0, 2, 3, 1)

    peft_model = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(tmp_path / "base"),
                                           tmp_path / "adapter").eval()
    assert_close(torch_out(peft_model), ours, what="PeftModel UNet vs ours")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "base").eval()
    assert np.abs(torch_out(unet) - ours).max() > 0.1 * np.abs(ours).max()  # the adapter matters
    # diffusers' loader: from a folder it takes alpha from its own safetensors metadata (alpha = rank without it),
    # so the tensors and adapter_config.json are passed in
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    unet.load_lora_adapter({k.removeprefix(peft_io.PREFIX): v for k, v in weights.items()}, prefix=None, metadata=cfg)
    assert_close(torch_out(unet), ours, what="diffusers load_lora_adapter vs ours")

    back = unet_conv.from_hf(tmp_path / "base")
    peft_io.read_peft(back, unet_conv.layout(back), tmp_path / "adapter")
    assert_same_factors(factors(back), trained)
    assert peft_io.main(["from-peft", str(tmp_path / "adapter"), "--base", str(tmp_path / "ckpt"),
                         "--out", str(tmp_path / "merged"), "--hf"]) == 0
    assert_close(torch_out(UNet2DConditionModel.from_pretrained(tmp_path / "merged").eval()), ours,
                 what="from-peft CLI's merged diffusers UNet")
    get_peft_model(UNet2DConditionModel.from_pretrained(tmp_path / "base"), LoraConfig(
        r=2, target_modules=["to_q", "conv1"])).save_pretrained(tmp_path / "conv")
    with pytest.raises(ConversionError, match=r"unexpected keys .*resnets\.0\.conv1\.lora_A.*LoRA on convolutions "
                                              r"is not supported"):
        peft_io.read_peft(back, unet_conv.layout(back), tmp_path / "conv")


def test_head_lora_exports_to_peft_and_imports_back(tmp_path):
    """The Q-former head (4 layers, cross-attention every 2nd: our stacked slice i is HF layer 2i + j): LoRA on the
    cross-attention layers (0 and 2) and the output linear exports as peft writes it for TorchHead, which PeftModel
    runs with our output; read back, the same factors."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from convert.torch_genllava import TorchHead
    from genllava_jax.models.qformer import TINY_HEAD, QFormerHead

    cfg = TINY_HEAD.replace(num_layers=4, cross_attention_frequency=2)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: QFormerHead(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.RandomState(0)  # every parameter random, biases and norms too, without compiling an initialiser
    head = nnx.merge(graphdef, jax.tree.map(lambda a: jnp.asarray(0.2 * rng.randn(*a.shape), a.dtype), state))
    model = randomize(lora.add(head, lora.LoRAConfig(rank=2, alpha=6.0, targets=(r"qformer/groups/layers/0/.*",
                                                                                  "out_proj")), None))
    hidden, embeds = (rng.randn(2, 4, cfg.llm_hidden_size).astype(np.float32) for _ in range(2))
    graphdef, state = nnx.split(model)
    ours = np.asarray(jax.jit(lambda s: nnx.merge(graphdef, s)(hidden, embeds))(state))
    peft_io.write_peft(model, head_conv.layout(model), tmp_path / "adapter")
    targets = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    # self-attention and MLP names are shared with the odd layers: named by layer; cross-attention is only in these
    assert "crossattention.attention.query" in targets and "layer.2.attention.attention.query" in targets
    trained = factors(model)
    head_conv.to_hf(lora.strip(model), tmp_path / "base")

    ref = get_peft_model(TorchHead(tmp_path / "base"), LoraConfig(r=2, lora_alpha=6, target_modules=targets))
    ref.save_pretrained(tmp_path / "ref")
    assert peft_tensors(tmp_path / "adapter") == peft_tensors(tmp_path / "ref")
    peft_model = PeftModel.from_pretrained(TorchHead(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert_close(peft_model(torch.tensor(hidden), torch.tensor(embeds)).numpy(), ours, what="PeftModel head")
    back = head_conv.from_hf(tmp_path / "base")
    peft_io.read_peft(back, head_conv.layout(back), tmp_path / "adapter")
    assert_same_factors(factors(back), trained)
