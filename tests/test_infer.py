"""Decoding (while_loop, per-row stops, batched = one by one) and the assistant's [SOI] → image path."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genllava_jax import infer
from genllava_jax.models.mistral import Mistral, MistralConfig, decode

CFG = MistralConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, rope_theta=1e4)


@pytest.fixture(scope="module")
def llm():
    return Mistral(CFG, rngs=nnx.Rngs(3))


def run(llm, prompts, T, **kw):
    ids, mask = infer.left_pad(prompts, T, 0)
    out = jax.jit(lambda ids, mask: decode(llm, mask, jax.random.key(0), input_ids=ids, **kw))(ids, mask)
    return np.asarray(out.tokens), np.asarray(out.lengths)


def test_batched_decoding_equals_one_by_one(llm):
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(1, 61, n)) for n in (3, 9, 6)]
    batched, lengths = run(llm, prompts, 12, max_new_tokens=10)
    assert (lengths == 10).all()
    for b, p in enumerate(prompts):  # alone, and at another padded length: same tokens
        alone, _ = run(llm, [p], len(p), max_new_tokens=10)
        np.testing.assert_array_equal(batched[b], alone[0])
        padded, _ = run(llm, [p], 16, max_new_tokens=10)
        np.testing.assert_array_equal(batched[b], padded[0])


def test_rows_stop_at_their_own_stop_token_and_the_loop_ends_early(llm):
    rng = np.random.RandomState(1)
    prompts = [list(rng.randint(1, 61, n)) for n in (4, 7)]
    free, _ = run(llm, prompts, 8, max_new_tokens=12)
    stop = int(free[0, 2])  # row 0 emits it at step 2 (and not before)
    assert stop not in free[0, :2]
    toks, lengths = run(llm, prompts, 8, max_new_tokens=12, stop_ids=(stop,), pad_id=0)
    assert lengths[0] == 3 and (toks[0, :3] == free[0, :3]).all() and (toks[0, 3:] == 0).all()
    first = np.flatnonzero(free[1] == stop)
    n1 = first[0] + 1 if len(first) else 12
    assert lengths[1] == n1 and (toks[1, :n1] == free[1, :n1]).all()

    # every row stopped: the while_loop ends without running the remaining steps (counted via the stream)
    seen = []
    one = [prompts[0]]
    ids, mask = infer.left_pad(one, 8, 0)
    jax.block_until_ready(decode(llm, jnp.asarray(mask), jax.random.key(0), input_ids=jnp.asarray(ids),
                                 max_new_tokens=12, stop_ids=(stop,), on_token=lambda i, t: seen.append(int(i))))
    jax.effects_barrier()
    assert seen == [0, 1, 2]


def test_a_key_per_row_samples_each_row_as_alone(llm):
    rng = np.random.RandomState(2)
    prompts = [list(rng.randint(1, 61, n)) for n in (3, 9, 6)]
    keys = jax.random.split(jax.random.key(7), 3)

    step = jax.jit(lambda ids, mask, k: decode(llm, mask, k, input_ids=ids, max_new_tokens=8, temperature=1.5))

    def sample(rows, k):  # one compile per batch size (3 and 1)
        ids, mask = infer.left_pad(rows, 12, 0)
        return np.asarray(step(ids, mask, k).tokens)

    batched = sample(prompts, keys)
    for b in range(3):  # alone, or in another place in another batch: the same draws
        np.testing.assert_array_equal(batched[b], sample([prompts[b]], keys[b:b + 1])[0])
    np.testing.assert_array_equal(batched[::-1], sample(prompts[::-1], keys[::-1]))
    assert len({tuple(r) for r in sample([prompts[0]] * 3, keys)}) == 3  # the keys do differ


def test_top_p_keeps_only_the_nucleus(llm):
    prompts = [[5, 6, 7]] * 64
    greedy, _ = run(llm, prompts, 4, max_new_tokens=1)
    tiny_p, _ = run(llm, prompts, 4, max_new_tokens=1, temperature=1.0, top_p=1e-6)
    wide, _ = run(llm, prompts, 4, max_new_tokens=1, temperature=5.0, top_p=1.0)
    assert (tiny_p == greedy).all()  # a nucleus of one token is the argmax
    assert len(np.unique(wide)) > 1


def test_assistant_generates_an_image_when_the_answer_ends_in_soi(built):
    c, cfg, tokenizer, fresh = built
    model = fresh()
    a = infer.Assistant(model, tokenizer, c.data, length_buckets=(32, 64))
    prompts = [a.prompt([], "Draw a red circle.", task="t2i", has_image=False),
               a.prompt([], "What colour is the shape?", task="i2t", has_image=True)]
    img = np.random.RandomState(0).randint(0, 255, (16, 16, 3), np.uint8)
    from PIL import Image
    pil = [None, Image.fromarray(img)]
    settings = infer.Settings(max_new_tokens=6, num_steps=3)
    free = a.reply(prompts, pil, settings)
    assert all(r.image is None for r in free) or any(r.tokens[-1:] == [a.ids.soi] for r in free)

    # call the token row 0 emits first "[SOI]": the reply must then draw from prompt + answer + [IMG..][EOI]
    soi = free[0].tokens[0]
    a.ids = dataclasses.replace(a.ids, soi=soi)
    replies = a.reply(prompts, pil, settings)
    assert replies[0].tokens == [soi] and replies[0].image is not None
    assert replies[0].image.shape == (16, 16, 3) and replies[0].image.dtype == np.uint8
    row = prompts[0] + list(a.ids.generation)
    ids, mask = infer.left_pad([row], 32, a.ids.pad)
    sig, has, vae = a.pixels([None])
    want = infer.images(model, dict(input_ids=ids, attention_mask=mask, image=sig, has_image=has, source_image=vae),
                        rng=jax.random.key(0), num_steps=3, guidance_scale=settings.guidance_scale)
    np.testing.assert_array_equal(replies[0].image, want[0])
    if soi not in free[1].tokens:
        assert replies[1].image is None
