"""Checks a training config before anything is built: unknown keys (with the close match), missing keys, wrong
types and bad values in one error; and that the batch splits over the data-parallel devices of the mesh.

The known keys and their types come from the one schema, `genllava_jax.config.base_config` (model keys from the
parts' config dataclasses): a new key is added there, with its default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math

from genllava_jax.errors import BadValue

NUMBER = (int, float)
# what a key may hold besides the type of its default
ALSO = {"data.path": (list, tuple),  # a list of dict(path=..., weight=...) in a config file
        "data.max_image_pixels": (type(None),)}
OPTIONAL = ("config.init", "config.sample", "data.*")  # keys a config may leave out (the code has their defaults)
AT_LEAST_ONE = ("steps", "batch_size", "accum", "log_every", "checkpoint_every", "keep_checkpoints")


def _types(default, also=()) -> tuple[type, ...]:
    """The types a key with this default takes: a float also takes an int, a tuple a list, None its placeholder's."""
    if default is None:
        return (type(None),) + also
    from ml_collections import config_dict

    t = type(default)
    mapping = isinstance(default, (dict, config_dict.ConfigDict))
    base = {float: NUMBER, tuple: (tuple, list), list: (tuple, list)}.get(t, (dict,) if mapping else (t,))
    return base + also


def schema() -> dict[str, dict[str, tuple[type, ...] | None]]:
    """section -> {key: accepted types}, from base_config ("config" is the top level)."""
    from ml_collections import config_dict

    from genllava_jax.config import base_config

    c = base_config()
    out = {"config": {k: (dict,) if isinstance(v, (dict, config_dict.ConfigDict)) else _types(v)
                      for k, v in c.items()}}
    for section in ("data", "train", "sample"):
        fields = c[section]
        out[section] = {}
        for key in fields:
            ref = fields.get_ref(key) if isinstance(fields, config_dict.ConfigDict) else None
            default = fields[key]
            if default is None and ref is not None:  # a placeholder: its declared type, or None
                out[section][key] = (ref.get_type(), type(None))
            else:
                out[section][key] = _types(default, ALSO.get(f"{section}.{key}", ()))
    return out


def _section_errors(name: str, d: dict, fields: dict, required: bool = True, check_types: bool = True):
    """Unknown keys, wrong types and (if `required`) missing keys of one section, `fields` = {key: types or None}."""
    errors = []
    for key in d:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            errors.append(f"unknown key {name}.{key}" + (f": did you mean {name}.{close[0]}?" if close else
                                                         f" (known: {', '.join(sorted(fields))})"))
    if required:
        errors += [f"missing key {name}.{key}" for key in fields if key not in d
                   and f"{name}.{key}" not in OPTIONAL and f"{name}.*" not in OPTIONAL]
    for key, types in fields.items():
        if check_types and key in d and types is not None:
            v = d[key]
            if isinstance(v, bool) and bool not in types or not isinstance(v, types):
                errors.append(f"{name}.{key}={v!r} is a {type(v).__name__}; expected "
                              f"{' or '.join(t.__name__ for t in types)}")
    return errors


def _choice_errors(name: str, part: dict) -> list[str]:
    """A tower's attention backend and remat policy, checked before anything is built."""
    from genllava_jax.attention import BACKENDS
    from genllava_jax.layers import remat_policy

    errors = []
    if "attention" in part and part["attention"] not in BACKENDS:
        errors.append(f"{name}.attention={part['attention']!r}: choose one of {BACKENDS}")
    if "remat" in part:
        try:
            remat_policy(part["remat"])
        except ValueError as e:
            errors.append(f"{name}.remat: {e}")
    return errors


def validate(c) -> None:
    """Raises ValueError listing every unknown key (with the close match), missing key, wrong type or bad value."""
    from genllava_jax.models.genllava import PARTS, GenLLaVAConfig

    d = c.to_dict() if hasattr(c, "to_dict") else dict(c)
    known = schema()
    errors = _section_errors("config", d, known["config"])
    for section in ("data", "train", "sample"):
        if isinstance(d.get(section), dict):
            errors += _section_errors(section, d[section], known[section])
    if isinstance(d.get("train"), dict):
        errors += [f"train.{k}={d['train'][k]} must be at least 1" for k in AT_LEAST_ONE
                   if isinstance(d["train"].get(k), int) and d["train"][k] < 1]
        lr = d["train"].get("lr")
        if isinstance(lr, NUMBER) and not (math.isfinite(lr) and lr > 0):
            errors.append(f"train.lr={lr} must be a finite positive number")
        if isinstance(d["train"].get("lora"), dict):
            errors += _lora_errors(d["train"]["lora"])
    if isinstance(d.get("model"), dict):
        fields = {f.name: None for f in dataclasses.fields(GenLLaVAConfig)} | {n: None for n in PARTS}
        fields.pop("image_token_id"), fields.pop("img_token_ids")  # from the tokenizer
        errors += _section_errors("model", d["model"], fields, required=False, check_types=False)
        for part, cls in PARTS.items():
            if isinstance(d["model"].get(part), dict):
                errors += _section_errors(f"model.{part}", d["model"][part],
                                          {f.name: None for f in dataclasses.fields(cls)}, required=False)
                errors += _choice_errors(f"model.{part}", d["model"][part])
    if errors:
        raise BadValue("config errors:\n  " + "\n  ".join(errors))


def _lora_errors(section: dict) -> list[str]:
    """train.lora: part -> LoRAConfig fields; the part must be one of the model's, the fields LoRAConfig's."""
    from genllava_jax.lora import LoRAConfig
    from genllava_jax.models.genllava import PARTS

    modules = sorted(set(PARTS) - {"schedule"})
    defaults = LoRAConfig()
    fields = {f.name: _types(getattr(defaults, f.name)) for f in dataclasses.fields(LoRAConfig)}
    errors = []
    for part, v in section.items():
        if part not in modules:
            errors.append(f"train.lora.{part}: the model has no part {part!r} (its parts: {', '.join(modules)})")
        elif not isinstance(v, dict):
            errors.append(f"train.lora.{part}={v!r} must be a dict of {', '.join(fields)}")
        else:
            found = _section_errors(f"train.lora.{part}", v, fields, required=False)
            if not found:
                try:
                    LoRAConfig(**v)
                except BadValue as e:
                    found = [f"train.lora.{part}: {e}"]
            errors += found
    return errors


def check_batch(tc, mesh) -> None:
    """The batch must split evenly over the data-parallel devices (data × fsdp), in every micro-batch."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    unit = dp * tc.accum
    if tc.batch_size % unit:
        raise BadValue(f"train.batch_size={tc.batch_size} must be a multiple of data×fsdp={dp} × train.accum="
                       f"{tc.accum} = {unit} (every device takes an equal share of each micro-batch): set "
                       f"train.batch_size={-(-tc.batch_size // unit) * unit}, or change the mesh or train.accum")
