"""The model side of the web demo: checks a user's turn, runs the turns that arrive together as one batch through
the Assistant's jitted calls (a fixed batch size, so each length bucket compiles once), and warms every bucket up
at start-up. No gradio here: app.py is the page over it."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterator

from genllava_jax import errors, infer
from genllava_jax.data.records import BadRecord, load_image
from genllava_jax.serve.batcher import Batcher, Busy, Request

MODES = ("chat", "generate", "edit")
TASKS = {"generate": "t2i", "edit": "edit"}  # chat: i2t with an image, text without


class UserError(errors.BadValue):
    """Bad input: its message is shown to the user; the server goes on."""


@dataclasses.dataclass(frozen=True)
class Turn:
    mode: str  # chat | generate | edit
    text: str
    image: object = None  # PIL image: chat's conversation image or the image to edit
    history: tuple = ()  # chat: the model conversation's earlier (user, answer) turns
    settings: infer.Settings = infer.Settings()


def length_buckets(context: int, ladder=(64, 128, 256, 512, 1024, 2048, 4096)) -> tuple[int, ...]:
    """Prompt buckets: the Assistant's ladder below `context`, then `context` itself."""
    return tuple(b for b in ladder if b < context) + (context,)


class Worker:
    def __init__(self, assistant: infer.Assistant, *, context: int, defaults: infer.Settings = infer.Settings(),
                 batch_size: int = 4, wait_s: float = 0.01, max_pending: int = 16, max_pixels: int = 4096 * 4096):
        """`context`: the longest prompt taken (a longer one is a UserError). Image rows are longer (prompt,
        answer, [SOI][IMG..][EOI]): one more bucket holds the longest. `defaults`: the settings warmed up (its
        max_new_tokens holds for every turn: it sizes the decode)."""
        self.assistant, self.context, self.defaults = assistant, context, defaults
        self.max_new_tokens, self.batch_size, self.max_pixels = defaults.max_new_tokens, batch_size, max_pixels
        self.prompt_buckets = length_buckets(context)
        self.image_bucket = context + self.max_new_tokens + len(assistant.ids.generation)
        assistant.length_buckets = self.prompt_buckets + (self.image_bucket,)
        self.batcher = Batcher(self._run, max_batch=batch_size, wait_s=wait_s, max_pending=max_pending)

    # -- checks: each problem is one line for the user

    def open_image(self, path) -> object:
        try:
            return load_image(str(path), self.max_pixels)
        except BadRecord as e:  # its message names the (temporary) path: the user knows the file by its name
            name = Path(path).name
            raise UserError(f"cannot use {name}: {str(e).replace(str(path), name)}") from None

    def prompt(self, turn: Turn) -> list[int]:
        if turn.mode not in MODES:
            raise UserError(f"mode {turn.mode!r}: choose one of {', '.join(MODES)}")
        if not turn.text.strip():
            raise UserError("type a question or an instruction first")
        if turn.mode == "edit" and turn.image is None:
            raise UserError("nothing to edit yet: upload an image or generate one first")
        task = TASKS.get(turn.mode, "i2t" if turn.image is not None else "text")
        history = list(turn.history) if turn.mode == "chat" else []
        ids = self.assistant.prompt(history, turn.text.strip(), task=task, has_image=turn.image is not None)
        if len(ids) > self.context:
            what = "conversation" if history else "prompt"
            raise UserError(f"the {what} is {len(ids)} tokens, over this server's context of {self.context}"
                            + (": clear the chat to start again" if history else ": shorten it"))
        return ids

    # -- serving

    def submit(self, turn: Turn) -> Request:
        """The queued request (Busy past the queue's bound, UserError for bad input)."""
        if turn.settings.max_new_tokens != self.max_new_tokens:
            turn = dataclasses.replace(turn, settings=dataclasses.replace(turn.settings,
                                                                          max_new_tokens=self.max_new_tokens))
        if turn.mode == "generate":  # draws from the text alone, whatever the conversation's image
            turn = dataclasses.replace(turn, image=None)
        ids = self.prompt(turn)
        # rows of one call share its settings; the seed only matters per row (the image noise) when greedy
        s = turn.settings
        key = dataclasses.replace(s, seed=0) if s.temperature == 0 else s
        return self.batcher.submit(key, (turn, ids))

    def events(self, turn: Turn, timeout: float = 600.0) -> Iterator[tuple[str, object]]:
        """("text", piece)... then ("done", infer.Reply) or ("error", message): bad input and a full queue
        included, so that a page can show every outcome the same way."""
        try:
            req = self.submit(turn)
        except UserError as e:
            yield "error", str(e)
            return
        except Busy as e:
            yield "error", f"the server is busy ({e}); try again in a moment"
            return
        yield from req.results(timeout)

    def _run(self, batch: list[Request]):
        turns = [r.payload[0] for r in batch]
        replies = self.assistant.reply(
            [r.payload[1] for r in batch], [t.image for t in turns], batch[0].key,
            force_image=[t.mode != "chat" for t in turns], seeds=[t.settings.seed for t in turns],
            batch_size=self.batch_size, on_text=lambda b, piece: batch[b].put("text", piece))
        for r, reply in zip(batch, replies):
            r.put("done", reply)

    def warm_up(self, log=print) -> float:
        """Compiles, at the server's batch size and default settings, the streamed decode for every prompt bucket
        and the image call for every bucket an image row can fall in; returns the seconds it took."""
        a, t0, settings = self.assistant, time.perf_counter(), self.defaults
        for T in self.prompt_buckets:
            a.reply([[a.ids.bos] * T], [None], settings, batch_size=self.batch_size, on_text=lambda b, piece: None)
        gen = list(a.ids.generation)
        sig, has_image, vae_px = a.pixels([None])
        for T in a.length_buckets:
            a.draw([[a.ids.bos] * (T - len(gen)) + gen], sig, has_image, vae_px, [0], settings,
                   batch_size=self.batch_size)
        log(f"warm-up: {len(self.prompt_buckets)} prompt and {len(a.length_buckets)} image buckets compiled "
            f"in {time.perf_counter() - t0:.0f} s")
        return time.perf_counter() - t0
