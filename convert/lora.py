"""LoRA factors (genllava_jax.lora) <-> PEFT adapters, and the command line that merges and exports them.

    python -m convert.lora merge --workdir=runs/lora --out=ckpt/llm_merged [--hf] [--part=unet]
    python -m convert.lora to-peft --workdir=runs/lora --out=hf/adapter --base-out=hf/base [--part=unet]
    python -m convert.lora from-peft hf/adapter --base=ckpt/mistral --out=ckpt/mistral_adapted [--hf]

`--part` is the trained part (`train.lora.<part>`): `llm` (default; MistralForCausalLM), `unet` (diffusers'
UNet2DConditionModel) or `head` (the Q-former head; `convert.torch_genllava.TorchHead` in torch). `to-peft` writes
`adapter_config.json` + `adapter_model.safetensors` as `peft` saves them for the part's torch model and, with
`--base-out`, the trained part without its factors as a HF folder: `PeftModel.from_pretrained(base model, adapter)`
is then our part. The base is the trained one (LoRA freezes only the kernels it adapts; embeddings, norms and the
head may have trained too). `from-peft` loads an adapter onto one of our Mistral, UNet or Q-former head checkpoints
and writes the merged model.

Keys come from the part's converter table: our `layers/q/kernel` is HF's `model.layers.{i}.self_attn.q_proj.weight`,
so its factors are `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (rank, in) and
`...lora_B.weight` (out, rank), by the same transform as the kernel (A as an (in..., rank) kernel, B as (rank, out...)).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from genllava_jax import converter, errors, lora
from genllava_jax import sharding as shd
from genllava_jax.atomic import atomic_write

from .common import ConversionError, Conv, Layout, Linear, Rule, TensorReader, flat_vars, read_json
from .stream import Tensor, write_safetensors

PREFIX = "base_model.model."  # PeftModel wraps the HF model (base_model) that wraps the transformer (model)
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model"
# adapter_config.json fields whose non-default values our LoRA cannot represent
UNSUPPORTED = {"use_dora": False, "use_rslora": False, "bias": "none", "lora_bias": False, "fan_in_fan_out": False,
               "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
               "modules_to_save": None, "trainable_token_indices": None, "target_parameters": None,
               "layer_replication": None, "exclude_modules": None}


def _linear_rules(layout: Layout, module: nnx.Module) -> dict[str, Rule]:
    """{path of one of the module's Linears: the rule of its kernel}."""
    have = lora.linears(module)
    return {r.ours.removesuffix("/kernel"): r for r in layout.rules
            if r.ours.endswith("/kernel") and isinstance(r.transform, Linear) and r.ours[:-7] in have}


def _hf_modules(rule: Rule, layers: int | None) -> list[str]:
    """The HF module names (keys less `.weight`) of a kernel rule: one per stacked layer."""
    keys = [rule.key(i) for i in range(layers)] if rule.stacked else [rule.hf]
    return [k.removesuffix(".weight") for k in keys]


def _layers(rule: Rule, lin) -> int | None:
    return lin.kernel.get_value().shape[0] if rule.stacked else None


def _all_modules(module: nnx.Module, layout: Layout) -> set[str]:
    """Every HF module name the layout implies: each parameter's module and the containers above it."""
    shapes = {p: v.get_value().shape for p, v in flat_vars(nnx.state(module, nnx.Param)).items()}
    out = set()
    for r in layout.rules:
        if r.ours in shapes:
            for key in ([r.key(i) for i in range(shapes[r.ours][0])] if r.stacked else [r.hf]):
                parts = key.split(".")[:-1]
                out.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    return out


def _target_modules(adapted: set[str], every: set[str]) -> list[str]:
    """PEFT's `target_modules` for the HF modules `adapted`: for each, the shortest dotted suffix of its name (not
    starting at a bare list index) that ends no other module's name, e.g. `q_proj`, or diffusers' `to_out.0`."""
    targets = set()
    for name in adapted:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not parts[-k].isdigit() and all(n in adapted for n in every if n == suffix or n.endswith("." + suffix)):
                targets.add(suffix)
                break
        else:
            targets.add(name)
    return sorted(targets)


# ---------------------------------------------------------------------------------------------------------------
# Export


def adapter_tensors(module: nnx.Module, layout: Layout, dtype=None) -> list[Tensor]:
    """The PEFT tensors of every LoRA in `module`, each read from its devices when it is written."""
    rules, linears = _linear_rules(layout, module), lora.linears(module)
    out = []
    for path, lo in sorted(lora.adapted(module).items()):
        if path not in rules:
            raise ConversionError(f"{path}: LoRA on a linear layer the HF layout has no key for")
        rule = rules[path]
        a, b = lo.a.get_value(), lo.b.get_value()
        for i, name in enumerate(_hf_modules(rule, _layers(rule, linears[path]))):
            for suffix, x, transform in (("lora_A", a, rule.transform), ("lora_B", b, Linear(n_in=1))):
                layer_shape = x.shape[1:] if rule.stacked else x.shape
                hf_shape = tuple(transform.hf_shape(layer_shape))
                dt = np.dtype(dtype or x.dtype)

                def read(x=x, i=i, rule=rule, transform=transform, hf_shape=hf_shape, dt=dt):
                    layer = np.asarray(jax.device_get(x[i] if rule.stacked else x))
                    return np.require(transform.to_hf(layer, hf_shape).astype(dt, copy=False), requirements="C")

                out.append(Tensor(f"{PREFIX}{name}.{suffix}.weight", hf_shape, dt, read))
    return out


def task_type(module: nnx.Module) -> str | None:
    """PEFT's task type of the part's torch model: causal LM for the LLM, none (a plain PeftModel) otherwise."""
    from genllava_jax.models.mistral import Mistral

    return "CAUSAL_LM" if isinstance(module, Mistral) else None


def peft_config(module: nnx.Module, layout: Layout, base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json for the LoRA in `module`: one rank, alpha and dropout (PEFT's `r`, `lora_alpha`,
    `lora_dropout`), and `target_modules` as the module names' shortest suffixes that select exactly the adapted
    layers."""
    adapted = lora.adapted(module)
    if not adapted:
        raise ConversionError("the model has no LoRA factors to export")
    settings = {(lo.rank, lo.scale * lo.rank, lo.dropout) for lo in adapted.values()}
    if len(settings) > 1:
        raise ConversionError(f"LoRA with different rank/alpha/dropout per layer {sorted(settings)}: one adapter "
                              f"config holds one of each")
    rank, alpha, dropout = settings.pop()
    rules, linears = _linear_rules(layout, module), lora.linears(module)
    names = {n for p in adapted if p in rules for n in _hf_modules(rules[p], _layers(rules[p], linears[p]))}
    targets = _target_modules(names, _all_modules(module, layout))
    return {"peft_type": "LORA", "task_type": task_type(module), "base_model_name_or_path": base_model_name_or_path,
            "r": rank, "lora_alpha": float(alpha), "lora_dropout": float(dropout), "target_modules": targets,
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "use_rslora": False, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None}


def write_peft(module: nnx.Module, layout: Layout, out, *, base_model_name_or_path: str | None = None, dtype=None,
               overwrite: bool = False) -> None:
    """Writes the LoRA of `module` as a PEFT adapter folder (atomically: a temporary folder renamed at the end)."""
    cfg = peft_config(module, layout, base_model_name_or_path)
    tensors = adapter_tensors(module, layout, dtype)
    with atomic_write(out, directory=True, overwrite=overwrite) as tmp:
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2))
        write_safetensors(tensors, tmp, prefix=WEIGHTS, max_shard_bytes=math.inf)  # PEFT reads one file


# ---------------------------------------------------------------------------------------------------------------
# Import


def _matches(target, name: str) -> bool:
    """PEFT's rule: a string is a regex the whole module name must match; a list entry, the name or its last
    dotted parts."""
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def _check_config(cfg: dict, file: Path) -> None:
    if cfg.get("peft_type") != "LORA":
        raise ConversionError(f"{file}: peft_type={cfg.get('peft_type')!r}, only LORA adapters are read")
    for key, default in UNSUPPORTED.items():
        value = cfg.get(key, default)
        if not (value == default or (default in (None, {}) and value in (None, [], {}))):
            raise ConversionError(f"{file}: {key}={value!r} is not supported (our LoRA is plain LoRA: {key}="
                                  f"{default!r})")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise ConversionError(f"{file}: no {key!r}")


def read_peft(module: nnx.Module, layout: Layout, adapter, mesh=None) -> nnx.Module:
    """Adds the factors of the PEFT adapter folder `adapter` to `module` (whose HF layout is `layout`), in place;
    returns it. Every key must be one of the adapted layers' and every adapted layer's keys present."""
    adapter = Path(adapter)
    file = adapter / CONFIG
    cfg = read_json(file)
    _check_config(cfg, file)
    targets = cfg["target_modules"]
    rules, linears = _linear_rules(layout, module), lora.linears(module)
    paths = []
    for p, r in rules.items():
        names = _hf_modules(r, _layers(r, linears[p]))
        # "all-linear": PEFT's every linear layer but a transformers model's output head
        hit = [n != "lm_head" if targets == "all-linear" else _matches(targets, n) for n in names]
        if all(hit):
            paths.append(p)
        elif any(hit):
            raise ConversionError(f"{file}: target_modules={targets!r} adapts {sum(hit)} of the {len(hit)} layers of "
                                  f"{names[0]}...: our stacked layers take LoRA in all of them or none")
    if not paths:
        raise ConversionError(f"{file}: target_modules={targets!r} match none of the model's linear layers")
    try:
        lcfg = lora.LoRAConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                               dropout=float(cfg.get("lora_dropout") or 0.0), targets=())
    except errors.BadValue as e:
        raise ConversionError(f"{file}: {e}") from e
    reader = TensorReader(adapter, prefix=WEIGHTS)
    want = {}
    for p in paths:
        rule = rules[p]
        for i, name in enumerate(_hf_modules(rule, _layers(rule, linears[p]))):
            want[f"{PREFIX}{name}.lora_A.weight"] = (p, i if rule.stacked else None, "a")
            want[f"{PREFIX}{name}.lora_B.weight"] = (p, i if rule.stacked else None, "b")
    missing, unexpected = sorted(set(want) - set(reader.keys())), sorted(set(reader.keys()) - set(want))
    if missing or unexpected:
        convs = {f"{PREFIX}{r.hf.removesuffix('.weight')}." for r in layout.rules if isinstance(r.transform, Conv)}
        why = ("; LoRA on convolutions is not supported (ours adapts linear layers only)"
               if any(k.startswith(tuple(convs)) for k in unexpected) else "")
        raise ConversionError(f"{adapter / WEIGHTS}.safetensors: " + "; ".join(
            f"{what} keys {keys[:5]}" + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys) + why)
    lora.add(module, lcfg, None, paths=paths)
    for p in paths:
        lo, rule = linears[p].lora, rules[p]
        for name, transform in (("a", rule.transform), ("b", Linear(n_in=1))):
            var = getattr(lo, name)
            shape, dtype = var.get_value().shape, var.get_value().dtype
            layer_shape = shape[1:] if rule.stacked else shape
            keys = [k for k, (q, _, n) in want.items() if q == p and n == name]  # in layer order
            slices = []
            for key in keys:
                got = reader.info(key)[0]
                if tuple(got) != tuple(transform.hf_shape(layer_shape)):
                    raise ConversionError(f"{key}: shape {tuple(got)} in the adapter, the model needs "
                                          f"{tuple(transform.hf_shape(layer_shape))} (rank {lcfg.rank})")
                slices.append(transform.to_ours(reader.get(key), layer_shape).astype(dtype))
            var.set_value(jnp.asarray(np.stack(slices) if rule.stacked else slices[0]))
        if mesh is not None:
            graphdef, state = nnx.split(lo)
            linears[p].lora = nnx.merge(graphdef, jax.device_put(state, shd.state_shardings(state, mesh)))
    return module


# ---------------------------------------------------------------------------------------------------------------
# Command line


def _mesh():
    return shd.make_mesh({"data": 1}, jax.local_devices()[:1])


def main(argv=None) -> int:
    """`python -m convert.lora`: user errors as one line, status 2."""
    return errors.guard(_main, argv)


# a trained part (GenLLaVA's attribute, train.lora.<part>) -> the part name of its checkpoints and converter module
PARTS = {"llm": "mistral", "unet": "unet", "head": "qformer"}


def _main(argv) -> int:
    from genllava_jax import checkpoint, train

    p = argparse.ArgumentParser(prog="python -m convert.lora", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="a LoRA run's part with the factors folded into its kernels")
    t = sub.add_parser("to-peft", help="a LoRA run's factors of one part as a PEFT adapter (+ its base as a HF folder)")
    for s in (m, t):
        s.add_argument("--workdir", required=True, help="the training run (its newest checkpoint)")
        s.add_argument("--part", choices=sorted(PARTS), default="llm", help="the part trained with LoRA (default llm)")
    m.add_argument("--hf", action="store_true", help="write the part's HF folder, not our checkpoint")
    t.add_argument("--base-out", help="also write the part without its factors here (a HF folder)")
    f = sub.add_parser("from-peft", help="a PEFT adapter loaded onto our Mistral, UNet or Q-former head, merged")
    f.add_argument("adapter", help="a folder with adapter_config.json and adapter_model.safetensors")
    f.add_argument("--base", required=True, help="our checkpoint of the part (python -m convert PART --from-hf)")
    f.add_argument("--hf", action="store_true", help="write the part's HF folder, not our checkpoint")
    for s in (m, t, f):
        s.add_argument("--out", required=True)
        s.add_argument("--overwrite", action="store_true")
        errors.add_verbose(s)
    errors.add_verbose(p)
    a = p.parse_args(argv)

    if a.command in ("merge", "to-peft"):
        if not (Path(a.workdir) / "model_config.json").is_file():
            raise errors.MissingFile(f"--workdir {a.workdir}: not a training run (no model_config.json)")
        model, _ = train.load_trained(a.workdir, _mesh(), merge_lora=a.command == "merge")
        part, module = PARTS[a.part], getattr(model, a.part)
        conv = converter(part)
        if a.command == "to-peft":
            if not lora.adapted(module):
                raise errors.BadValue(f"--workdir {a.workdir}: its {a.part} has no LoRA factors "
                                      f"(train.lora.{a.part}.rank 0)")
            base = str(Path(a.base_out).absolute()) if a.base_out else None
            write_peft(module, conv.layout(module), a.out, base_model_name_or_path=base, overwrite=a.overwrite)
            if a.base_out:
                conv.to_hf(lora.strip(module), a.base_out, overwrite=a.overwrite)
            print(f"wrote {a.out}" + (f" and {a.base_out}" if a.base_out else ""))
            return 0
    else:
        part = checkpoint.read_config(a.base)[0]
        if part not in PARTS.values():
            raise errors.BadValue(f"--base {a.base}: holds a {part} checkpoint; adapters load onto "
                                  f"{', '.join(sorted(PARTS.values()))}")
        module, conv = checkpoint.load_module(a.base, _mesh()), converter(part)
        lora.merge(read_peft(module, conv.layout(module), a.adapter, _mesh()))
    if a.hf:
        conv.to_hf(module, a.out, overwrite=a.overwrite)
    else:
        checkpoint.save_module(a.out, module, part, overwrite=a.overwrite)
    print(f"wrote {a.out} ({'HF' if a.hf else 'our'} {part}, LoRA merged)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
