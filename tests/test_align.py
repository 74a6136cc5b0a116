"""GILL's alignment loss (model.lambda_align): captions tokenized by the pipeline with a CLIP tokenizer, the frozen
CLIP text encoder (SD's, loaded by init.text_encoder) inside the step, gradients to the head and not into CLIP,
and a few train steps lower it."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from convert import clip as clip_conv
from genllava_jax import checkpoint, train
from genllava_jax.data import synthetic
from genllava_jax.data.pipeline import Encoder, make_dataset
from genllava_jax.data.tokenizer import clip_tokens
from genllava_jax.errors import BadValue
from oracle import assert_close
from micro import micro_config, single_mesh

Q = 8  # the head's query tokens = the caption length


def clip_tokenizer_for(texts, out_dir):
    """A CLIP BPE tokenizer whose vocabulary holds every word of `texts` whole (one merge chain per word)."""
    vocab, merges = {"<|startoftext|>": 0, "<|endoftext|>": 1}, []
    add = lambda tok: vocab.setdefault(tok, len(vocab))
    for word in sorted({w for t in texts for w in re.findall(r"[a-z]+|[^\sa-z]", t.lower())}):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        for p in parts + [c for c in word] + [c + "</w>" for c in word]:
            add(p)
        head = parts[0]
        for p in parts[1:]:
            if f"{head} {p}" not in merges:
                merges.append(f"{head} {p}")
            head += p
            add(head)
    (out_dir / "vocab.json").write_text(json.dumps(vocab))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), model_max_length=Q,
                  pad_token="<|endoftext|>").save_pretrained(str(out_dir / "clip_tokenizer"))
    return out_dir / "clip_tokenizer", len(vocab)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The synthetic world, a CLIP tokenizer for its words and an HF CLIP text encoder converted to our format."""
    out = tmp_path_factory.mktemp("world")
    synthetic.make_synthetic(out, num_train=64, num_eval=8, image_size=16, num_img_tokens=4)
    records = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    texts = [r.get("caption", "") for r in records] + [t["value"] for r in records for t in r["conversations"]]
    tok_dir, vocab = clip_tokenizer_for(texts, out)
    torch.manual_seed(0)
    hf = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=Q, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1)).eval()
    hf.save_pretrained(str(out / "hf_text_encoder"))
    checkpoint.save_module(out / "text_encoder", clip_conv.from_hf(out / "hf_text_encoder"), "clip")
    return out, tok_dir, hf


def align_config(world, lambda_align=1.0):
    out, tok_dir, hf = world
    c = micro_config(out)
    c.data.update(caption_tokenizer=str(tok_dir), caption_max_len=Q)
    c.model.head.num_query_tokens = Q
    c.model.lambda_align = lambda_align
    c.model.text_encoder = dict(text=dict(vocab_size=hf.config.vocab_size, hidden_size=16, intermediate_size=32,
                                          num_layers=2, num_heads=2, max_position_embeddings=Q, bos_token_id=0,
                                          eos_token_id=1, pad_token_id=1), vision=None, projection_dim=None)
    c.init = dict(text_encoder=str(out / "text_encoder"))
    return c


@pytest.fixture(scope="module")
def aligned(world):
    c = align_config(world)
    cfg, model, tokenizer, _ = train.build(c, single_mesh())
    it, _ = make_dataset(c.data, tokenizer, global_batch=8, seed=0)
    return c, model, tokenizer, next(it)


@pytest.mark.slow
def test_batches_carry_the_captions_as_clip_tokens(world, aligned):
    c, _, tokenizer, batch = aligned
    tok = CLIPTokenizer.from_pretrained(str(world[1]))
    assert batch["caption_ids"].shape == (8, Q) and batch["caption_ids"].dtype == np.int32
    gen = np.isin(batch["task"], [2, 3])  # t2i and edit records carry the target's caption
    np.testing.assert_array_equal(batch["has_caption"], gen)
    assert (batch["caption_ids"][gen, 0] == 0).all()  # <|startoftext|>
    # a t2i record without a caption is aligned to its prompt; no caption, no alignment elsewhere
    _, info = make_dataset(c.data, tokenizer, global_batch=8, seed=0)
    enc = Encoder(tokenizer, info.special_ids, world[0], c.data.max_len, c.data.image_size, c.data.num_patches,
                  c.data.target_image_size, "truncate", caption_tokenizer=tok, caption_len=Q)
    records = [json.loads(line) for line in (world[0] / "train.jsonl").read_text().splitlines()]
    t2i = next(r for r in records if r["task"] == "t2i")
    ex, _ = enc.encode({k: v for k, v in t2i.items() if k != "caption"})
    np.testing.assert_array_equal(ex["caption_ids"], clip_tokens(tok, [t2i["conversations"][0]["value"]], Q)[0][0])
    ex, _ = enc.encode(t2i)
    np.testing.assert_array_equal(ex["caption_ids"], clip_tokens(tok, [t2i["caption"]], Q)[0][0])
    assert ex["has_caption"] and len(set(ex["caption_ids"].tolist())) > 3  # real words, not unknowns
    assert not enc.encode(next(r for r in records if r["task"] == "i2t"))[0]["has_caption"]
    assert enc({**t2i, "caption": 3}) == {"skip": "malformed"}


@pytest.mark.slow
def test_align_loss_value_and_gradients(world, aligned):
    """The loss is MSE(head conditioning, SD's CLIP text states) over rows with [IMG] tokens and a caption; its
    gradient reaches the head and the LLM, never the frozen CLIP text encoder."""
    c, model, _, batch = aligned
    hf = world[2]
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    graphdef, params = nnx.split(model, nnx.Param)

    def align(p):
        return nnx.merge(graphdef, p).loss(jb, jax.random.key(0))[1]["align"]

    value, grads = jax.jit(jax.value_and_grad(align))(params)
    cond = np.asarray(jax.jit(lambda p: nnx.merge(graphdef, p).condition(
        jb["input_ids"], jb["attention_mask"], jb["image"], jb["has_image"]))(params))
    with torch.no_grad():  # SD's text encoder (loaded through init.text_encoder) on the caption ids
        target = hf(input_ids=torch.tensor(batch["caption_ids"], dtype=torch.long)).last_hidden_state.numpy()
    rows = batch["has_caption"]
    assert rows.sum() >= 2
    want = np.mean((cond[rows] - target[rows]) ** 2)
    assert_close(value, want, rel=1e-5, what="alignment loss")
    norm = lambda tree: float(optax.global_norm(tree))
    assert norm(grads["head"]) > 0 and norm(grads["llm"]["layers"]) > 0
    assert norm(grads["text_encoder"]) == 0 and norm(grads["unet"]) == 0


@pytest.mark.slow
def test_a_few_steps_lower_the_alignment_loss(aligned):
    c, model, _, batch = aligned
    c = c.copy_and_resolve_references()
    c.train.update(trainable=("head/.*",), lr=1e-2, warmup_frac=0.0)
    graphdef, state = nnx.split(model)
    state, s = train.setup(nnx.merge(graphdef, jax.tree.map(jnp.copy, state)), c.train, single_mesh())
    assert {p[0] for p, _ in nnx.to_flat_state(s.frozen)} >= {"text_encoder"}
    te_before = jax.tree.map(np.array, nnx.state(s.frozen)["text_encoder"])
    step = train.jit_train_step(s)
    gbatch = train.to_global(batch, s)
    aligns = []
    with jax.set_mesh(s.mesh):
        for _ in range(8):
            state, metrics = step(state, s.frozen, gbatch)
            aligns.append(float(metrics["align"]))
    assert aligns[-1] < 0.7 * aligns[0], aligns
    for a, b in zip(jax.tree.leaves(te_before), jax.tree.leaves(nnx.state(s.frozen)["text_encoder"])):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_misconfigurations_are_named(world):
    from genllava_jax.data.tokenizer import load_tokenizer

    c = align_config(world)
    tokenizer = load_tokenizer(c.data.tokenizer, c.data.num_img_tokens)
    for change, message in ((dict(caption_tokenizer=""), "data.caption_tokenizer"),
                            (dict(caption_max_len=Q + 1), "caption_max_len")):
        bad = c.copy_and_resolve_references()
        bad.data.update(change)
        with pytest.raises(BadValue, match=message):
            train.model_config(bad, tokenizer)
    bad = c.copy_and_resolve_references()
    bad.model.text_encoder.text.hidden_size = 24
    with pytest.raises(ValueError, match="text_encoder.text.hidden_size != head.out_dim"):
        train.model_config(bad, tokenizer)
