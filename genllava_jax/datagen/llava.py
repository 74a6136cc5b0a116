"""LLaVA-style instruction data: a text-only LLM reads an image's captions and boxes and writes, for each prompt
file, a conversation, a detailed description or a complex-reasoning answer about it; the records are GVIT `i2t`.

Each (image, prompt file) pair is one record, id `<image_id>-<prompt name>`. The request is the prompt file's
system message, its in-context examples and the image's context (`coco.context`); the reply is read and filtered by
`replies` (a description's question is drawn from the file's list, seeded by the id). `<image>` leads the first
user turn. Image paths are written relative to the output file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

from tqdm import tqdm

from genllava_jax.datagen import coco, replies
from genllava_jax.datagen.llm import ChatLLM
from genllava_jax.datagen.output import Output
from genllava_jax.datagen.prompts import Prompt
from genllava_jax.data.tokenizer import IMAGE


def conversations(turns: Sequence[tuple[str, str]]) -> list[dict]:
    """GVIT turns with `<image>` leading the first question."""
    out = []
    for i, (q, a) in enumerate(turns):
        out += [{"from": "human", "value": f"{IMAGE}\n{q}" if i == 0 else q}, {"from": "gpt", "value": a}]
    return out


def relative(path, base_dir: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), base_dir.resolve())).as_posix()


def make(entries: Sequence[coco.Entry], image_dir, llm: ChatLLM, prompts: Mapping[str, Prompt], out: Output, *,
         chunk: int = 0, progress: bool = True) -> dict:
    """Writes the records of every (entry, prompt) pair not yet in `out`; returns the shard's report."""
    image_dir = Path(image_dir)
    jobs = [(f"{e.image_id}-{name}", e, name) for e in entries for name in prompts]
    todo = [j for j in jobs if j[0] not in out.done]
    chunk = chunk or 8 * llm.batch_size
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=f"llava {out.path.name}", unit="rec",
               disable=not progress, file=sys.stderr)
    for s in range(0, len(todo), chunk):
        part, asked = todo[s:s + chunk], []
        for rid, e, name in part:
            if not (image_dir / e.file_name).is_file():
                out.reject(rid, "missing_image", str(image_dir / e.file_name))
                bar.update()
            else:
                asked.append((rid, e, name))
        replies_ = llm.complete([prompts[name].request(rid, context=coco.context(e)) for rid, e, name in asked],
                                on_batch=bar.update)
        for (rid, e, name), c in zip(asked, replies_):
            p = prompts[name]
            try:
                turns = replies.read(p.kind, c.text, c.finished, p.max_words,
                                     question=p.question(rid) if p.kind == "description" else "")
            except replies.Rejected as r:
                out.reject(rid, r.reason, str(r), c.text)
                continue
            out.keep({"id": rid, "task": "i2t", "image": relative(image_dir / e.file_name, out.base_dir),
                      "conversations": conversations(turns),
                      "meta": {"source": "llava", "type": name, "image_id": e.image_id}})
        report = out.checkpoint()
        bar.set_postfix(kept=report["kept"], filtered=report["total"] - report["kept"])
    bar.close()
    return out.checkpoint()
