"""Writes one benchmark's result into its own section of BENCHMARKS.md (replacing the previous run's)."""

from __future__ import annotations

import datetime
import os
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# `python bench/x.py` puts bench/ on the path, not the repository's root: convert/ and launch/ (installed as
# genllava_jax.convert / .launch) are imported from this checkout, as `python -m convert` from the root does; ahead
# of bench/, whose convert.py (the conversion benchmark) would otherwise shadow the convert package
sys.path.insert(0, str(ROOT))


def record(name: str, command: str, header: list[str], row: list[str] | list[list[str]], note: str = "") -> str:
    """Prints the table (one row, or a list of rows) and stores it under `## <name>` in BENCHMARKS.md with the
    command and the machine."""
    rows = row if row and isinstance(row[0], list) else [row]
    table = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n" + "".join(
        "| " + " | ".join(r) + " |\n" for r in rows)
    when = datetime.date.today().isoformat()
    section = (f"## {name}\n\nCommand: `{command}`  \nMachine: {os.cpu_count()} CPU cores, {platform.machine()}, "
               f"{when}.\n\n{table}" + (f"\n{note}\n" if note else ""))
    print(table)
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEach section: the command that produced it.\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text)
    return section


def tiny_config(world: Path, num_train: int = 64, num_eval: int = 200):
    """configs/tiny.py pointed at a new synthetic world written to `world` (the benchmarks' default model)."""
    import importlib.util

    from genllava_jax.data.synthetic import make_synthetic

    spec = importlib.util.spec_from_file_location("tiny", ROOT / "configs" / "tiny.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    c = tiny.get_config()
    make_synthetic(world, num_train=num_train, num_eval=num_eval, image_size=c.data.image_size,
                   num_img_tokens=c.data.num_img_tokens)
    c.data.update(path=str(world / "train.jsonl"), tokenizer=str(world / "tokenizer"))
    return c
