"""Simulated TPU step time from a compiled program's HLO text (libtpu's cost model; an estimate, not a measurement).

libtpu writes an `estimated_cycles` into the backend_config of every scheduled op (fusion, copy, reduce, ...) of the
compiled module. `simulate` sums them, each loop body times its trip count (`cost_analysis()` counts a scanned body
once, and its `optimal_seconds` was negative on the tiny config), converts cycles to seconds at the chip's clock and
attributes every op to a part of the model by the `jax.named_scope` in its `op_name` (models/genllava.py, train.py).
What the cost model leaves out is estimated here:
- Pallas (Mosaic) kernels carry no cycles: their FLOPs (the kernel's own `cost_estimate`, else the matmuls of its
  Mosaic body times its grid, blocks a kernel may skip at run time counted as run) at `pallas_efficiency` of the
  chip's bf16 peak, or their bytes at the HBM bandwidth if that is slower;
- collectives carry none either: the bytes a chip sends in a ring over its group, at the chip's ICI link bandwidth
  times `RING_LINKS`; reported both fully overlapped with compute (step = max) and not at all (step = sum).
Async copies (copy-start/done: HBM <-> VMEM/host prefetch) are taken as hidden; scalar ops without cycles as free.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import re
from collections import defaultdict

from genllava_jax import errors

# Per chip, from the Cloud TPU system-architecture pages (docs.cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}): bf16
# peak FLOP/s, HBM bytes/s, ICI bytes/s per link and direction (bidirectional per-chip figure / ports / 2; v4's
# from its 400 Gbit/s per link and direction). The clock is peak / (MXUs x 128 x 128 x 2 FLOPs a cycle) (v6e: 256x256
# MXUs); tests/test_simulate.py checks it against libtpu: a large bf16 matmul's estimated cycles give 88-97 % of
# those FLOPs a cycle on every generation.
@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # bf16, per chip
    mxu_flops_per_cycle: int  # all MXUs of the chip (both TensorCores of a megacore chip)
    hbm_bytes_s: float
    ici_link_bytes_s: float  # one link, one direction

    @property
    def clock_hz(self) -> float:
        return self.peak_flops / self.mxu_flops_per_cycle


_MXU128 = 128 * 128 * 2
CHIPS = {
    "TPU v4": Chip("v4", 275e12, 8 * _MXU128, 1200e9, 50e9),
    "TPU v5": Chip("v5p", 459e12, 8 * _MXU128, 2765e9, 1200e9 / 6 / 2),
    "TPU v5 lite": Chip("v5e", 197e12, 4 * _MXU128, 819e9, 400e9 / 4 / 2),
    "TPU v6 lite": Chip("v6e", 918e12, 4 * 256 * 256 * 2, 1638e9, 800e9 / 4 / 2),
}
SKIP_SCOPE = "splash_blocks_"  # genllava_jax.attention.SKIP_SCOPE (not imported: this module reads saved text alone)
RING_LINKS = 2  # a bidirectional ring along one mesh axis: a chip sends on two links at once
PARTS = ("llm", "ce", "vision", "projector", "head", "unet", "vae", "optimizer")  # named scopes; the rest "other"
COLLECTIVES = {"all-gather", "all-gather-start", "all-reduce", "all-reduce-start", "reduce-scatter", "all-to-all",
               "collective-permute", "collective-permute-start", "ragged-all-to-all", "collective-broadcast"}

# ---------------------------------------------------------------------------------------------------------------
# HLO text


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    args: str  # the text between the parentheses (a constant's value)
    attrs: str
    root: bool = False

    @property
    def op_name(self) -> str:
        m = re.search(r'op_name="((?:[^"\\]|\\.)*)"', self.attrs)
        return m.group(1) if m else ""

    @property
    def cycles(self) -> int:
        m = re.search(r'"estimated_cycles":"(\d+)"', self.attrs)
        return int(m.group(1)) if m else 0

    def called(self, key: str) -> list[str]:
        m = re.search(rf"\b{key}=\{{?(%[\w.\-]+(?:, %[\w.\-]+)*)\}}?", self.attrs)
        return [c.lstrip("%") for c in m.group(1).split(", ")] if m else []


_HEAD = re.compile(r"^(ENTRY )?%([\w.\-]+) \(.*\{\s*$")
_INSTR = re.compile(r"^  (ROOT )?%([\w.\-]+) = ")


def _balanced(s: str, i: int) -> int:
    """Index just past the parenthesis that closes the one at s[i]."""
    depth = 0
    for j in range(i, len(s)):
        depth += {"(": 1, ")": -1}.get(s[j], 0)
        if depth == 0:
            return j + 1
    raise ValueError(f"unbalanced parentheses in HLO: {s[i:i + 200]!r}")


def _instr(line: str) -> Instr:
    m = _INSTR.match(line)
    rest = line[m.end():]
    end = _balanced(rest, 0) if rest.startswith("(") else rest.index(" ")
    shape, rest = rest[:end], rest[end + 1:]
    op_end = rest.index("(")
    args_end = _balanced(rest, op_end)
    args = rest[op_end + 1:args_end - 1]
    return Instr(m.group(2), shape, rest[:op_end], re.findall(r"%([\w.\-]+)", args), args, rest[args_end:],
                 root=bool(m.group(1)))


def _odd_quotes(s: str) -> bool:
    return s.replace("\\\\", "").replace('\\"', "").count('"') % 2 == 1


def parse(text: str) -> tuple[dict[str, list[Instr]], str]:
    """{computation: its instructions}, the entry's name. An instruction's text may span lines (a Mosaic kernel's
    payload, a string attribute): a line is a continuation while a string is open or when it starts no
    instruction."""
    comps, entry, current, pending, open_str = {}, None, None, None, False

    def flush():
        if pending is not None:
            current.append(_instr(pending))

    for line in text.split("\n"):
        if open_str or (current is not None and pending is not None and not _INSTR.match(line)
                        and line != "}"):
            pending += "\n" + line
            open_str ^= _odd_quotes(line)
            continue
        if current is None:
            if m := _HEAD.match(line):
                current, entry = comps.setdefault(m.group(2), []), m.group(2) if m.group(1) else entry
            continue
        flush()
        pending = None
        if line == "}":
            current = None
        elif _INSTR.match(line):
            pending, open_str = line, _odd_quotes(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8}


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape (a tuple's elements summed)."""
    return sum(_DTYPE_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for t, dims in re.findall(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]", shape))


def _value(i: Instr | None) -> int | None:
    """An integer constant's value."""
    return int(i.args) if i is not None and i.opcode == "constant" and re.fullmatch(r"-?\d+", i.args) else None


def _through(name: str, table: dict) -> Instr | None:
    """The instruction behind copies, converts and bitcasts."""
    i = table.get(name)
    while i is not None and i.opcode in ("copy", "convert", "bitcast") and i.operands:
        i = table.get(i.operands[0])
    return i


_FLIP = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE", "NE": "NE"}


def trip_count(loop: Instr, comps: dict[str, list[Instr]], scope: dict[str, Instr]) -> int | None:
    """A while loop's trip count: XLA's known_trip_count when given, else from its condition (i < N; <=, >, >=,
    != too), the induction variable's start in the init tuple (`scope`: the caller's instructions) and its step in
    the body. None when the loop is not of that form."""
    if m := re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs):
        return int(m.group(1))
    cond = {i.name: i for i in comps[loop.called("condition")[0]]}
    root = next(i for i in cond.values() if i.root)
    d = re.search(r"direction=(\w+)", root.attrs)
    if root.opcode != "compare" or not d or d.group(1) not in _FLIP:
        return None
    a, b, d = _through(root.operands[0], cond), _through(root.operands[1], cond), d.group(1)
    if _value(a) is not None:
        a, b, d = b, a, _FLIP[d]
    limit = _value(b)
    if a is None or a.opcode != "get-tuple-element" or limit is None:
        return None
    k = int(re.search(r"index=(\d+)", a.attrs).group(1))
    init = scope.get(loop.operands[0])
    start = _value(_through(init.operands[k], scope)) if init is not None and init.opcode == "tuple" else None
    body = {i.name: i for i in comps[loop.called("body")[0]]}
    broot = next(i for i in body.values() if i.root)
    upd = _through(broot.operands[k], body) if broot.opcode == "tuple" else None
    step = None
    if upd is not None and upd.opcode in ("add", "subtract"):
        x, y = (_through(o, body) for o in upd.operands)
        if _value(x) is not None and upd.opcode == "add":
            x, y = y, x
        if x is not None and x.opcode == "get-tuple-element" and _value(y):
            step = _value(y) * (1 if upd.opcode == "add" else -1)
    if start is None or step is None:
        return None
    n = {"LT": limit - start, "LE": limit - start + 1, "NE": limit - start,
         "GT": start - limit, "GE": start - limit + 1}[d]
    return max(0, -(-n // abs(step)))


# ---------------------------------------------------------------------------------------------------------------
# What the cost model leaves out


def group_size(instr: Instr, num_partitions: int) -> int:
    """Devices in each of a collective's groups: from replica_groups in any of XLA's three spellings."""
    a = instr.attrs
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", a):
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[x]) for x in re.findall(r"'(\w+)'", m.group(2)))
    if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=", a):
        return int(m.group(2))
    if m := re.search(r"replica_groups=\{\{([\d,]*)\}", a):
        return len(m.group(1).split(","))
    return num_partitions


def collective_bytes(instr: Instr, kind: str, operand_bytes: float, n: int) -> float:
    """Bytes one chip sends for a collective over a group of n, in a ring (collective-permute: to one peer)."""
    if n <= 1:
        return 0.0
    return {"all-gather": operand_bytes * (n - 1), "reduce-scatter": operand_bytes * (n - 1) / n,
            "all-reduce": 2 * operand_bytes * (n - 1) / n, "all-to-all": operand_bytes * (n - 1) / n,
            }.get(kind, operand_bytes)


def mosaic_flops(instr: Instr) -> tuple[float, bool]:
    """(FLOPs, exact) of a Mosaic (Pallas TPU) custom call: the kernel's cost_estimate when it has one (exact as
    the kernel's author states it), else the matmuls of its body times its loops' and grid's trip counts, every
    conditional block counted as run (an upper bound: e.g. a causal kernel skips the blocks above the diagonal),
    but for a splash kernel whose named scope states how many of its grid's blocks its static mask runs
    (genllava_jax.attention.SKIP_SCOPE): those only."""
    m = re.search(r'"cost_estimate":\{"flops":"(\d+)"', instr.attrs)
    if m and int(m.group(1)) > 0:
        return float(m.group(1)), True
    body = re.search(r'"body":"([^"]*)"', instr.attrs)
    if not body:
        return 0.0, False
    flops = _kernel_matmul_flops(base64.b64decode(body.group(1)))
    if blocks := re.search(SKIP_SCOPE + r"(\d+)_of_(\d+)", instr.op_name):
        return flops * int(blocks.group(1)) / int(blocks.group(2)), True
    return flops, False


def _kernel_matmul_flops(bytecode: bytes) -> float:
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir, passmanager
    from jax._src.tpu_custom_call import tpu

    ctx = mlir.make_ir_context()
    tpu.register_dialect(ctx)
    with ctx, ir.Location.unknown():
        ctx.allow_unregistered_dialects = True
        module = ir.Module.parse(bytecode)
        passmanager.PassManager.parse("builtin.module(mosaic-serde{serialize=false})").run(module.operation)
        text = str(module)
    return kernel_text_flops(text)


def _dims(t: str) -> list[int]:
    return [int(d) for d in re.match(r"vector<([\dx]+)x[a-z]", t).group(1).split("x")]


def kernel_text_flops(text: str) -> float:
    """Matmul FLOPs of a Mosaic kernel's MLIR text: each tpu.matmul / vector.contract times the trip counts of
    the scf.for loops around it (constant bounds) and the grid (the kernel function's iteration_bounds)."""
    grid = re.search(r"iteration_bounds = array<i64(?:: ([\d, ]*))?>", text)
    total, loops = 0.0, []  # trip counts of the open scf.for regions, with their indentation
    for line in text.split("\n"):
        indent = len(line) - len(line.lstrip())
        while loops and indent <= loops[-1][0] and line.strip().startswith("}"):
            loops.pop()
        if m := re.search(r"scf\.for %\S+ = %(\S+) to %(\S+) step %(\S+)", line):
            consts = dict(re.findall(r"%(\S+) = arith\.constant (-?\d+) : (?:index|i32)", text))
            bounds = [consts.get(x) for x in m.groups()]
            lo, hi, st = (int(b) for b in bounds) if None not in bounds else (0, 1, 1)  # unknown: once
            loops.append((indent, max(0, -(-(hi - lo) // st))))
        if "tpu.matmul" in line or "vector.contract" in line:
            types = re.findall(r"vector<[\dx]+x[a-z]+\d*>", line.split(":")[-1])
            lhs, out = _dims(types[0]), _dims(types[-1])
            total += 2 * math.prod(lhs) * out[-1] * math.prod(t for _, t in loops)
    return total * math.prod(int(x) for x in (grid.group(1) or "").replace(" ", "").split(",") if x) if grid \
        else total


# ---------------------------------------------------------------------------------------------------------------
# The walk


@dataclasses.dataclass
class Cost:
    """One part's share of a step on one chip."""
    cycles: float = 0.0
    pallas_s: float = 0.0
    pallas_flops: float = 0.0
    pallas_exact: bool = True
    collective_bytes: float = 0.0
    collective_s: float = 0.0
    collectives: int = 0

    def add(self, o: "Cost", times: float = 1.0) -> None:
        self.cycles += o.cycles * times
        self.pallas_s += o.pallas_s * times
        self.pallas_flops += o.pallas_flops * times
        self.pallas_exact &= o.pallas_exact
        self.collective_bytes += o.collective_bytes * times
        self.collective_s += o.collective_s * times
        self.collectives += round(o.collectives * times)


def part_of(op_name: str) -> str | None:
    """The outermost named scope of op_name that is one of PARTS ("jit(train_step)/transpose(jvp(llm))/while/..."
    -> llm); only a traced op's name stack counts (a parameter's op_name is its path in the arguments)."""
    if not op_name.startswith("jit("):
        return None
    for segment in op_name.split("/")[1:]:
        for token in re.findall(r"[\w.\-]+", segment):
            if token in PARTS:
                return token
    return None


def _arrays(shape: str) -> list[tuple[int, ...]]:
    """The dimensions of each array in an HLO shape ("(f32[2,1024,14336]{...}, bf16[8]{0})")."""
    return [tuple(int(d) for d in m.split(",")) for m in re.findall(r"[a-z]\w*\[([\d,]+)\]", shape)]


def _stacked_keys(layer_loops: dict | None, stacked: dict | None) -> list[tuple[int, float, set]]:
    """(compiled depth, full / compiled, the stacked arrays' other dimensions sorted) per reduced part: what
    `_stacked` matches an op's arrays against. `stacked`: {part: per-chip shapes of its stacked arrays}."""
    if not layer_loops or not stacked:
        return []
    return [(layer_loops[p][0], layer_loops[p][1] / layer_loops[p][0], {tuple(sorted(s[1:])) for s in shapes})
            for p, shapes in stacked.items()]


def _stacked(i: Instr, scope: dict[str, Instr], keys: list[tuple[int, float, set]]) -> float:
    """How many times an op outside the layer loops of a reduced-depth compile runs at full depth: full /
    compiled depth of the part whose stacked (layers, ...) arrays it reads or writes (the optimizer's update, the
    casts of the stacked parameters), else 1. An array is one of them when it leads with the compiled depth and has
    their other dimensions, in any order (`keys`: _stacked_keys)."""
    if not keys:
        return 1.0
    arrays = _arrays(i.shape) + [a for o in i.operands if o in scope for a in _arrays(scope[o].shape)]
    for n, times, rests in keys:
        if any(len(a) > 1 and a[0] == n and tuple(sorted(a[1:])) in rests for a in arrays):
            return times
    return 1.0


def simulate(text: str, chip: Chip, *, pallas_efficiency: float = 0.5,
             layer_loops: dict[str, tuple[int, int]] | None = None, stacked: dict | None = None) -> dict:
    """Per-part cost of one step on one chip of the compiled module `text`. `layer_loops`: {part: (compiled depth,
    full depth)}: a while loop of that part whose trip count is the compiled depth runs the full depth, and an op
    outside the loops on that part's stacked arrays (`stacked`: {part: their per-chip shapes}) runs full / compiled
    times as long (the reduced-depth extrapolation). Returns {"parts": {part: Cost}, "loops": [...],
    "warnings": [...]}."""
    comps, entry = parse(text)
    num_partitions = int(m.group(1)) if (m := re.search(r"num_partitions=(\d+)", text)) else 1
    loops, warnings, memo = [], [], {}
    scaled = defaultdict(int)
    keys = _stacked_keys(layer_loops, stacked)

    def visit(name: str, ctx: str, fused: bool, nested: bool = False) -> dict[str, Cost]:
        key = (name, ctx, fused, nested)
        if key in memo:
            return memo[key]
        out: dict[str, Cost] = defaultdict(Cost)
        scope = {i.name: i for i in comps[name]}
        for i in comps[name]:
            part = part_of(i.op_name) or ctx
            c = out[part]
            if not fused:
                c.cycles += i.cycles * (1 if nested else _stacked(i, scope, keys))
            kind = i.opcode.removesuffix("-start")
            if name.startswith("all-reduce-scatter") and kind == "all-reduce":
                kind = "reduce-scatter"  # XLA:TPU's reduce-scatter: an all-reduce + slice in a kCustom fusion
            if i.opcode in COLLECTIVES:
                ob = sum(shape_bytes(scope[o].shape) for o in i.operands if o in scope)
                sent = collective_bytes(i, kind, ob, group_size(i, num_partitions))
                links = 1 if kind == "collective-permute" else RING_LINKS
                c.collective_bytes += sent
                c.collective_s += sent / (links * chip.ici_link_bytes_s)
                c.collectives += 1
            if i.opcode == "custom-call" and 'custom_call_target="tpu_custom_call"' in i.attrs:
                flops, exact = mosaic_flops(i)
                moved = shape_bytes(i.shape) + sum(shape_bytes(scope[o].shape) for o in i.operands if o in scope)
                c.pallas_s += max(flops / (chip.peak_flops * pallas_efficiency), moved / chip.hbm_bytes_s)
                c.pallas_flops += flops
                c.pallas_exact &= exact
            if i.opcode == "while":
                n = trip_count(i, comps, scope)
                if n is None:
                    warnings.append(f"while {i.name} ({i.op_name}): trip count not found, counted once")
                    n = 1
                full = n
                if layer_loops and part in layer_loops and n == layer_loops[part][0]:
                    full = layer_loops[part][1]
                    scaled[part] += 1
                body = visit(i.called("body")[0], part, fused, True)
                per_trip = sum(x.cycles / chip.clock_hz + x.pallas_s for x in body.values())
                loops.append({"name": i.name, "part": part, "trips": n, "counted": full, "per_trip_s": per_trip,
                              "nested": nested})
                for sub, times in ((body, full), (visit(i.called("condition")[0], part, fused, True), full + 1)):
                    for p, sc in sub.items():
                        out[p].add(sc, times)
            elif i.opcode == "conditional":
                branches = i.called("branch_computations") or i.called("true_computation") + i.called(
                    "false_computation")
                costs = [visit(b, part, fused, nested) for b in branches]
                worst = max(costs, key=lambda d: sum(x.cycles for x in d.values()), default={})
                for p, sc in worst.items():  # one branch runs: the dearest
                    out[p].add(sc)
            else:
                for key_ in ("calls", "to_apply"):
                    for sub in i.called(key_):
                        inner = fused or i.opcode in ("fusion", "reduce", "scatter", "sort", "map",
                                                      "reduce-window", "select-and-scatter", "all-reduce",
                                                      "reduce-scatter")
                        for p, sc in visit(sub, part, inner, nested).items():
                            out[p].add(sc)
        memo[key] = out
        return out

    parts = visit(entry, "other", False)
    for p in layer_loops or {}:
        if not scaled[p]:
            raise errors.BadValue(f"reduced depth: no while loop of part {p!r} runs {layer_loops[p][0]} times (XLA may "
                             f"have unrolled it); compile at another depth or without --reduced_depth")
    return {"parts": dict(parts), "loops": loops, "warnings": warnings}


def summarize(sim: dict, chip: Chip, *, model_flops: float, tokens: int, chips: int,
              rows_per_chip: float = 1) -> dict:
    """Seconds per part and in total, collectives overlapped and not; tokens/s/chip and MFU of each total."""
    rows = {}
    for p, c in sim["parts"].items():
        compute = c.cycles / chip.clock_hz + c.pallas_s
        rows[p] = {"compute_s": compute, "xla_s": c.cycles / chip.clock_hz, "pallas_s": c.pallas_s,
                   "pallas_flops": c.pallas_flops, "pallas_exact": c.pallas_exact,
                   "collective_s": c.collective_s, "collective_bytes": c.collective_bytes,
                   "collectives": c.collectives}
    compute = sum(r["compute_s"] for r in rows.values())
    comm = sum(r["collective_s"] for r in rows.values())
    out = {"parts": rows, "compute_s": compute, "collective_s": comm, "chip": chip, "rows_per_chip": rows_per_chip,
           "loops": sim["loops"], "warnings": sim["warnings"]}
    for name, s in (("overlapped", max(compute, comm)), ("serial", compute + comm)):
        out[name] = {"step_s": s, "tokens_per_s_chip": tokens / s / chips,
                     "mfu": model_flops / (s * chips * chip.peak_flops)}
    out["layers"] = {}
    for part in ("llm", "vision", "head"):  # the scanned towers: a layer's time from its loops' bodies
        loops = [x for x in sim["loops"] if x["part"] == part and not x["nested"]]
        if loops:
            out["layers"][part] = {"loops": [x["per_trip_s"] for x in loops], "trips": loops[0]["counted"],
                                   "layer_s": sum(x["per_trip_s"] for x in loops)}
    return out


def run(text: str, *, kind: str, pallas_efficiency: float, layer_loops: dict | None, model_flops: float,
        tokens: int, chips: int, rows_per_chip: float, stacked: dict | None = None) -> dict:
    """simulate + summarize for a compiled train step on `chips` chips of `kind` (a device_kind)."""
    chip = CHIPS[kind]
    res = simulate(text, chip, pallas_efficiency=pallas_efficiency, layer_loops=layer_loops, stacked=stacked)
    return {**summarize(res, chip, model_flops=model_flops, tokens=tokens, chips=chips, rows_per_chip=rows_per_chip),
            "model_flops": model_flops, "pallas_efficiency": pallas_efficiency, "layer_loops": layer_loops}


def save(path: str, text: str, setting: dict) -> None:
    """The compiled HLO text (gzip) and, beside it as PATH.json, what `run` needs besides it."""
    import gzip
    import json

    with gzip.open(path, "wt") as f:
        f.write(text)
    with open(path + ".json", "w") as f:
        json.dump(setting, f, indent=1)


def format_summary(s: dict) -> str:
    chip = s["chip"]
    order = [p for p in PARTS + ("other",) if p in s["parts"]]
    ms = lambda x: f"{x * 1e3:10.2f}"  # noqa: E731
    lines = [f"simulated on {chip.name} (clock {chip.clock_hz / 1e9:.3f} GHz, bf16 peak {chip.peak_flops / 1e12:.0f} "
             f"TFLOP/s, ICI {RING_LINKS} x {chip.ici_link_bytes_s / 1e9:.0f} GB/s; Pallas at "
             f"{s['pallas_efficiency']:.0%} of peak), per chip, ms:",
             f"  {'part':<10}{'compute':>10}{'(XLA':>10}{'Pallas)':>10}{'collect.':>10}  collective GB"]
    for p in order:
        r = s["parts"][p]
        bound = "" if r["pallas_exact"] or not r["pallas_s"] else " (Pallas FLOPs an upper bound)"
        lines.append(f"  {p:<10}{ms(r['compute_s'])}{ms(r['xla_s'])}{ms(r['pallas_s'])}{ms(r['collective_s'])}"
                     f"  {r['collective_bytes'] / 1e9:.2f}{bound}")
    lines.append(f"  {'total':<10}{ms(s['compute_s'])}{'':>20}{ms(s['collective_s'])}")
    for part, x in s["layers"].items():
        each = " + ".join(f"{t * 1e3:.2f}" for t in x["loops"])
        lines.append(f"  {part} layer: {x['layer_s'] * 1e3:.2f} ms ({each} in its {len(x['loops'])} layer loops of "
                     f"{x['trips']} trips), {x['layer_s'] / s['rows_per_chip'] * 1e3:.2f} ms a layer and row")
    ser = s["serial"]
    lines.append(f"collectives not overlapped: step {ser['step_s']:.3f} s, tokens/s/chip "
                 f"{ser['tokens_per_s_chip']:.0f}, MFU {ser['mfu'] * 100:.1f} %")
    ov = s["overlapped"]
    lines.append(f"simulated step: {ov['step_s']:.3f} s, tokens/s/chip {ov['tokens_per_s_chip']:.0f}, "
                 f"MFU {ov['mfu'] * 100:.1f} %  (collectives fully overlapped)")
    return "\n".join(lines)


def main(argv=None) -> int:
    """python -m launch.simulate HLO.gz [--pallas_efficiency=E]: simulate a train step `launch.aot --simulate
    --save_hlo=HLO.gz` compiled, again, without compiling."""
    import argparse
    import gzip
    import json
    import sys

    p = argparse.ArgumentParser(prog="python -m launch.simulate", description=main.__doc__.split("\n")[0])
    p.add_argument("hlo", help="a file launch.aot --save_hlo wrote (and its .json beside it)")
    p.add_argument("--pallas_efficiency", type=float, help="instead of the one it was saved with")
    errors.add_verbose(p)
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        setting = json.load(open(a.hlo + ".json"))
        text = gzip.open(a.hlo, "rt").read()
    except FileNotFoundError as e:
        raise errors.MissingFile(f"{e.filename}: no such file (write it with launch.aot --simulate --save_hlo)")
    if a.pallas_efficiency:
        setting["pallas_efficiency"] = a.pallas_efficiency
    setting["layer_loops"] = {k: tuple(v) for k, v in (setting["layer_loops"] or {}).items()} or None
    print(format_summary(run(text, **setting)))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(errors.guard(main))
