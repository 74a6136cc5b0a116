"""Training: the train state, the ONE jitted train step, checkpoints, and the loop.

    python -m genllava_jax.train --config=configs/tiny.py --workdir=runs/tiny [--config.train.steps=100]

The model is split once into (graphdef, trainable params, frozen params, other state). The step is a plain
`jax.jit` over pure functions with explicit in/out shardings from the logical-axis rules; the train state
(trainable params, optimizer state, step, rng) is donated, frozen parameters are not and never change. A step whose
loss or gradient norm is not finite is skipped (state unchanged) and counted in the state, so the count survives a
restart. The loop checks the config at start-up (`config_check`), stops cleanly on SIGTERM (a checkpoint at the
next step boundary, `preemption`) and resumes from the newest checkpoint that reads back whole (`checkpoint`).
The loop itself is short: the step, a metrics accumulator (`metrics.Accumulator`: window means, step-time
percentiles) and the hooks that run between steps (`hooks`: preemption, the log with model FLOPs and MFU, the
skipped-step limit, evaluation, samples, checkpoints, a profiler trace of `train.profile_steps`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from genllava_jax import checkpoint, config_check, errors, flops, hooks, lora, sharding as shd
from genllava_jax.data.pipeline import global_counts, make_dataset
from genllava_jax.data.tokenizer import SpecialIds, load_tokenizer
from genllava_jax.metrics import Accumulator, MetricWriter
from genllava_jax.models.genllava import GenLLaVA, GenLLaVAConfig


# ---------------------------------------------------------------------------------------------------------------
# Optimizer and trainable parameters


def make_optimizer(tc) -> optax.GradientTransformation:
    """AdamW with linear warm-up then cosine decay (config `train`); the global-norm clipping (`train.grad_clip`) is
    the step's, which has the norm already (`clip_gradients`). `train.lr_scales` ((regex, factor), ...): the learning
    rate of the params whose path matches a regex (the first that does) times its factor, as LLaVA's separate
    projector / vision-tower learning rates. `train.mu_dtype` ("bfloat16"): AdamW's first moment in that dtype (half
    its memory); the second moment stays float32 (its (1 - b2) = 0.001 increments are below bfloat16's resolution)."""
    warmup = max(1, int(tc.warmup_frac * tc.steps)) if tc.warmup_steps is None else tc.warmup_steps
    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.lr, warmup, max(tc.steps, warmup + 1),
                                                  end_value=tc.lr * tc.final_lr_frac)
    scales = [(re.compile(pattern), float(factor)) for pattern, factor in tc.lr_scales]
    # identity first: the place (and the empty state) clip_by_global_norm had, so older checkpoints still restore
    chain = [optax.identity(), optax.adamw(schedule, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay,
                                           mu_dtype=tc.mu_dtype)]
    if scales:  # scaling AdamW's update = scaling its learning rate (weight decay included, as torch param groups)
        def label(path, _):  # the path as trainable_filter names it (without a Variable's trailing .value)
            name = "/".join(str(getattr(k, "key", getattr(k, "idx", ""))) for k in path
                            if not isinstance(k, jax.tree_util.GetAttrKey))
            return next((str(i) for i, (r, _) in enumerate(scales) if r.match(name)), "base")

        transforms = {"base": optax.identity(), **{str(i): optax.scale(f) for i, (_, f) in enumerate(scales)}}
        chain.append(optax.multi_transform(transforms, lambda params: jax.tree_util.tree_map_with_path(label,
                                                                                                       params)))
    return optax.chain(*chain), schedule


def trainable_filter(patterns, frozen=frozenset()) -> Callable:
    """An nnx filter: Params whose "/"-joined path matches one of the regexes in `patterns` and is not in `frozen`,
    and every LoRA factor."""
    regexes = [re.compile(p) for p in patterns]

    def f(path, value):
        if isinstance(value, lora.LoRAParam):
            return True
        if not isinstance(value, nnx.Param):
            return False
        name = "/".join(str(p) for p in path)
        return name not in frozen and any(r.match(name) for r in regexes)

    return f


def split_model(model: nnx.Module, tc):
    """(graphdef, trainable params, frozen params, rest): trainable are what `train.trainable` names and the LoRA
    factors; the kernels LoRA adapts stay frozen."""
    return nnx.split(model, trainable_filter(tc.trainable, lora.frozen_paths(model)), nnx.Param, ...)


# ---------------------------------------------------------------------------------------------------------------
# Train state and shardings


@dataclasses.dataclass
class Setup:
    """What the loop needs besides the state: the static graph, the frozen params, shardings and the step fns."""

    graphdef: Any
    frozen: Any
    rest: Any
    state_shardings: Any
    frozen_shardings: Any
    batch_sharding: Callable[[Any], Any]
    tx: optax.GradientTransformation
    schedule: Callable
    mesh: Any
    grad_clip: float = 0.0  # global-norm clipping (0: none), done by the step


def _opt_shardings(abs_opt, abs_params, param_shardings, mesh):
    """Optimizer-state leaves shaped like the params (mu, nu, ...) take their shardings; the rest is replicated."""
    pdef = jax.tree.structure(abs_params)
    replicated = NamedSharding(mesh, P())

    def one(sub):
        if jax.tree.structure(sub) == pdef:
            return param_shardings
        return jax.tree.map(lambda _: replicated, sub)

    return jax.tree.map(one, abs_opt, is_leaf=lambda x: jax.tree.structure(x) == pdef)


def init_state(params, *, tx, seed: int):
    return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.PRNGKey(seed), "skipped": jnp.zeros((), jnp.int32)}


def state_shardings(params, tx, mesh):
    """Shardings of the train state: params by the rules, optimizer moments like their params, scalars replicated."""
    param_sh = shd.state_shardings(params, mesh)
    abs_opt = jax.eval_shape(tx.init, params)
    replicated = NamedSharding(mesh, P())
    return {"params": param_sh, "opt": _opt_shardings(abs_opt, params, param_sh, mesh), "step": replicated,
            "rng": replicated, "skipped": replicated}


def setup(model: nnx.Module, tc, mesh, seed: int = 0):
    """Splits an (already sharded) model into the donated train state and the frozen rest."""
    graphdef, params, frozen, rest = split_model(model, tc)
    if not jax.tree.leaves(params):
        raise errors.BadValue(f"train.trainable={list(tc.trainable)} matches no parameter")
    tx, schedule = make_optimizer(tc)
    state_sh = state_shardings(params, tx, mesh)
    state = jax.jit(functools.partial(init_state, tx=tx, seed=seed), out_shardings=state_sh)(params)

    return state, Setup(graphdef, frozen, rest, state_sh, shd.state_shardings(frozen, mesh),
                        functools.partial(shd.batch_shardings, mesh=mesh), tx, schedule, mesh, tc.grad_clip)


def to_global(batch: dict, s: Setup) -> dict:
    """This process's numpy batch -> global jax arrays sharded over (data, fsdp), on one host or many."""
    global_shapes = {k: (v.shape[0] * jax.process_count(),) + v.shape[1:] for k, v in batch.items()}
    shardings = s.batch_sharding({k: jax.ShapeDtypeStruct(shp, batch[k].dtype) for k, shp in global_shapes.items()})
    return {k: jax.make_array_from_process_local_data(shardings[k], v, global_shapes[k]) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------------------
# The step


def _loss(graphdef, params, frozen, rest, batch, rng, train: bool = False):
    model = nnx.merge(graphdef, params, frozen, rest)
    if train:  # LoRA's input dropout, in training steps only
        lora.set_dropout_keys(model, jax.random.fold_in(rng, 1))
    return model.loss(batch, rng)


def clip_gradients(grads, grad_norm, max_norm: float):
    """optax.clip_by_global_norm's update, to the bit, with the norm given (the step computes it once)."""
    if not max_norm:
        return grads
    return jax.tree.map(lambda g: jnp.where(grad_norm < max_norm, g, g / grad_norm.astype(g.dtype) * max_norm), grads)


def train_step(state, frozen, batch, *, graphdef, rest, tx, schedule, accum: int = 1, grad_clip: float = 0.0):
    """One optimizer update; with `accum` > 1 the batch's leading axis is split into micro-batches (lax.scan)."""
    rng = jax.random.fold_in(state["rng"], state["step"])
    grad_fn = jax.value_and_grad(functools.partial(_loss, graphdef, train=True), has_aux=True)
    if accum == 1:
        (loss, aux), grads = grad_fn(state["params"], frozen, rest, batch, rng)
    else:
        # micro-batch i takes rows i, i+accum, ...: every device keeps its own rows (no resharding)
        micro = jax.tree.map(lambda x: x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1), batch)

        out_shape = jax.eval_shape(grad_fn, state["params"], frozen, rest, jax.tree.map(lambda x: x[0], micro), rng)

        def body(carry, inputs):
            i, mb = inputs
            out = grad_fn(state["params"], frozen, rest, mb, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, carry, out), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), out_shape)
        ((loss, aux), grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
        loss, aux, grads = jax.tree.map(lambda x: x / accum, (loss, aux, grads))
    with jax.named_scope("optimizer"):  # names its ops in the compiled program (launch/simulate.py)
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        grads = clip_gradients(grads, grad_norm, grad_clip)

        def update(params, opt):
            updates, opt = tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), opt

        # skip a non-finite step with a cond, not a select of old and new state: the update is then one fusion per
        # parameter on TPU (a select of bfloat16 moments split it in two), and the clipping's norm is the one above
        params, opt = jax.lax.cond(ok, update, lambda p, o: (p, o), state["params"], state["opt"])
    new = {"params": params, "opt": opt, "step": state["step"] + 1, "rng": state["rng"],
           "skipped": state["skipped"] + (~ok).astype(jnp.int32)}
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]), "skipped": (~ok).astype(jnp.int32),
               **aux}
    return new, metrics


def jit_train_step(s: Setup, accum: int = 1):
    """The one jitted step: explicit shardings, the train state donated."""
    fn = functools.partial(train_step, graphdef=s.graphdef, rest=s.rest, tx=s.tx, schedule=s.schedule, accum=accum,
                           grad_clip=s.grad_clip)
    return jax.jit(fn, in_shardings=(s.state_shardings, s.frozen_shardings, None),
                   out_shardings=(s.state_shardings, None), donate_argnums=(0,))


def jit_eval_step(s: Setup):
    def fn(params, frozen, batch, rng):
        return _loss(s.graphdef, params, frozen, s.rest, batch, rng)[1]

    return jax.jit(fn, in_shardings=(s.state_shardings["params"], s.frozen_shardings, None, None))


def merged_model(state, s: Setup) -> nnx.Module:
    return nnx.merge(s.graphdef, state["params"], s.frozen, s.rest)


# ---------------------------------------------------------------------------------------------------------------
# Building the model from a config file


def model_config(c, tokenizer):
    """GenLLaVAConfig from the config file's `model` section, with the tokenizer's vocabulary and special ids."""
    ids = SpecialIds.of(tokenizer, c.data.num_img_tokens)
    d = c.model.to_dict()
    d["llm"] = {**d["llm"], "vocab_size": max(d["llm"].get("vocab_size") or 0, len(tokenizer)),
                "bos_token_id": ids.bos, "eos_token_id": ids.eos, "pad_token_id": ids.pad}
    cfg = GenLLaVAConfig.from_dict({**d, "image_token_id": ids.image, "img_token_ids": ids.img})
    if cfg.num_patches != c.data.num_patches:
        raise errors.BadValue(f"data.num_patches={c.data.num_patches} but the vision tower gives {cfg.num_patches} "
                              f"patches ((image_size / patch_size) ** 2): set data.num_patches={cfg.num_patches}")
    if cfg.vision.image_size != c.data.image_size:
        raise errors.BadValue(f"data.image_size={c.data.image_size} != model.vision.image_size={cfg.vision.image_size}")
    if cfg.lambda_align and not c.data.get("caption_tokenizer"):
        raise errors.BadValue("model.lambda_align > 0 needs data.caption_tokenizer (the CLIP tokenizer, e.g. an SD "
                              "pipeline's tokenizer/)")
    if cfg.lambda_align and c.data.get("caption_max_len", 77) != cfg.head.num_query_tokens:
        raise errors.BadValue(f"data.caption_max_len={c.data.get('caption_max_len', 77)} must be model.head."
                              f"num_query_tokens={cfg.head.num_query_tokens} (the alignment loss compares them "
                              f"token by token)")
    return cfg


def init_parts(model, init_cfg, mesh) -> None:
    """Overwrites parts of `model` with our-format checkpoints named in config `init` (part -> path)."""
    for part, path in init_cfg.items():
        if not path:
            continue
        if not hasattr(model, part):
            raise errors.BadValue(f"init.{part}: the model has no part {part!r}")
        if str(path).endswith(".npy"):  # a single parameter, e.g. the null conditioning CLIP("")
            var, value = getattr(model, part), np.load(path)
            if value.size == var.get_value().size:
                value = value.reshape(var.get_value().shape)  # CLIP("") comes as (1, 77, 768)
            else:
                raise errors.BadValue(f"init.{part}={path}: shape {value.shape}, the model needs "
                                      f"{var.get_value().shape}")
            var.set_value(jax.device_put(value.astype(var.get_value().dtype), var.get_value().sharding))
            continue
        # restored in the model's parameter dtype (a converted checkpoint keeps its source's, e.g. bfloat16)
        loaded = checkpoint.load_module(path, mesh, param_dtype=getattr(model, part).cfg.param_dtype)
        if type(loaded) is not type(getattr(model, part)):
            raise errors.BadValue(f"init.{part}={path}: holds a {type(loaded).__name__}, but the model's {part} is "
                                  f"a {type(getattr(model, part)).__name__}")
        if part == "unet" and loaded.cfg.in_channels < model.unet.cfg.in_channels:
            loaded = _widen_unet(loaded, model.unet.cfg.in_channels, path)
        base = nnx.All(nnx.Param, nnx.Not(lora.LoRAParam))  # LoRA factors are not in a part's checkpoint
        target = dict(nnx.to_flat_state(nnx.state(getattr(model, part), base)))
        new = nnx.state(loaded, nnx.Param)
        flat = dict(nnx.to_flat_state(new))
        if target.keys() != flat.keys():
            raise errors.BadValue(f"init.{part}={path}: parameters differ from the model's part; missing "
                                  f"{sorted(map(str, target.keys() - flat.keys()))[:5]}, unexpected "
                                  f"{sorted(map(str, flat.keys() - target.keys()))[:5]}")
        for p, a in target.items():
            if a.get_value().shape != flat[p].get_value().shape:
                raise errors.BadValue(f"init.{part}={path}: parameter {'/'.join(map(str, p))} has shape "
                                      f"{flat[p].get_value().shape}, the model needs {a.get_value().shape}")
        nnx.update(getattr(model, part), new)


def _widen_unet(unet, in_channels: int, path):
    """A pretrained text-to-image UNet for edit_mode="latent_concat": InstructPix2Pix's recipe, conv_in widened to
    take the source latents through new input channels that start at zero (so it first behaves as pretrained)."""
    from genllava_jax.models.unet import widen_conv_in

    print(f"init.unet={path}: conv_in widened from {unet.cfg.in_channels} to {in_channels} input channels "
          f"(the new ones zero, as InstructPix2Pix)")
    return widen_conv_in(unet, in_channels - unet.cfg.in_channels)


# ---------------------------------------------------------------------------------------------------------------
# The loop


def new_model(cfg: GenLLaVAConfig, c) -> GenLLaVA:
    """The model of config `c`, initialised from `c.seed`, with the LoRA factors of `train.lora` (drawn after the
    model's own parameters: a run without LoRA initialises the same)."""
    rngs = nnx.Rngs(c.seed)
    return lora.apply(GenLLaVA(cfg, rngs=rngs), lora.configs(c.train.get("lora")), rngs)


def build(c, mesh=None):
    """(model config, sharded model with `init` parts loaded, tokenizer, mesh) from a config file's ConfigDict."""
    tokenizer = load_tokenizer(c.data.tokenizer, c.data.num_img_tokens)
    cfg = model_config(c, tokenizer)
    mesh = shd.make_mesh(dict(c.mesh)) if mesh is None else mesh
    model = shd.create_sharded(lambda: new_model(cfg, c), mesh, strict=c.strict_sharding)
    init_parts(model, c.init, mesh)
    return cfg, model, tokenizer, mesh


def run(c, workdir, *, mesh=None, stop_after: int | None = None) -> dict:
    """Trains for `c.train.steps` (resuming from the newest usable checkpoint in workdir); returns the last metrics.

    SIGTERM (preemption) saves a checkpoint at the next step boundary and returns; rerunning resumes. `stop_after`
    ends the loop early after that many steps of this call (tests use it to simulate a crash).
    """
    config_check.validate(c)
    workdir, tc = Path(workdir), c.train
    if tc.batch_size % (tc.accum * jax.process_count()):
        raise errors.BadValue(f"train.batch_size={tc.batch_size} must divide by train.accum={tc.accum} × "
                              f"{jax.process_count()} processes")
    mesh = shd.make_mesh(dict(c.mesh)) if mesh is None else mesh
    config_check.check_batch(tc, mesh)
    cfg, model, tokenizer, mesh = build(c, mesh)
    log = (lambda msg: print(msg, flush=True)) if jax.process_index() == 0 else (lambda msg: None)
    log(shd.sharding_report(nnx.state(model, nnx.Param), mesh)[0])
    state, s = setup(model, tc, mesh, c.seed)
    step_flops = flops.train_step_flops(model, cfg, c, {path[0] for path, _ in nnx.to_flat_state(state["params"])})
    del model
    data, info = make_dataset(c.data, tokenizer, global_batch=tc.batch_size, seed=c.seed)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
        (workdir / "model_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    mngr = checkpoint.train_manager(workdir / "checkpoints", tc.checkpoint_every, tc.keep_checkpoints, log)
    restored = checkpoint.restore_latest(mngr, checkpoint.abstract_like(state), checkpoint.abstract_like(s.frozen),
                                         data, log)
    if restored is not None:
        state, s.frozen, ckpt_step = restored
        log(f"resumed from step {ckpt_step} ({workdir / 'checkpoints'}); {int(state['skipped'])} steps skipped "
            f"so far; data {dict(info.counts.skipped) or 'all usable'}")
    step_fn = jit_train_step(s, tc.accum)
    eval_fn = jit_eval_step(s) if tc.eval_every and c.data.eval_path else None  # built once: compiled once
    writer = MetricWriter(workdir)
    start = int(state["step"])
    end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    progress = DataProgress(info, log)
    logger = hooks.Log(tc.log_every, Accumulator(), writer, progress.metrics, step_flops,
                       (flops.peak_flops(jax.devices()[0]) or 0) * jax.device_count())
    loop = [
        hooks.Preempt(),  # first: the others see whether this step is the last
        logger,
        hooks.SkipLimit(tc.max_skipped_steps, tc.log_every, mngr.latest_step),
        hooks.Every(tc.eval_every if eval_fn else 0, lambda t: writer.write(
            t.step, evaluate_loss(c, t.state, s, tokenizer, eval_fn), prefix="eval/")),
        hooks.Every(tc.sample_every, lambda t: save_samples(  # every host samples: the model spans them
            c, merged_model(t.state, s), tokenizer, workdir / "samples" / f"step_{t.step:07d}.png")),
        hooks.Checkpoint(lambda step, state, force: checkpoint.save_train(mngr, step, state, s.frozen, data, force),
                         tc.steps),
        hooks.Profile(tc.profile_steps, workdir / "profile", log),
    ]
    try:
        with jax.set_mesh(mesh):
            for hook in loop:
                hook.begin(start)
            for step in tqdm(range(start, end), initial=start, total=tc.steps, desc="train",
                             disable=jax.process_index() != 0):
                state, metrics = step_fn(state, s.frozen, to_global(next(data), s))
                logger.acc.add(metrics)
                tick = hooks.Tick(step + 1, state, end=step + 1 == end)
                for hook in loop:
                    hook(tick)
                if tick.stop:
                    log(f"preempted (SIGTERM): saving the checkpoint of step {tick.step} and exiting; run the same "
                        f"command again to resume")
                    break
    finally:  # an error still lets a save in flight finish
        for hook in reversed(loop):
            hook.close()
        mngr.wait_until_finished()
        mngr.close()
        writer.close()
    return logger.rows[-1]


class DataProgress:
    """The data counts of every process for the log (a collective), and a message when a data epoch ends."""

    def __init__(self, info, log):
        self.info, self.log = info, log
        self.num_records = sum(info.num_records.values())  # all sources, all processes
        self.epoch = global_counts(info.counts).read // self.num_records

    def metrics(self, t: hooks.Tick) -> dict:
        counts = global_counts(self.info.counts)
        if counts.read // self.num_records > self.epoch:
            self.epoch = counts.read // self.num_records
            self.log(f"data epoch {self.epoch} done at step {t.step}: {counts.read} records read, skipped "
                     f"{dict(counts.skipped) or 'none'}, truncated {counts.fixed['truncated']}")
        return {"skipped_steps": int(t.state["skipped"]),  # in the state: counted across restarts
                "data_epoch": counts.read / self.num_records, "data_truncated": counts.fixed["truncated"],
                **{f"data_skipped/{k}": v for k, v in sorted(counts.skipped.items())}}


def evaluate_loss(c, state, s: Setup, tokenizer, eval_fn=None) -> dict:
    """Mean eval-step metrics over `train.eval_batches` batches of `data.eval_path` (one pass, file order).
    `eval_fn`: a `jit_eval_step(s)` to reuse (a new one compiles again)."""
    data_cfg = c.data.copy_and_resolve_references()
    data_cfg.path = c.data.eval_path
    it, _ = make_dataset(data_cfg, tokenizer, global_batch=c.train.batch_size, seed=c.seed, train=False)
    batches = [b for _, b in zip(range(c.train.eval_batches), it)]
    n = len(batches)
    if jax.process_count() > 1:  # every host must run every step: as many batches as the shortest share holds
        n = int(np.min(multihost_utils.process_allgather(np.int32(n))))
    eval_fn, out = eval_fn or jit_eval_step(s), None
    for batch in batches[:n]:
        m = eval_fn(state["params"], s.frozen, to_global(batch, s), jax.random.PRNGKey(c.seed))
        out = m if out is None else jax.tree.map(jnp.add, out, m)
    return {k: float(v) / n for k, v in jax.device_get(out).items()} if n else {}


def save_samples(c, model, tokenizer, path) -> None:
    """A PNG grid of images generated for the first rows with a target image in `data.eval_path` (or the train set)."""
    from PIL import Image

    from genllava_jax import infer  # the decoder and sampler: only when sampling

    data_cfg = c.data.copy_and_resolve_references()
    data_cfg.path = c.data.eval_path or c.data.path
    it, _ = make_dataset(data_cfg, tokenizer, global_batch=16, seed=c.seed, train=False, process_index=0,
                         process_count=1)
    batch = next(it)
    rows = np.flatnonzero(batch["has_target"])
    if not len(rows):
        return
    batch = {k: v[rows] for k, v in batch.items()}
    images = infer.images(model, batch, num_steps=c.sample.num_steps, guidance_scale=c.sample.guidance_scale,
                          sampler=c.sample.sampler)
    if jax.process_index() != 0:
        return
    targets = ((batch["target_image"] + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(infer.image_grid(np.concatenate([targets, images]), cols=len(rows))).save(path)


def load_trained(workdir, mesh=None, merge_lora: bool = True):
    """(GenLLaVA with the newest checkpoint's weights, GenLLaVAConfig) from a training workdir. Reads the params
    only: not the optimizer moments (twice the trainable weights again). A LoRA run's factors are merged into the
    kernels unless `merge_lora=False`."""
    workdir = Path(workdir)
    cfg = GenLLaVAConfig.from_dict(json.loads((workdir / "model_config.json").read_text()))
    mesh = shd.make_mesh({"data": 1}, jax.local_devices()[:1]) if mesh is None else mesh
    c = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    abstract = nnx.eval_shape(lambda: new_model(cfg, c))
    graphdef, params, frozen, rest = split_model(abstract, c.train)
    mngr = checkpoint.ocp.CheckpointManager((workdir / "checkpoints").absolute())
    step = mngr.latest_step()
    if step is None:
        raise errors.MissingFile(f"{workdir / 'checkpoints'}: no checkpoint")
    args = checkpoint.ocp.args.Composite(
        state=checkpoint.partial_restore_args(
            {"params": shd.with_shardings(params, shd.state_shardings(params, mesh))}),
        frozen=checkpoint.ocp.args.StandardRestore(shd.with_shardings(frozen, shd.state_shardings(frozen, mesh))))
    out = mngr.restore(step, args=args)
    mngr.close()
    model = nnx.merge(graphdef, out["state"]["params"], out["frozen"], rest)
    return (lora.merge(model) if merge_lora else model), cfg


def main(argv):
    from absl import flags

    from genllava_jax import distributed

    del argv
    distributed.initialize()  # multi-host: before anything touches a device
    run(flags.FLAGS.config, flags.FLAGS.workdir)


def cli():
    """`genllava-train` / `python -m genllava_jax.train`: --config, --workdir and the distributed flags."""
    from absl import flags
    from ml_collections import config_flags

    from genllava_jax import distributed  # noqa: F401  defines --distributed, --coordinator_address, ...

    config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
    flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl, TensorBoard")
    flags.mark_flags_as_required(["config", "workdir"])
    errors.run(main)


if __name__ == "__main__":
    cli()
