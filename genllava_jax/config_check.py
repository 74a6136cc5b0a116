"""Checks a training config before anything is built: unknown keys (with the close match), missing keys, wrong
types and bad values in one error; and that the batch splits over the data-parallel devices of the mesh.

A new key the code reads must be added here (TRAIN_FIELDS, ...; data keys come from `default_data_config`, model
keys from the config dataclasses).
"""

from __future__ import annotations

import dataclasses
import difflib
import math

from genllava_jax.errors import BadValue

# What the code reads from each section and the type it expects; a tuple of types means any of them.
NUMBER = (int, float)
TRAIN_FIELDS = dict(steps=int, batch_size=int, accum=int, lr=NUMBER, warmup_frac=NUMBER, weight_decay=NUMBER,
                    b1=NUMBER, b2=NUMBER, grad_clip=NUMBER, trainable=(tuple, list), log_every=int,
                    checkpoint_every=int, keep_checkpoints=int, sample_every=int, eval_every=int, eval_batches=int,
                    max_skipped_steps=int)
TRAIN_OPTIONAL = dict(warmup_steps=(int, type(None)), final_lr_frac=NUMBER, lr_scales=(tuple, list))
SAMPLE_FIELDS = dict(num_steps=int, guidance_scale=NUMBER, sampler=str)
TOP_FIELDS = dict(seed=int, mesh=dict, data=dict, model=dict, train=dict)
TOP_OPTIONAL = dict(init=dict, sample=dict)
AT_LEAST_ONE = ("steps", "batch_size", "accum", "log_every", "checkpoint_every", "keep_checkpoints")


def _section_errors(name: str, d: dict, fields: dict, optional: dict | None = None, check_types: bool = True):
    optional = optional or {}
    known = {**fields, **optional}
    errors = []
    for key in d:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            errors.append(f"unknown key {name}.{key}" + (f": did you mean {name}.{close[0]}?" if close else
                                                         f" (known: {', '.join(sorted(known))})"))
    errors += [f"missing key {name}.{key}" for key in fields if key not in d]
    for key, want in known.items():
        if check_types and key in d:
            types = want if isinstance(want, tuple) else (want,)
            v = d[key]
            if isinstance(v, bool) and bool not in types or not isinstance(v, types):
                errors.append(f"{name}.{key}={v!r} is a {type(v).__name__}; expected "
                              f"{' or '.join(t.__name__ for t in types)}")
    return errors


def validate(c) -> None:
    """Raises ValueError listing every unknown key (with the close match), missing key, wrong type or bad value."""
    from genllava_jax.data.pipeline import default_data_config
    from genllava_jax.models.genllava import PARTS, GenLLaVAConfig

    d = c.to_dict() if hasattr(c, "to_dict") else dict(c)
    errors = _section_errors("config", d, TOP_FIELDS, TOP_OPTIONAL)
    if isinstance(d.get("train"), dict):
        errors += _section_errors("train", d["train"], TRAIN_FIELDS, TRAIN_OPTIONAL)
        errors += [f"train.{k}={d['train'][k]} must be at least 1" for k in AT_LEAST_ONE
                   if isinstance(d["train"].get(k), int) and d["train"][k] < 1]
        lr = d["train"].get("lr")
        if isinstance(lr, NUMBER) and not (math.isfinite(lr) and lr > 0):
            errors.append(f"train.lr={lr} must be a finite positive number")
    if isinstance(d.get("data"), dict):
        data_fields = {k: (type(v),) for k, v in default_data_config().items()}
        data_fields["path"] = (str, list, tuple)  # a list of dict(path=..., weight=...) in a config file
        data_fields["max_image_pixels"] = (int, type(None))
        errors += _section_errors("data", d["data"], {}, {**data_fields, "eval_path": str})
    if isinstance(d.get("sample"), dict):
        errors += _section_errors("sample", d["sample"], SAMPLE_FIELDS)
    if isinstance(d.get("model"), dict):
        top = {f.name: None for f in dataclasses.fields(GenLLaVAConfig)} | {n: None for n in PARTS}
        top.pop("image_token_id"), top.pop("img_token_ids")  # from the tokenizer
        errors += _section_errors("model", d["model"], {}, top, check_types=False)
        for part, cls in PARTS.items():
            if isinstance(d["model"].get(part), dict):
                errors += _section_errors(f"model.{part}", d["model"][part], {},
                                          {f.name: None for f in dataclasses.fields(cls)}, check_types=False)
    if errors:
        raise BadValue("config errors:\n  " + "\n  ".join(errors))


def check_batch(tc, mesh) -> None:
    """The batch must split evenly over the data-parallel devices (data × fsdp), in every micro-batch."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    unit = dp * tc.accum
    if tc.batch_size % unit:
        raise BadValue(f"train.batch_size={tc.batch_size} must be a multiple of data×fsdp={dp} × train.accum="
                       f"{tc.accum} = {unit} (every device takes an equal share of each micro-batch): set "
                       f"train.batch_size={-(-tc.batch_size // unit) * unit}, or change the mesh or train.accum")
