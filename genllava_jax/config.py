"""The one config schema: every key the code reads, with its default. An experiment config overrides it:

    from genllava_jax.config import base_config

    def get_config():
        c = base_config()
        c.train.update(steps=1400, lr=1e-3)
        c.model.llm = dict(hidden_size=128, ...)
        return c

`config_check` derives the known keys and their types from here: a new key is added here, with its default, and
nowhere else. The defaults are the paper's 7B recipe (Prismatic's single-stage AdamW settings). The model parts'
own defaults are their config dataclasses' (`genllava_jax.models.*`); `model` holds only what a config changes.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def data_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        # A GVIT .json/.jsonl/.arrayrecord file, "a.jsonl:3,b.arrayrecord:1" (weighted mixture), or, set in a config
        # file, a list of dict(path=..., weight=...).
        path="",
        tokenizer="",  # a local HF tokenizer directory (genllava_jax.data.tokenizer.load_tokenizer)
        max_len=256,  # every sequence is padded or cut to this length
        image_size=224,  # SigLIP input side
        num_patches=256,  # <image> expands to this many positions: (image_size / patch_size) ** 2
        target_image_size=256,  # VAE input side (target and source images)
        num_img_tokens=16,  # [IMG0..N-1]
        on_too_long="truncate",  # or "drop"; a cut that would split the image or [SOI]..[EOI] drops the record
        max_image_pixels=2**25,  # larger images (width x height, read from the header) are skipped undecoded
        image_root="",  # image paths must resolve inside this folder; "" = each data file's folder
        worker_count=0,  # grain worker processes (0: decode in this process)
        read_threads=2,  # threads decoding records ahead of the consumer
        eval_path="",  # held-out GVIT file for train.eval_every / train.sample_every
        caption_tokenizer="",  # a CLIP tokenizer directory: captions are tokenized for model.lambda_align
        caption_max_len=77,  # caption tokens (padded / cut): the head's num_query_tokens, 77 for SD
    ))


def train_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        steps=10000, batch_size=128,
        accum=1,  # gradient accumulation: micro-batches per step (lax.scan)
        lr=2e-5, warmup_frac=0.03,
        warmup_steps=config_dict.placeholder(int),  # None: warmup_frac × steps
        final_lr_frac=0.0,  # the cosine decays to lr × this
        weight_decay=0.1, b1=0.9, b2=0.999, grad_clip=1.0,
        mu_dtype=config_dict.placeholder(str),  # AdamW's first moment: None (float32, as the params) or "bfloat16"
        trainable=("projector/.*", "llm/.*", "head/.*", "null_cond"),  # regexes over parameter paths
        lr_scales=(),  # ((regex, factor), ...): the learning rate of matching parameters times the factor
        log_every=10, checkpoint_every=500, keep_checkpoints=3,
        sample_every=0, eval_every=0, eval_batches=4,  # 0: never
        max_skipped_steps=20,  # steps with a non-finite loss or gradient allowed before the run stops
        profile_steps=(),  # (first, last): a jax.profiler trace of those steps (from 1) into <workdir>/profile
        # LoRA, per part: part -> genllava_jax.lora.LoRAConfig fields (rank 0: none); a config file may add parts,
        # e.g. c.train.lora.head = dict(rank=8). The kernels LoRA adapts are frozen; its factors always train.
        lora=dict(llm=dict(rank=0, alpha=16.0, dropout=0.0, targets=("layers/.*",))),
    ))


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = dict(data=1, fsdp=-1, tensor=1)  # one axis may be -1: the remaining devices
    c.strict_sharding = False  # True: a mesh axis that does not divide a parameter it should split is an error
    c.data = data_config()
    c.model = ml_collections.ConfigDict()  # part -> overrides of its config dataclass, and GenLLaVAConfig fields
    c.init = ml_collections.ConfigDict()  # part -> our-format checkpoint (python -m convert ...) or a .npy
    c.train = train_config()
    c.sample = dict(num_steps=50, guidance_scale=7.5, sampler="ddim")  # train.sample_every's sampler
    return c
