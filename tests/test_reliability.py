"""Reliability: preemption and kills lose nothing, corrupt checkpoints are skipped, non-finite steps never reach the
weights, bad data never stops a run and is counted, bad configs fail at start-up saying what to change, and
converters refuse bad checkpoints by name and write atomically.

The training runs here are subprocesses of the real CLI (`python -m genllava_jax.train`) on one CPU device, sharing
a persistent compilation cache: the micro model compiles once per module, each later run loads it.
"""

import collections
import gc
import json
import logging
import math
import os
import queue
import random
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from flax import nnx
from hypothesis import HealthCheck, event, given, settings, strategies as st
from micro import FAST_COMPILE, micro_config

from genllava_jax import checkpoint, config_check, train
from genllava_jax.constants import IGNORE
from genllava_jax.data import pipeline
from genllava_jax.data.records import REASONS, TASKS, BadRecord
from genllava_jax.data.template import GENERATES
from genllava_jax.data.tokenizer import SpecialIds

ROOT = Path(__file__).resolve().parent.parent
flags.FLAGS.mark_as_parsed()  # grain reads absl flags


# ---------------------------------------------------------------------------------------------------------------
# Bad data


def encoder(tok, root, **kw):
    kw = {"max_len": 40, "on_too_long": "truncate", "max_pixels": 1_000_000, **kw}
    return pipeline.Encoder(tok, SpecialIds.of(tok, 4), root, kw["max_len"], 16, 4, 16, kw["on_too_long"], None,
                            kw["max_pixels"])


def ask(image=None, question="<image>\nWhat colour is the shape?", answer="red", **extra):
    r = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}], **extra}
    if image is not None:
        r.update(task="i2t", image=image)
    return r


MODE_FILES = ["mode_1.png", "mode_L.png", "mode_LA.png", "mode_P.png", "mode_RGBA.png", "mode_I_16.png",
              "mode_CMYK.tiff", "mode_I.tiff", "mode_F.tiff", "mode_YCbCr.tiff"]
BAD_IMAGES = {"missing.png": "missing_image", "truncated.png": "corrupt_image", "junk.png": "corrupt_image",
              "folder.png": "corrupt_image", "fifo.png": "corrupt_image", "bomb.png": "image_too_large",
              "big.png": "image_too_large", "../outside.png": "path_escape", "../../../../../etc/passwd": "path_escape",
              "/etc/passwd": "path_escape", "link_out.png": "path_escape"}


def test_bad_images_and_escaping_paths_are_skipped_by_reason_and_odd_modes_fixed(root, tok):
    records = [ask(name) for name in BAD_IMAGES]
    kept = ["good.png", str(root / "good.png"), "link_in.png", *MODE_FILES]  # absolute inside the root is fine
    records += [ask(name) for name in kept]
    (root / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = pipeline.default_data_config()
    cfg.update(path=str(root / "mixed.jsonl"), max_len=40, image_size=16, num_patches=4, target_image_size=16,
               num_img_tokens=4, read_threads=1, max_image_pixels=1_000_000)
    t = time.time()
    it, info = pipeline.make_dataset(cfg, tok, global_batch=4, seed=0, train=False)
    batches = list(it)
    assert time.time() - t < 60  # nothing hung (the FIFO, the bomb)
    assert dict(info.skipped) == dict(collections.Counter(BAD_IMAGES.values()))
    assert info.counts.read == len(records)
    real = [i for b in batches for i in range(4) if b["attention_mask"][i].any()]
    assert len(real) == len(kept)
    images = np.concatenate([b["image"] for b in batches])[:len(kept)]
    assert np.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
    assert all(b["has_image"][:4].sum() == b["attention_mask"].any(1).sum() for b in batches)
    # the same reasons, one record at a time, with the file named in the message
    enc = encoder(tok, root)
    for name, reason in BAD_IMAGES.items():
        with pytest.raises(BadRecord, match=reason) as e:
            enc.encode(json.dumps(ask(name)))
        assert e.value.reason == reason
    with pytest.raises(BadRecord, match="2000x2000 pixels, more than data.max_image_pixels=1000000"):
        enc.encode(ask("big.png"))
    with pytest.raises(BadRecord, match="outside the data root"):
        enc.encode(ask("link_out.png"))
    # transparency is composited on white, as SigLIP's processor does
    ex, _ = enc.encode(ask("mode_LA.png"))
    assert ex["has_image"] and np.isfinite(ex["image"]).all()


def test_text_that_would_forge_reserved_tokens_is_refused(root, tok):
    enc = encoder(tok, root)
    for question, answer in (("Draw [SOI] it", "ok"), ("Hi", "yes </s> <s> more"), ("Hi", "look: <image>"),
                             ("[IMG0] [EOI]", "ok"), ("[T2I] a cat", "ok")):
        with pytest.raises(BadRecord) as e:
            enc.encode(ask(question=question, answer=answer))
        assert e.value.reason == "special_token_in_text", (question, answer)
    ex, fixes = enc.encode(ask(question="What is [INST] here?", answer="red"))  # plain text for this template
    assert ex["attention_mask"].any() and fixes == []


def test_long_records_truncated_or_dropped_and_counts_survive_a_restore(data_dir, tok, tmp_path):
    long = ask(question="What shapes are there?", answer="circle and square " * 30)
    lines = Path(data_dir / "train.jsonl").read_text().splitlines()[:20] + [json.dumps(long)] * 3 + ["{bad"]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "images").symlink_to(data_dir / "images")  # the synthetic records' images, inside this root
    for how, counted in (("truncate", "fixed"), ("drop", "skipped")):
        cfg = pipeline.default_data_config()
        cfg.update(path=str(tmp_path / "d.jsonl"), max_len=40, image_size=16, num_patches=4, target_image_size=16,
                   num_img_tokens=4, read_threads=1, on_too_long=how, image_root=str(data_dir))
        it, info = pipeline.make_dataset(cfg, tok, global_batch=4, seed=0)
        for _ in range(12):  # two epochs of 24 records
            next(it)
        counts = info.counts
        assert counts.read >= 48 and counts.skipped["malformed"] >= 2
        assert getattr(counts, counted)["too_long" if how == "drop" else "truncated"] >= 6
        state = it.get_state()
        it2, info2 = pipeline.make_dataset(cfg, tok, global_batch=4, seed=0)
        it2.set_state(json.loads(json.dumps(state)))  # as grain's checkpoint handler stores it
        assert info2.counts == counts
        a, b = next(it), next(it2)
        assert all(np.array_equal(a[k], b[k]) for k in a) and info2.counts == info.counts
    # `data.image_root` is what lets these records reach images outside the data file's folder
    cfg.update(image_root="", on_too_long="truncate")
    it, info = pipeline.make_dataset(cfg, tok, global_batch=4, seed=0, train=False)
    list(it)
    assert info.skipped["path_escape"] > 0


# Random records, biased towards nearly valid ones so that both outcomes are common: conversations that alternate
# or not, texts with reserved tokens, lone surrogates and NULs, paths to good, bad and escaping files, random JSON.
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                  max_size=3), max_leaves=8)
_odd = st.sampled_from(["<image>", "<image>\n", "[SOI]", "[EOI]", "[IMG0]", "[T2I]", "[I2T]", "</s>", "<s>", "[INST]",
                        "[/INST]", "\ud800", "\x00"])
_plain = st.text(max_size=30) | st.sampled_from(["What colour is the shape?", "red", "a small blue circle", "",
                                                 "Draw a green square. " * 12])
_text = st.one_of(_plain, _plain, _plain, st.lists(_odd | _plain, max_size=4).map("".join))
_user = st.sampled_from(["human", "user"])
_assistant = st.sampled_from(["gpt", "assistant"])
_pairs = st.lists(st.tuples(_user, _text, _assistant, _text), min_size=1, max_size=3).map(
    lambda ts: [t for u, q, a, r in ts for t in ({"from": u, "value": q}, {"from": a, "value": r})])
_turn = st.fixed_dictionaries({"from": _user | _assistant | st.sampled_from(["system", "bot"]) | _json,
                               "value": _text | _json})
_conversation = st.one_of(_pairs, _pairs, _pairs, _pairs.map(lambda c: [{"from": "system", "value": "Be brief."}, *c]),
                          st.lists(_turn, max_size=5), _json)
_good = st.sampled_from(["good.png", "link_in.png", *MODE_FILES])
_path = st.one_of(_good, _good, st.sampled_from([*BAD_IMAGES, "", "a\x00b", "x" * 5000]), st.text(max_size=20), _json)
_record = st.fixed_dictionaries({"conversations": _conversation}, optional={
    "image": _path, "target_image": _path, "task": st.sampled_from([*TASKS, "dance", ""]) | _json,
    "caption": _json, "meta": _json})


@st.composite
def _consistent(draw):
    """A record whose images fit its task (each image still any path)."""
    task = draw(st.sampled_from(TASKS))
    r = {"task": task, "conversations": draw(_pairs)}
    if task in ("i2t", "edit"):
        r["image"] = draw(_path)
    if task in ("t2i", "edit"):
        r["target_image"] = draw(_path)
    return r


_raw = st.one_of(_consistent(), _consistent(), _consistent().map(json.dumps), _record, _record.map(json.dumps),
                 st.text(max_size=30), _json, st.binary(max_size=40))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=_raw, on_too_long=st.sampled_from(["truncate", "drop"]), max_len=st.sampled_from([12, 40]))
def test_random_records_give_a_valid_example_or_bad_record(root, tok, raw, on_too_long, max_len):
    enc = encoder(tok, root, on_too_long=on_too_long, max_len=max_len)
    try:
        ex, fixes = enc.encode(raw)
    except BadRecord as e:
        assert e.reason in REASONS
        event(e.reason)
        return
    event("example")
    blank = enc.blank()
    assert ex.keys() == blank.keys()
    for k in blank:
        assert ex[k].shape == blank[k].shape and ex[k].dtype == blank[k].dtype, k
    ids, n = enc.ids, int(ex["attention_mask"].sum())
    assert n >= 1 and ex["attention_mask"][:n].all() and ex["input_ids"][0] == ids.bos
    labelled = ex["labels"] != IGNORE
    assert labelled.any() and (ex["labels"][labelled] == ex["input_ids"][labelled]).all()
    assert (ex["input_ids"] == ids.image).sum() == 4 * ex["has_image"]
    task = TASKS[int(ex["task"])]
    assert bool(ex["has_target"]) == (task in GENERATES)
    assert ((ex["input_ids"][:n] == ids.eoi).sum() == 1) == (task in GENERATES)
    for k in ("image", "target_image", "source_image"):
        assert np.isfinite(ex[k]).all() and np.abs(ex[k]).max() <= 1 + 1e-6
    assert fixes in ([], ["truncated"])


# ---------------------------------------------------------------------------------------------------------------
# Config errors


def test_unknown_override_is_refused_with_the_close_match(tmp_path):
    """ml_collections refuses an override of a key the config file does not have, naming the close match."""
    out = subprocess.run([sys.executable, "-m", "genllava_jax.train", f"--config={ROOT / 'configs' / 'tiny.py'}",
                          f"--workdir={tmp_path}", "--config.train.stpes=5"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode != 0 and 'Did you mean "steps" instead of "stpes"?' in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()


def test_config_file_errors_name_the_key_and_the_fix(data_dir):
    c = micro_config(data_dir)
    config_check.validate(c)
    for name in ("tiny.py", "genllava_7b.py"):
        config_check.validate(runpy.run_path(str(ROOT / "configs" / name))["get_config"]())  # shipped configs pass
    d = c.to_dict()
    d["train"]["stpes"] = 5
    d["train"]["steps"] = 10.5
    d["train"]["lr"] = "fast"
    d["train"]["accum"] = 0
    d["train"]["warmup_frac"] = True
    del d["train"]["b2"]
    d["data"]["max_lne"] = 64
    d["model"]["llm"]["hiden_size"] = 8
    d["model"]["llm"]["attention"] = "splsh"
    d["model"]["vision"]["remat"] = "save:q_prj"
    d["modle"] = {}
    with pytest.raises(ValueError) as e:
        config_check.validate(ml_collections.ConfigDict(d))
    msg = str(e.value)
    for want in ("unknown key train.stpes: did you mean train.steps?", "train.steps=10.5 is a float; expected int",
                 "train.lr='fast' is a str; expected int or float", "train.accum=0 must be at least 1",
                 "train.warmup_frac=True is a bool; expected int or float",
                 "missing key train.b2", "unknown key data.max_lne: did you mean data.max_len?",
                 "unknown key model.llm.hiden_size: did you mean model.llm.hidden_size?",
                 "model.llm.attention='splsh': choose one of", "model.vision.remat: unknown remat policy 'save:q_prj'",
                 "unknown key config.modle: did you mean config.model?"):
        assert want in msg, (want, msg)
    c.train.lr = float("inf")
    with pytest.raises(ValueError, match="train.lr=inf must be a finite positive number"):
        config_check.validate(c)


@pytest.mark.parametrize("mesh,batch,accum,match", [
    (dict(data=3, fsdp=1, tensor=1), 8, 1, r"has 3 slots but there are 8 devices; set one axis to -1"),
    (dict(data=5, fsdp=-1, tensor=1), 8, 1, r"the fixed axes \(5\) do not divide the 8 devices"),
    (dict(data=8, fsdp=1, tensor=1), 12, 1, r"batch_size=12 must be a multiple of data×fsdp=8 × train.accum=1 = 8"
                                            r".*set train.batch_size=16"),
    (dict(data=2, fsdp=2, tensor=2), 8, 4, r"data×fsdp=4 × train.accum=4 = 16.*set train.batch_size=16"),
])
def test_mesh_and_batch_errors_at_start_up(data_dir, tmp_path, mesh, batch, accum, match):
    c = micro_config(data_dir)
    c.mesh = mesh
    c.train.update(batch_size=batch, accum=accum)
    t = time.time()
    with pytest.raises(ValueError, match=match):
        train.run(c, tmp_path)
    assert time.time() - t < 5 and not (tmp_path / "checkpoints").exists()  # before anything is built


# ---------------------------------------------------------------------------------------------------------------
# Corrupt checkpoints (a small state and a real grain iterator; no model)


W = jnp.asarray(np.random.default_rng(0).normal(size=(4, 1000)), jnp.float32)  # too large to be inlined


def _save_steps(directory, steps=(1, 2, 3)):
    mngr = checkpoint.train_manager(directory, 1, 10)
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    for step in steps:
        next(it)
        state = {"w": W * step, "step": jnp.int32(step), "rng": jax.random.PRNGKey(7)}
        checkpoint.save_train(mngr, step, state, {"frozen": jnp.ones(5)}, it)
    mngr.wait_until_finished()
    mngr.close()
    return state


def _restore(directory, state):
    log = []
    mngr = checkpoint.train_manager(directory, 1, 10, log=log.append)
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    out = checkpoint.restore_latest(mngr, checkpoint.abstract_like(state),
                                    checkpoint.abstract_like({"frozen": jnp.ones(5)}), it, log=log.append)
    return out, next(it), log, mngr


def _files(d, pattern):
    return sorted(d.glob(pattern), key=lambda f: f.stat().st_size)


CORRUPTIONS = {
    "truncated array files": (lambda d: [f.write_bytes(f.read_bytes()[:16]) for f in _files(d, "state/ocdbt.*/d/*")],
                              "cannot be read"),
    "deleted array file": (lambda d: _files(d, "state/ocdbt.process_0/d/*")[-1].unlink(), "cannot be read"),
    "changed bytes": (lambda d: _flip_middle_byte(_files(d, "state/ocdbt.process_0/d/*")[-1]),
                      r"checksum mismatch in 1 arrays, e.g. \['state/w'\]"),
    "missing checkpoint metadata": (lambda d: (d / "_CHECKPOINT_METADATA").unlink(), "_CHECKPOINT_METADATA"),
    "truncated checkpoint metadata": (lambda d: (d / "_CHECKPOINT_METADATA").write_text('{"item_han'),
                                      "_CHECKPOINT_METADATA file is unreadable"),
    "missing data iterator state": (lambda d: next((d / "data").glob("process_0*.json")).unlink(), "cannot be read"),
    "deleted item": (lambda d: shutil.rmtree(d / "frozen"), "cannot be read"),
    "changed data iterator state": (lambda d: _edit_json(next((d / "data").glob("process_0*.json")),
                                                         lambda s: s.replace('"next_index": 3', '"next_index": 5')),
                                    r"checksum mismatch in the data iterator state of process 0 \(data/process_0"),
    "changed checksums": (lambda d: _edit_json(d / "_CHECKPOINT_METADATA", lambda s: s.replace(": 3", ": 4", 1)),
                          "checksum mismatch in 1 arrays"),
}


def _edit_json(f, change):
    before = f.read_text()
    assert change(before) != before  # the edit took
    f.write_text(change(before))


def _flip_middle_byte(f):
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, name, monkeypatch, capfd, caplog):
    corrupt, problem = CORRUPTIONS[name]
    state = _save_steps(tmp_path / "checkpoints")
    corrupt(tmp_path / "checkpoints" / "3")
    unraisable = []  # orbax's failed sibling reads could print a traceback each here ("Exception ignored in ...")
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    capfd.readouterr()
    caplog.clear()
    (restored_state, frozen, step), next_record, log, mngr = _restore(tmp_path / "checkpoints", state)
    gc.collect()
    # the fault is reported once, in our line: no traceback, no warning or error of orbax's about it
    assert not unraisable and "Traceback" not in capfd.readouterr().err
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert step == 2 and int(restored_state["step"]) == 2
    np.testing.assert_array_equal(restored_state["w"], W * 2)
    assert next_record == 2  # the data iterator is where it was at step 2
    assert len(log) == 1 and re.search(rf"checkpoint step 3 is unusable: .*{problem}", log[0]), log
    assert mngr.all_steps() == [1, 2]
    assert [p.name.split("-")[0] for p in (tmp_path / "corrupt_checkpoints").iterdir()] == ["3"]
    mngr.close()


def test_unfinished_save_is_reported_and_cleaned_up(tmp_path):
    state = _save_steps(tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "3").rename(tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234")  # as kill -9
    (_, _, step), next_record, log, mngr = _restore(tmp_path / "checkpoints", state)
    assert step == 2 and next_record == 2
    assert log == ["checkpoint 3.orbax-checkpoint-tmp-1234: an unfinished save (the run was killed while writing it);"
                   " removed"]
    assert not list((tmp_path / "checkpoints").glob("*tmp*"))
    mngr.close()


def test_no_usable_checkpoint_is_an_error_saying_what_to_do(tmp_path):
    state = _save_steps(tmp_path / "checkpoints", steps=(1, 2))
    for step in (1, 2):
        (tmp_path / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").unlink()
    with pytest.raises(RuntimeError, match=r"no usable checkpoint.*step 2: .*step 1: .*rerun to start from step 0"):
        _restore(tmp_path / "checkpoints", state)
    assert _restore(tmp_path / "checkpoints", state)[0] is None  # they were moved aside: a rerun starts afresh


def test_non_finite_values_are_never_saved(tmp_path):
    mngr = checkpoint.train_manager(tmp_path / "checkpoints", 1, 10)
    it = iter(grain.MapDataset.range(10).to_iter_dataset())
    state = {"params": {"a": jnp.ones(4), "b": jnp.array([1.0, jnp.nan])}, "step": jnp.int32(1)}
    with pytest.raises(FloatingPointError, match=r"step 1: non-finite values in \['state/params/b'\]: not saving"):
        checkpoint.save_train(mngr, 1, state, {}, it)
    mngr.wait_until_finished()
    assert mngr.all_steps() == []
    mngr.close()


# ---------------------------------------------------------------------------------------------------------------
# Training runs: SIGTERM, kill -9, non-finite steps (subprocesses of the real CLI)


@pytest.fixture(scope="module")
def cli(data_dir, tmp_path_factory):
    """Runs `python -m genllava_jax.train` on the micro config; all runs of the module share a compilation cache."""
    top = tmp_path_factory.mktemp("cli")
    c = micro_config(data_dir)
    c.train.update(steps=8, checkpoint_every=2, keep_checkpoints=3)
    c.init.projector = ""  # a key to override
    cfg = top / "micro.py"  # a snapshot: every run of the module trains the same model whatever happens to configs/
    cfg.write_text(f"import ml_collections\n\n\ndef get_config():\n"
                   f"    return ml_collections.ConfigDict({c.to_dict()!r})\n")
    cache = os.environ.get("TEST_COMPILATION_CACHE") or top / "cache"  # set it to keep the cache across sessions
    # FAST_COMPILE: every run of the module compiles alike (the losses are compared bit for bit), 20 s sooner
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE, "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
           "PYTHONUNBUFFERED": "1"}

    runs = []

    def start(workdir, *overrides) -> "Run":
        args = [sys.executable, "-m", "genllava_jax.train", f"--config={cfg}", f"--workdir={workdir}", *overrides]
        err = top / f"run{len(runs)}.stderr"  # logs and the progress bar; stdout has the metrics and messages
        with err.open("w") as f:
            proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=f, text=True)
        runs.append(Run(proc, err))
        return runs[-1]

    yield start
    for run in runs:  # a failed test leaves none running
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()


class Run:
    """A training subprocess whose output lines are collected by a thread, so the test can wait for one."""

    def __init__(self, proc, stderr: Path):
        self.proc, self.stderr, self.lines, self._q = proc, stderr, [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, pattern, timeout=1800.0) -> str:
        end = time.time() + timeout
        while time.time() < end:
            try:
                line = self._q.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"exited ({self.proc.wait()}) before {pattern!r}:\n{self.text[-3000:]}")
            self.lines.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no {pattern!r} in {timeout} s:\n{self.text[-3000:]}")

    def finish(self, timeout=1800.0) -> int:
        code = self.proc.wait(timeout)
        while (line := self._q.get()) is not None:
            self.lines.append(line)
        return code

    @property
    def text(self) -> str:
        """stdout, then the end of stderr (where a traceback is)."""
        return "".join(self.lines) + "\n--- stderr ---\n" + self.stderr.read_text()[-5000:]


def _losses(workdir) -> dict[int, float]:
    """step -> loss in metrics.jsonl; a step logged again after a restart keeps its last value."""
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_and_kill_9_loses_nothing(cli, tmp_path):
    ref = cli(tmp_path / "ref")
    assert ref.finish() == 0, ref.text[-3000:]
    expected = _losses(tmp_path / "ref")
    assert sorted(expected) == list(range(1, 9))

    # SIGTERM: a checkpoint at the next step boundary (not a regular one: checkpoint_every=4), exit status 0
    work = tmp_path / "run"
    run = cli(work, "--config.train.checkpoint_every=4")
    run.wait_for(r"^step 2 ")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0, run.text[-3000:]
    stopped = int(re.search(r"preempted \(SIGTERM\): saving the checkpoint of step (\d+)", run.text).group(1))
    assert 2 <= stopped < 8 and (work / "checkpoints" / str(stopped)).is_dir()

    # kill -9 at a random moment while it saves every step (usually mid-save)
    run = cli(work, "--config.train.checkpoint_every=1")
    assert f"resumed from step {stopped} " in run.wait_for(r"^resumed from step")
    run.wait_for(rf"^step {stopped + 2} ")
    time.sleep(random.uniform(0, 0.5))
    run.proc.kill()
    run.finish()
    complete = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())

    # the last complete checkpoint is intact, and the resumed run reproduces the uninterrupted losses exactly
    run = cli(work)
    assert run.finish() == 0, run.text[-3000:]
    resumed = int(re.search(r"resumed from step (\d+)", run.text).group(1))
    assert resumed == complete[-1] >= stopped and "unusable" not in run.text, run.text[-3000:]
    assert _losses(work) == expected
    # the data counts came back with the iterator each time: 8 steps × 8 rows of the 96 records read
    last = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 8 and last["data_epoch"] == 64 / 96


@pytest.mark.slow
def test_non_finite_steps_are_skipped_counted_across_restarts_and_stop_the_run(cli, tmp_path):
    from genllava_jax.models.projector import Projector, ProjectorConfig

    # a projector whose outputs overflow: every step with an image row has a non-finite loss
    proj = Projector(ProjectorConfig(vision_size=16, text_size=32), rngs=nnx.Rngs(0))
    for var in (proj.fc1.kernel, proj.fc2.kernel):
        var.set_value(jnp.full(var.get_value().shape, 1e30, jnp.float32))
    checkpoint.save_module(tmp_path / "huge_projector", proj, "projector")
    work, init = tmp_path / "run", f"--config.init.projector={tmp_path / 'huge_projector'}"
    run = cli(work, init, "--config.train.max_skipped_steps=100", "--config.train.checkpoint_every=1")
    run.wait_for(r"^step 2 ")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0, run.text[-3000:]
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["skipped_steps"] == r["step"] and not math.isfinite(r["loss"]) for r in rows), rows
    stopped = rows[-1]["step"]

    # the count is restored with the state: one more skipped step passes the limit
    run = cli(work, init, f"--config.train.max_skipped_steps={stopped}")
    assert run.finish() != 0
    assert f"{stopped + 1} steps had a non-finite loss or gradient (limit train.max_skipped_steps=" \
           f"{stopped}); stopping at step {stopped + 1}" in run.text, run.text[-3000:]

    # what was saved is finite and is the untouched initial projector
    model, _ = train.load_trained(work)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    np.testing.assert_array_equal(np.asarray(model.projector.fc1.kernel.get_value()), np.float32(1e30))


# ---------------------------------------------------------------------------------------------------------------
# Preemption on several hosts: every host stops at the same step


WORKER = """
import os, signal, sys, time
from genllava_jax import distributed
import jax
if sys.argv[2] == "flag":
    jax.config.update("jax_enable_preemption_service", False)
distributed.initialize()
from genllava_jax.preemption import Preemption
with Preemption() as preempted:
    for step in range(1, 3000):
        time.sleep(0.01)
        if jax.process_index() == 1 and step == 30:
            os.kill(os.getpid(), signal.SIGTERM)
        if preempted(step):
            print("STOP", step, flush=True)
            break
"""


@pytest.mark.parametrize("mode", ["service", "flag"])
def test_all_hosts_stop_at_the_same_step(mode):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for i in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, "-", mode], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    stops = [re.findall(r"STOP (\d+)", out) for out in outs]
    assert stops[0] == stops[1] and len(stops[0]) == 1 and int(stops[0][0]) >= 30, outs


# ---------------------------------------------------------------------------------------------------------------
# Converters: what the per-part tests do not already cover (missing / unexpected / mis-shaped keys and truncated
# safetensors: tests/test_mistral.py::test_bad_checkpoints_name_the_key and the other parts' tests)


@pytest.fixture
def projector_hf(tmp_path):
    from convert import projector as pconv
    from genllava_jax.models.projector import Projector, ProjectorConfig

    model = Projector(ProjectorConfig(vision_size=8, text_size=16), rngs=nnx.Rngs(0))
    pconv.to_hf(model, tmp_path / "hf")
    return pconv, model, tmp_path / "hf"


def test_converter_refuses_integer_weights_by_name(projector_hf):
    from safetensors.numpy import load_file, save_file

    from convert.common import ConversionError

    pconv, _, path = projector_hf
    tensors = load_file(str(path / "model.safetensors"))
    key = "model.mm_projector.2.weight"
    tensors[key] = tensors[key].astype(np.int32)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ConversionError, match=rf"{re.escape(key)}: not a floating-point tensor"):
        pconv.from_hf(path)


def test_bin_pickles_load_only_plain_tensors(projector_hf, tmp_path):
    import torch
    from safetensors.numpy import load_file

    from convert.common import ConversionError

    pconv, model, path = projector_hf
    tensors = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, path / "pytorch_model.bin")
    np.testing.assert_array_equal(np.asarray(pconv.from_hf(path).fc1.kernel.get_value()),
                                  np.asarray(model.fc1.kernel.get_value()))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({**{k: torch.from_numpy(v) for k, v in tensors.items()}, "x": Evil()}, path / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin.*weights_only=True"):
        pconv.from_hf(path)
    assert not marker.exists()


def test_failed_export_leaves_nothing_behind_and_keeps_the_old_output(projector_hf, tmp_path):
    from convert.common import Layout
    from convert.stream import Tensor, write_hf

    def fail():
        raise RuntimeError("disk full")

    tensors = [Tensor("a", (3,), np.dtype(np.float32), lambda: np.zeros(3, np.float32)),
               Tensor("b", (3,), np.dtype(np.float32), fail)]
    with pytest.raises(RuntimeError, match="disk full"):
        write_hf(tmp_path / "out", Layout((), {"x": 1}), tensors, "float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no out, no temporary folder
    _, _, path = projector_hf
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(RuntimeError, match="disk full"):
        write_hf(path, Layout((), {"x": 1}), tensors, "float32", overwrite=True)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
