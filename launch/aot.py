"""Does it fit? Compiles the joint train step (and the eval step) for a TPU topology on this CPU, via libtpu.

    python -m launch.aot --config=configs/genllava_7b.py --topology=v5p-8 --config.data.max_len=2048 \
        [--mesh=data=1,fsdp=-1,tensor=1] [--remat=full | --remat="llm=save_dots_except_mlp;unet=full"] \
        [--per_device_batch=2] [--config.model.llm.attention=xla]
    python -m launch.aot ... --search [--meshes="fsdp=16;fsdp=8,tensor=2"] [--remats="full;offload_layer_input"]
    python -m launch.aot ... --simulate [--reduced_depth=llm=2,vision=3] [--pallas_efficiency=0.5]

Nothing is allocated: the model, train state and batch are abstract (shapes, dtypes and the shardings the rules
give on a mesh over the topology's compile-only devices), the step is `train.jit_train_step(...).lower(...)
.compile()`. Prints per-chip memory (arguments, outputs, temporaries, total vs the chip's HBM), FITS or OOM (XLA
refuses to compile a program over the chip's memory and says by how much), FLOPs per step and compile times.
`--search` tries mesh shapes and remat policies and finds, for each, the largest per-device batch that fits; it
prints the best cell's train-step report (the eval step is not compiled: rerun that cell for it).
`--simulate` adds the step time libtpu's cost model gives the compiled train step, per part (launch/simulate.py:
an estimate, not a measurement); `--search --simulate` ranks the cells by simulated MFU. `--reduced_depth` compiles
the LLM / SigLIP with fewer layers and runs their layer loops, and the optimizer's update of their stacked
parameters, at the full depth in the simulation; the memory it reports is then the reduced program's. It saves
compile time with the dense attention (7B on v5p-8: 12 min at 2 layers, 14 at 32); with the Pallas kernels, whose
own compiles dominate, it did not (29 min at 2 layers on a loaded machine, 13 at 32 on a quieter one).
"""

from __future__ import annotations

import importlib.util
import os
import sys

# libtpu takes a lockfile so that one process owns the chips; compile-only use needs no chips, and another JAX
# process on the machine (which also loads libtpu when it is installed) would otherwise make this one fail.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# libtpu itself: the installed one (a TPU VM: `pip install .[tpu]`), else the copy `make install` keeps outside
# site-packages, in <venv>/libtpu-aot: where JAX would find it, every program would load it and print its errors on
# a machine without a TPU; only this check needs it.
_ASIDE = os.path.join(sys.prefix, "libtpu-aot", "libtpu", "libtpu.so")
if "TPU_LIBRARY_PATH" not in os.environ and importlib.util.find_spec("libtpu") is None and os.path.isfile(_ASIDE):
    os.environ["TPU_LIBRARY_PATH"] = _ASIDE

import dataclasses  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from genllava_jax import errors, flops, lora, train  # noqa: E402
from genllava_jax import sharding as shd  # noqa: E402

from . import simulate as sim  # noqa: E402

GiB = 2 ** 30
_F = (False, False, False)
# user-facing slice name -> (libtpu topology, chip config, wraparound links); megacore: one device per chip
TOPOLOGIES = {
    "v4-8": ("v4:2x2x1", "megacore", _F), "v4-16": ("v4:2x2x2", "megacore", _F),
    "v4-32": ("v4:2x2x4", "megacore", _F),
    "v5p-8": ("v5:2x2x1", "megacore", _F), "v5p-16": ("v5:2x2x2", "megacore", _F),
    "v5p-32": ("v5:2x2x4", "megacore", _F), "v5p-64": ("v5:2x4x4", "megacore", _F),
    "v5e-4": ("v5e:2x2", "default", _F), "v5e-8": ("v5e:2x4", "default", _F), "v5e-16": ("v5e:4x4", "default", _F),
    "v5e-32": ("v5e:4x8", "default", _F), "v5e-64": ("v5e:8x8", "default", _F),
    "v5e-128": ("v5e:8x16", "default", (False, True, False)), "v5e-256": ("v5e:16x16", "default", (True, True, False)),
}
HBM_GIB = {"TPU v4": 32, "TPU v5": 95, "TPU v5 lite": 16, "TPU v6 lite": 32}  # per chip, by device_kind
REMAT_PARTS = ("llm", "unet")  # --remat=POLICY sets these: the parts with a backward pass and large activations
REMAT_TOWERS = ("vision", "llm", "head", "unet")  # --remat=PART=POLICY;... may set any of these
# least recompute first (an offload after the same policy kept on the device: it adds host transfers)
REMAT_ORDER = ("none", "everything_saveable", "save_all_names", "offload_all_names", "dots_saveable",
               "save_dots_except_mlp", "offload_dots_except_mlp", "dots_with_no_batch_dims_saveable",
               "save_qkv_proj", "full", "offload_layer_input")


def parse_remat(text: str) -> dict:
    """--remat: a policy for REMAT_PARTS ("full", "save:q_proj,k_proj", see layers.REMAT_POLICIES) or policies
    per part, ';'-separated: "llm=save_dots_except_mlp;unet=full"."""
    from genllava_jax.layers import remat_policy

    head = text.split(":")[0]
    pairs = [p.split("=", 1) for p in text.split(";")] if "=" in head else [(part, text) for part in REMAT_PARTS]
    for pair in pairs:
        if len(pair) != 2 or pair[0] not in REMAT_TOWERS:
            raise errors.BadValue(f"--remat={text!r}: {'='.join(pair)!r} is not PART=POLICY with PART one of "
                             f"{REMAT_TOWERS}")
        remat_policy(pair[1])  # a clear error for an unknown policy, before any compile
    return dict(pairs)


def parse_remats(text: str) -> list[str]:
    """--remats: policies ';'-separated (or ','-separated when none of them is a "save:"/"offload:" name list)."""
    items = text.split(";") if ";" in text or ":" in text else text.split(",")
    for item in items:
        parse_remat(item)
    return items


def target_devices(topology: str) -> list:
    """Compile-only devices of a TPU slice: a name from TOPOLOGIES or libtpu's own, e.g. "v5e:2x2"."""
    from jax.experimental import topologies

    if topology in TOPOLOGIES:
        name, chip_config, wrap = TOPOLOGIES[topology]
    elif re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)*", topology):
        name, wrap = topology, _F
        chip_config = "default" if topology.split(":")[0] in ("v5e", "v6e") else "megacore"
    else:
        raise errors.BadValue(f"--topology={topology!r}: use one of {sorted(TOPOLOGIES)} or libtpu's form such as "
                              f"v5e:2x2 / v5:2x2x1")
    if "TPU_LIBRARY_PATH" not in os.environ and importlib.util.find_spec("libtpu") is None:
        raise errors.MissingFile(f"launch.aot compiles through libtpu, which is not installed: `make install` keeps "
                                 f"a copy in {os.path.dirname(os.path.dirname(_ASIDE))} (pip install --target), a TPU "
                                 f"VM has it from `pip install .[tpu]`")
    return list(topologies.get_topology_desc(name, "tpu", chip_config_name=chip_config,
                                             chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=wrap).devices)


def build_mesh(axes: dict, devices) -> jax.sharding.Mesh:
    """shd.make_mesh over the devices in an order that follows the chips' links (mesh_utils), when it can."""
    from jax.experimental import mesh_utils

    sizes = [int(axes.get(a, 1)) for a in shd.MESH_AXES]
    if -1 in sizes:
        sizes[sizes.index(-1)] = len(devices) // max(1, math.prod(s for s in sizes if s != -1))
    try:
        devices = mesh_utils.create_device_mesh(sizes, devices).flat
    except (ValueError, NotImplementedError, AssertionError):
        pass  # shapes mesh_utils cannot map onto the torus: plain device order
    return shd.make_mesh(axes, list(devices))


class StandInTokenizer:
    """What `train.model_config` reads from a tokenizer, for a base vocabulary of `size` tokens (<unk> <s> </s>
    first, as Mistral's) with GenLLaVA's tokens appended as `load_tokenizer` does: the real ids do not matter
    for a compile, only the vocabulary size."""

    bos_token_id, eos_token_id, unk_token_id, pad_token_id = 1, 2, 0, None

    def __init__(self, size: int, num_img_tokens: int):
        from genllava_jax.data.tokenizer import genllava_tokens

        names = ["<unk>", "<s>", "</s>"] + [f"<base{i}>" for i in range(3, size)] + genllava_tokens(num_img_tokens)
        self._vocab = {t: i for i, t in enumerate(names)}

    def get_vocab(self):
        return self._vocab

    def __len__(self):
        return len(self._vocab)


def tokenizer_for(c):
    from genllava_jax.data.tokenizer import load_tokenizer

    if c.data.tokenizer and Path(c.data.tokenizer).is_dir():
        return load_tokenizer(c.data.tokenizer, c.data.num_img_tokens)
    if not c.model.llm.get("vocab_size"):
        raise errors.BadValue(f"data.tokenizer={c.data.tokenizer!r} is not a directory and model.llm.vocab_size is "
                              f"unset: set --config.model.llm.vocab_size (the base vocabulary) for the fit check")
    return StandInTokenizer(c.model.llm.vocab_size, c.data.num_img_tokens)


def abstract_setup(c, mesh):
    """(abstract train state, train.Setup with abstract frozen params, GenLLaVAConfig, abstract model): what
    `train.setup` builds, from `nnx.eval_shape` instead of initialised weights."""
    tc = c.train
    cfg = train.model_config(c, tokenizer_for(c))
    model = nnx.eval_shape(lambda: train.new_model(cfg, c))  # with train.lora's factors
    graphdef, params, frozen, rest = train.split_model(model, tc)
    if not jax.tree.leaves(params):
        raise errors.BadValue(f"train.trainable={list(tc.trainable)} matches no parameter")
    if jax.tree.leaves(rest):
        raise ValueError(f"the model has non-parameter state {list(nnx.to_flat_state(rest).keys())[:5]}: the fit "
                         f"check cannot make it abstract")
    tx, schedule = train.make_optimizer(tc)
    shd.state_shardings(nnx.state(model, nnx.Param), mesh, strict=c.strict_sharding)  # fails here if strict
    state_sh = train.state_shardings(params, tx, mesh)
    frozen_sh = shd.state_shardings(frozen, mesh)
    state = shd.with_shardings(jax.eval_shape(functools.partial(train.init_state, tx=tx, seed=c.seed), params),
                               state_sh)
    s = train.Setup(graphdef, shd.with_shardings(frozen, frozen_sh), rest, state_sh, frozen_sh,
                    functools.partial(shd.batch_shardings, mesh=mesh), tx, schedule, mesh, tc.grad_clip)
    return state, s, cfg, model


def abstract_batch(c, cfg, s: train.Setup, global_batch: int) -> dict:
    """The data pipeline's batch (its empty row, `Encoder.blank`) as sharded ShapeDtypeStructs."""
    from genllava_jax.data.pipeline import Encoder
    from genllava_jax.data.tokenizer import SpecialIds

    d = c.data
    ids = SpecialIds(image=0, i2t=0, t2i=0, soi=0, img=(), eoi=0, bos=0, eos=0, pad=cfg.llm.pad_token_id or 0)
    row = Encoder(None, ids, Path("."), d.max_len, d.image_size, cfg.num_patches, d.target_image_size,
                  d.on_too_long).blank()
    abstract = {k: jax.ShapeDtypeStruct((global_batch,) + np.shape(v), np.asarray(v).dtype) for k, v in row.items()}
    return shd.with_shardings(abstract, s.batch_sharding(abstract))


def nbytes(tree, per_device: bool) -> int:
    def one(x):
        shape = x.sharding.shard_shape(x.shape) if per_device else x.shape
        return math.prod(shape) * np.dtype(x.dtype).itemsize

    return sum(one(x) for x in jax.tree.leaves(tree))


# how XLA:TPU words running out of HBM: (needed, unit, usable, unit)
_OOM = [re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"),
        re.compile(r"memory required for [^(]*\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")]


def _size(num: str, unit: str) -> float:
    return float(num) * 1024 ** ("KMGT".index(unit) + 1) if unit else float(num)


def compile_report(jitted, args, hbm: float, log=lambda s: None, on_text=None) -> tuple[dict, object]:
    """Traces, lowers and compiles; memory per chip from `memory_analysis()`, or XLA's figure when it refuses
    (OOM). Returns the report and the trace (its jaxpr is the program the FLOPs are counted on); `on_text(hlo)`,
    if given, goes over the compiled HLO text and its result is the report's "sim"."""
    t0 = time.perf_counter()
    traced = jitted.trace(*args)
    lowered = traced.lower()
    t1 = time.perf_counter()
    log(f"  lowered in {t1 - t0:.0f} s; compiling")
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 -- XLA reports running out of HBM as a compile error
        m = next((m for p in _OOM if (m := p.search(str(e)))), None)
        if "RESOURCE_EXHAUSTED" not in str(e) or not m:
            raise
        return {"fits": False, "lower_s": t1 - t0, "compile_s": time.perf_counter() - t1,
                "total": _size(*m.groups()[:2]), "hbm_xla": _size(*m.groups()[2:]), "hbm": hbm}, traced
    t2 = time.perf_counter()
    ma = compiled.memory_analysis()
    out = {"arguments": ma.argument_size_in_bytes, "outputs": ma.output_size_in_bytes,
           "aliased": ma.alias_size_in_bytes, "temporaries": ma.temp_size_in_bytes,
           "code": ma.generated_code_size_in_bytes}
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["code"]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out = {**out, "fits": out["total"] <= hbm, "hbm": hbm, "lower_s": t1 - t0, "compile_s": t2 - t1,
           "xla_flops": float(cost.get("flops", 0.0))}
    if on_text is not None:
        out["sim"] = on_text(compiled.as_text())
    return out, traced


@dataclasses.dataclass(frozen=True)
class Simulation:
    """What `check` needs to simulate the train step's time (launch/simulate.py)."""
    pallas_efficiency: float = 0.5
    full: ml_collections.ConfigDict | None = None  # the full-depth config when the compiled one is reduced
    layer_loops: dict | None = None  # {part: (compiled depth, full depth)}
    save_hlo: str | None = None  # write the compiled HLO text and the setting here (python -m launch.simulate)


# --reduced_depth parts -> (the config's layer count, the layer loop's trip count per layer)
DEPTH_KEYS = {"llm": "num_layers", "vision": "num_layers"}


def reduce_depth(c, spec: str) -> tuple[ml_collections.ConfigDict, Simulation]:
    """--reduced_depth="llm=2,vision=3": a copy of `c` with that many layers in those towers, and the Simulation
    that runs their layer loops at `c`'s depth."""
    small, loops = ml_collections.ConfigDict(c.to_dict()), {}
    for kv in spec.split(","):
        part, _, n = kv.partition("=")
        part = part.strip()
        if part not in DEPTH_KEYS or not n.strip().isdigit() or int(n) < 2:
            raise errors.BadValue(f"--reduced_depth={spec!r}: {kv!r} is not PART=LAYERS with PART one of "
                             f"{sorted(DEPTH_KEYS)} and LAYERS >= 2 (XLA inlines a 1-trip loop)")
        full = c.model[part][DEPTH_KEYS[part]]
        if int(n) >= full:
            raise errors.BadValue(f"--reduced_depth={spec!r}: {part} has only {full} layers")
        if any(int(n) == d for d, _ in loops.values()):
            raise errors.BadValue(f"--reduced_depth={spec!r}: give each part its own depth (the simulation tells "
                                  f"their optimizer updates apart by it)")
        small.model[part][DEPTH_KEYS[part]] = int(n)
        loops[part] = (int(n), full)
    return small, Simulation(full=c, layer_loops=loops)


def stacked_shapes(params, layer_loops: dict | None) -> dict | None:
    """{part: the per-chip shapes of its parameters stacked over its compiled depth} of the reduced parts: the
    simulation runs the ops outside the layer loops on such arrays (the optimizer's update) at full depth."""
    if not layer_loops:
        return None
    out = {p: set() for p in layer_loops}
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        part = next((n for n in names if n in layer_loops), None)
        shape = x.sharding.shard_shape(x.shape)
        if part and shape and shape[0] == layer_loops[part][0]:
            out[part].add(tuple(shape))
    return {p: sorted(v) for p, v in out.items()}


def configure(c, *, remat: str | dict | None = None, mesh: dict | None = None):
    """A copy of config `c` with the remat policies (one for REMAT_PARTS, or a dict part -> policy) and the mesh
    replaced."""
    c = ml_collections.ConfigDict(c.to_dict())
    if remat is not None:
        for part, policy in (remat.items() if isinstance(remat, dict) else parse_remat(remat).items()):
            c.model[part].remat = policy
    if mesh is not None:
        c.mesh = dict(mesh)
    return c


def check(c, devices, *, per_device_batch: int | None = None, eval_step: bool = True, count_flops: bool = True,
          simulate: Simulation | None = None, log=lambda s: None) -> dict:
    """Compiles the train (and eval) step of config `c` for `devices` with the config's global batch or
    `per_device_batch` rows per batch shard (data × fsdp); returns the report (see `format_report`). With
    `simulate`, the report's train["sim"] holds the simulated step time (launch/simulate.py)."""
    mesh = build_mesh(dict(c.mesh), devices)
    state, s, cfg, model = abstract_setup(c, mesh)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    global_batch = c.train.batch_size if per_device_batch is None else per_device_batch * batch_shards
    if global_batch % batch_shards:
        raise errors.BadValue(f"batch {global_batch} does not split over data × fsdp = {batch_shards} devices")
    batch = abstract_batch(c, cfg, s, global_batch)
    kind = devices[0].device_kind
    hbm = HBM_GIB[kind] * GiB
    r = {"kind": kind, "chips": len(devices), "mesh": dict(mesh.shape),
         "remat": {p: getattr(cfg, p).remat for p in REMAT_TOWERS},
         "global_batch": global_batch, "per_device_batch": global_batch // batch_shards, "seq_len": c.data.max_len,
         "params": {"trainable": sum(x.size for x in jax.tree.leaves(state["params"])),
                    "frozen": sum(x.size for x in jax.tree.leaves(s.frozen))},
         "param_bytes": {"whole": nbytes((state["params"], s.frozen), False),
                         "per_chip": nbytes((state["params"], s.frozen), True)},
         "state_bytes": {"whole": nbytes((state, s.frozen), False), "per_chip": nbytes((state, s.frozen), True)},
         "lora": lora_report(model, s.frozen),
         "sharding": shd.sharding_report(nnx.state(model, nnx.Param), mesh)[0]}
    step = train.jit_train_step(s, c.train.accum)
    on_text = None
    if simulate is not None:
        trainable = {str(k) for k in state["params"].keys()}
        full_c, full_cfg, full_model = c, cfg, model
        if simulate.full is not None:  # a reduced-depth compile: the model FLOPs of the full-depth model
            full_c = simulate.full
            full_cfg = train.model_config(full_c, tokenizer_for(full_c))
            full_model = nnx.eval_shape(lambda: train.new_model(full_cfg, full_c))

        def on_text(text):
            log("  simulating the step from the compiled HLO")
            # counted under the mesh, as the report's analytic FLOPs are (the attention backend `auto` picks by it)
            model_flops = sum(flops.analytic(full_model, full_cfg, rows=global_batch, seq_len=full_c.data.max_len,
                                             target_px=full_c.data.target_image_size, trainable=trainable).values())
            setting = {"kind": kind, "pallas_efficiency": simulate.pallas_efficiency,
                       "layer_loops": simulate.layer_loops, "stacked": stacked_shapes(
                           (state["params"], s.frozen), simulate.layer_loops), "model_flops": model_flops,
                       "tokens": global_batch * c.data.max_len, "chips": len(devices),
                       "rows_per_chip": global_batch // batch_shards}
            if simulate.save_hlo:
                sim.save(simulate.save_hlo, text, setting)
                log(f"  wrote {simulate.save_hlo}")
            return sim.run(text, **setting)
    with jax.set_mesh(mesh):
        log(f"train step: {r['global_batch']} rows on mesh {r['mesh']}, remat {r['remat']}")
        r["train"], traced = compile_report(step, (state, s.frozen, batch), hbm, log, on_text=on_text)
        log(f"  compiled in {r['train']['compile_s']:.0f} s: {_memory_line(r['train'])}")
        if count_flops:
            once = flops.jaxpr_flops(traced.jaxpr.jaxpr, scale_loops=False)
            every = flops.jaxpr_flops(traced.jaxpr.jaxpr)
            trainable = {str(k) for k in state["params"].keys()}
            parts = flops.analytic(model, cfg, rows=global_batch, seq_len=c.data.max_len,
                                   target_px=c.data.target_image_size, trainable=trainable)
            r["flops"] = {"program_once": once, "program": every, "parts": parts, "analytic": sum(parts.values())}
            if "xla_flops" in r["train"]:
                # XLA counts each scan body once, and per chip (the partitioned program): scale by the ratio of the
                # program's matmul FLOPs with each scan body times its trip count to those with it once
                r["flops"]["xla_scaled"] = r["train"]["xla_flops"] * every / once
        if eval_step and r["train"]["fits"]:
            log("eval step")
            eval_fn = train.jit_eval_step(s)
            rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=NamedSharding(mesh, jax.sharding.PartitionSpec()))
            r["eval"], _ = compile_report(eval_fn, (state["params"], s.frozen, batch, rng), hbm, log)
    return r


def lora_report(model, frozen) -> dict | None:
    """What LoRA saves: the factors' size, the base parameters it keeps frozen, and the AdamW moments (mu and nu,
    in the parameters' dtype) those would add to the train state per chip if they were trained."""
    adapted = lora.adapted(model)
    if not adapted:
        return None
    frozen_paths = lora.frozen_paths(model)
    base = [v.get_value() for p, v in nnx.to_flat_state(frozen) if "/".join(map(str, p)) in frozen_paths]
    factors = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model, lora.LoRAParam))]
    return {"factors": sum(math.prod(x.shape) for x in factors), "kernels": len(adapted),
            "ranks": sorted({(p.split("/")[0], a.rank) for p, a in adapted.items()}),
            "base_frozen": sum(math.prod(x.shape) for x in base), "moments_per_chip": 2 * nbytes(base, True)}


def _gib(x) -> str:
    return f"{x / GiB:.2f} GiB"


def _memory_line(m: dict) -> str:
    verdict = "FITS" if m["fits"] else "OOM"
    if "arguments" not in m:
        return (f"XLA refused: needs {_gib(m['total'])} of {_gib(m['hbm_xla'])} usable HBM "
                f"({_gib(m['hbm'])} per chip) -> {verdict}")
    return (f"arguments {_gib(m['arguments'])}, outputs {_gib(m['outputs'])} (aliased with arguments "
            f"{_gib(m['aliased'])}), temporaries {_gib(m['temporaries'])}, code {_gib(m['code'])}; total "
            f"{_gib(m['total'])} of {_gib(m['hbm'])} HBM -> {verdict}")


def format_report(r: dict) -> str:
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    remat = " ".join(f"{k}={v}" for k, v in r["remat"].items())
    lines = [
        f"topology: {r['chips']} × {r['kind']} ({HBM_GIB[r['kind']]} GiB HBM each); mesh {mesh}; remat {remat}",
        f"batch: {r['global_batch']} global, {r['per_device_batch']} per device, sequence {r['seq_len']}",
        f"params: {r['params']['trainable'] / 1e9:.3f} B trainable, {r['params']['frozen'] / 1e9:.3f} B frozen; "
        f"{_gib(r['param_bytes']['whole'])} whole, {_gib(r['param_bytes']['per_chip'])} per chip; with the "
        f"optimizer state {_gib(r['state_bytes']['whole'])} whole, {_gib(r['state_bytes']['per_chip'])} per chip",
    ]
    if r.get("lora"):
        lo = r["lora"]
        ranks = ", ".join(f"{part} rank {rank}" for part, rank in lo["ranks"])
        lines.append(f"LoRA ({ranks}): {lo['factors'] / 1e6:.1f} M factor params on {lo['kernels']} kernels; "
                     f"{lo['base_frozen'] / 1e9:.3f} B base params frozen under them, whose AdamW moments "
                     f"({_gib(lo['moments_per_chip'])} per chip) and weight gradients are not kept")
    lines += [f"train step: lower {r['train']['lower_s']:.1f} s, compile {r['train']['compile_s']:.1f} s",
              f"  memory per chip: {_memory_line(r['train'])}"]
    f = r.get("flops")
    if f:
        T = 1e12
        parts = ", ".join(f"{k} {v / T:.2f}" for k, v in f["parts"].items())
        lines.append(f"  FLOPs per step: analytic {f['analytic'] / T:.2f} T model FLOPs [{parts}]; the traced "
                     f"program's matmuls {f['program'] / T:.2f} T (× {f['program'] / f['analytic']:.3f}: remat "
                     f"recomputation)")
        if "xla_scaled" in f:
            x, xs = r["train"]["xla_flops"], f["xla_scaled"]
            lines.append(f"  FLOPs per step: XLA {x / T:.3f} T per chip counting each scan body once, {xs / T:.3f} T "
                         f"scaled by the trip counts; × {r['chips']} chips = {xs * r['chips'] / T:.2f} T, "
                         f"{xs * r['chips'] / f['program']:.3f} × the program's, "
                         f"{xs * r['chips'] / f['analytic']:.3f} × analytic")
    if "eval" in r:
        lines += [f"eval step: lower {r['eval']['lower_s']:.1f} s, compile {r['eval']['compile_s']:.1f} s",
                  f"  memory per chip: {_memory_line(r['eval'])}"]
    s = r["train"].get("sim")
    if s:
        if s["layer_loops"]:
            lines.append("reduced depth: compiled with " + ", ".join(
                f"{p} {a} layers, its layer loops run {b} times" for p, (a, b) in s["layer_loops"].items()) +
                " in the simulation (memory and FLOPs above are the reduced program's)")
        lines += [f"  warning: {w}" for w in s["warnings"]]
        lines.append(sim.format_summary(s))
    verdict = "FITS" if r["train"]["fits"] and r.get("eval", {"fits": True})["fits"] else "OOM"
    lines.append(verdict + (" (the reduced-depth program; the full depth was not compiled)"
                            if s and s["layer_loops"] else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# --search


def parse_mesh(spec: str) -> dict:
    """"data=1,fsdp=-1,tensor=2" -> {"data": 1, "fsdp": -1, "tensor": 2}; unnamed axes are 1."""
    axes = {}
    for kv in spec.split(","):
        k, _, v = kv.partition("=")
        if k.strip() not in shd.MESH_AXES or not v.strip().lstrip("-").isdigit():
            raise errors.BadValue(f"mesh {spec!r}: {kv!r} is not AXIS=SIZE with AXIS one of {shd.MESH_AXES}")
        axes[k.strip()] = int(v)
    return {a: axes.get(a, 1) for a in shd.MESH_AXES}


def mesh_candidates(n: int) -> list[dict]:
    """Fully sharded (fsdp over every chip), with 2- and 4-way tensor parallelism, and 2 data-parallel replicas."""
    out = [dict(data=1, fsdp=n // t, tensor=t) for t in (1, 2, 4) if n % t == 0 and n // t >= 1]
    if n >= 16:
        out.append(dict(data=2, fsdp=n // 2, tensor=1))
    return out


def largest_batch(c, devices, log, max_compiles: int = 5, simulate: Simulation | None = None
                  ) -> tuple[int, int | None, dict | None]:
    """The largest per-device batch found to compile within HBM, the smallest found not to (None: none tried),
    and the former's report (0, ..., None if batch 1 does not fit).

    Memory grows about linearly with the batch: after batches 1 and 2 a line through the measured totals (XLA
    states its total when it refuses, too) predicts the largest batch; once a batch is OOM, the line through the
    bracketing pair, its guess kept to the middle half of the bracket (where memory bends, a line from one side
    creeps; an OOM verdict is cheap, XLA refuses early, a fitting compile is not).
    """
    totals, fits, reports, cap, b = {}, {}, {}, None, 1
    while True:
        r = check(c, devices, per_device_batch=b, eval_step=False, log=log, simulate=simulate)
        # drop what JAX caches of the last program: a 7B search's host memory grew compile by compile (its 5th was
        # killed at 17.9 GB beside the test suite; one compile alone peaks at 10-12 GB)
        jax.clear_caches()
        gc.collect()
        t = r["train"]
        totals[b], fits[b], reports[b] = t["total"], t["fits"], r
        cap = t.get("hbm_xla", cap)  # the usable HBM XLA states when it refuses
        log(f"    per-device batch {b}: {_gib(t['total'])} -> {'FITS' if t['fits'] else 'OOM'} "
            f"(compile {t['compile_s']:.0f} s)")
        lo = max((k for k in fits if fits[k]), default=0)
        hi = min((k for k in fits if not fits[k]), default=None)
        if lo == 0 or (hi is not None and hi == lo + 1) or len(totals) >= max_compiles:
            break
        if len(totals) == 1:
            nxt = 2
        else:
            x0, x1 = (lo, hi) if hi is not None else sorted(totals)[-2:]
            slope = (totals[x1] - totals[x0]) / (x1 - x0)
            nxt = int(x0 + ((cap or t["hbm"]) - totals[x0]) // slope) if slope > 0 else 2 * lo
        if hi is None and nxt <= lo:
            break  # the line puts nothing larger within HBM
        step = max(1, (hi - lo) // 4) if hi is not None else 1
        nxt = max(nxt, lo + step) if hi is None else min(max(nxt, lo + step), hi - step)
        if nxt in totals:
            break
        b = nxt
    return lo, hi, reports.get(lo)


def search(c, devices, remats, meshes=None, log=print, simulate: Simulation | None = None) -> list[dict]:
    """For each mesh shape (default: `mesh_candidates`) and remat policy, the largest per-device batch that fits
    (and, with `simulate`, its simulated step); returns the rows."""
    rows = []
    for mesh in meshes or mesh_candidates(len(devices)):
        for remat in remats:
            log(f"  mesh {mesh}, remat {remat}:")
            cell = configure(c, remat=remat, mesh=mesh)
            b, oom, r = largest_batch(cell, devices, log, simulate=simulate)
            s = r and r["train"].get("sim")
            rows.append({"mesh": mesh, "remat": remat, "per_device_batch": b, "oom_at": oom,
                         "global_batch": r["global_batch"] if r else 0, "report": r,
                         "mfu": s["overlapped"]["mfu"] if s else None})
    return rows


def best_row(rows: list[dict]) -> dict | None:
    """The highest simulated MFU when simulated, else the largest global batch; on a tie the policy that
    recomputes least, then fewer tensor shards."""
    ok = [r for r in rows if r["per_device_batch"]]
    if not ok:
        return None
    rank = lambda p: REMAT_ORDER.index(p) if p in REMAT_ORDER else len(REMAT_ORDER)  # noqa: E731
    return max(ok, key=lambda r: (r.get("mfu") or 0.0, r["global_batch"], -rank(r["remat"]), -r["mesh"]["tensor"]))


def main(argv):
    from absl import app, flags

    del argv
    F = flags.FLAGS
    progress = lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True)  # noqa: E731
    devices = target_devices(F.topology)
    c = F.config
    simulation = Simulation(pallas_efficiency=F.pallas_efficiency, save_hlo=F.save_hlo) if F.simulate else None
    if F.reduced_depth and (F.search or not F.simulate):
        raise app.UsageError("--reduced_depth goes with --simulate, for one cell (--search needs the full depth "
                             "to tell what fits)")
    if F.search:
        meshes = [parse_mesh(m) for m in F.meshes.split(";")] if F.meshes else mesh_candidates(len(devices))
        print(f"searching {F.topology}: meshes {meshes}, remat {F.remats}", flush=True)
        rows = search(c, devices, parse_remats(F.remats), meshes, log=progress, simulate=simulation)
        for row in rows:
            oom = f"{row['oom_at']} is OOM" if row["oom_at"] else "no larger batch tried"
            mfu = f", simulated MFU {row['mfu'] * 100:.1f} %" if row.get("mfu") else ""
            print(f"  {row['mesh']} remat {row['remat']}: largest per-device batch {row['per_device_batch']} "
                  f"({oom}){mfu}")
        best = best_row(rows)
        if best is None:
            print("nothing fits: per-device batch 1 is OOM for every mesh and remat policy tried")
            return
        mesh = ",".join(f"{k}={v}" for k, v in best["mesh"].items())
        # the search compiled this cell already: its report, not a second compile of the same program
        print(f"best: --mesh={mesh} --remat={best['remat']} --per_device_batch={best['per_device_batch']} (rerun "
              f"with these for the eval step too)\n{format_report(best['report'])}", flush=True)
        return
    c = configure(c, remat=F.remat, mesh=parse_mesh(F.mesh) if F.mesh else None)
    if F.reduced_depth:
        c, simulation = reduce_depth(c, F.reduced_depth)
        simulation = dataclasses.replace(simulation, pallas_efficiency=F.pallas_efficiency, save_hlo=F.save_hlo)
    report = check(c, devices, per_device_batch=F.per_device_batch, eval_step=F.eval_step, log=progress,
                   simulate=simulation)
    print(f"{report['sharding']}\n{format_report(report)}", flush=True)


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=False)
    flags.DEFINE_string("topology", None, f"one of {sorted(TOPOLOGIES)}, or libtpu's name such as v5e:2x2")
    flags.DEFINE_string("mesh", None, "e.g. data=1,fsdp=-1,tensor=2 (default: the config's mesh)")
    flags.DEFINE_string("remat", None, f"remat policy of {REMAT_PARTS}, one of {REMAT_ORDER} or save:NAME,... / "
                                       f"offload:NAME,... (layers.CHECKPOINT_NAMES); or per part, e.g. "
                                       f"\"llm=save_dots_except_mlp;unet=full\" (default: the config's)")
    flags.DEFINE_integer("per_device_batch", None, "rows per batch shard (default: the config's train.batch_size "
                                                   "as the global batch)")
    flags.DEFINE_bool("eval_step", True, "also compile the eval step (--noeval_step: the train step only)")
    flags.DEFINE_bool("search", False, "search mesh shapes, remat policies and the per-device batch")
    flags.DEFINE_string("remats", "full;dots_with_no_batch_dims_saveable",
                        "remat policies --search tries, ';'-separated (',' also, without save:/offload: lists)")
    flags.DEFINE_string("meshes", None, "mesh shapes --search tries, ';'-separated, e.g. \"fsdp=16;fsdp=8,tensor=2\" "
                                        "(default: fully sharded, 2- and 4-way tensor, 2 data replicas)")
    flags.DEFINE_bool("simulate", False, "simulate the train step's time from the compiled program (libtpu's cost "
                                         "model; launch/simulate.py)")
    flags.DEFINE_string("reduced_depth", None, "with --simulate: compile e.g. llm=2,vision=3 layers and run those "
                                               "layer loops at the config's depth in the simulation")
    flags.DEFINE_string("save_hlo", None, "with --simulate: write the compiled train step's HLO text here (.gz) "
                                          "for `python -m launch.simulate` to simulate again without compiling")
    flags.DEFINE_float("pallas_efficiency", 0.5, "fraction of the bf16 peak a Pallas kernel's FLOPs run at, in the "
                                                 "simulation")
    flags.mark_flags_as_required(["config", "topology"])
    errors.run(main)
