"""Evaluation sweeps: a micro checkpoint × POPE- and GQA-format files of the synthetic world × two settings, on the
8 simulated devices: one compile per bucket, a killed sweep resumes to the same results, batched = one by one, and
2 processes × 2 devices write the same bytes."""

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from micro import micro_config, single_mesh

from genllava_jax import checkpoint, cli, infer, sweep, train
from genllava_jax.data.pipeline import make_dataset
from genllava_jax.evaluate import read_benchmark, synthetic

SETTINGS = {"greedy": infer.Settings(max_new_tokens=6),
            "sample": infer.Settings(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=3)}
BATCH = 8  # one row per simulated device; 12 items a benchmark -> a full and a padded batch


def test_parse_flags():
    assert sweep.parse_benchmark("gqa:q.jsonl:img:a.json") == sweep.Benchmark("gqa", ("q.jsonl", "img", "a.json"))
    assert sweep.parse_settings("t07:temperature=0.7,top_p=0.9,max_new_tokens=8") == (
        "t07", infer.Settings(temperature=0.7, top_p=0.9, max_new_tokens=8))
    assert sweep.parse_settings("greedy") == ("greedy", infer.Settings())
    for bad, msg in [("nope:q.jsonl", "unknown benchmark 'nope'"), ("gqa", "NAME:FILE")]:
        with pytest.raises(ValueError, match=msg):
            sweep.parse_benchmark(bad)
    for bad, msg in [("x:temp=1", "unknown key 'temp'"), ("x:top_p=high", "top_p='high' is not a float"),
                     ("a/b", "must be letters"), ("x:seed", "not key=value")]:
        with pytest.raises(ValueError, match=msg):
            sweep.parse_settings(bad)


def untrained_workdir(c, out):
    """A training workdir holding a step-0 checkpoint of the freshly built model, as train.run writes them, without
    compiling a train step (minutes on a busy 2-core machine; the sweep does not care what the weights are)."""
    cfg, model, tokenizer, mesh = train.build(c, single_mesh())
    state, s = train.setup(model, c.train, mesh, c.seed)
    data, _ = make_dataset(c.data, tokenizer, global_batch=c.train.batch_size, seed=c.seed)
    (out / "config.json").write_text(c.to_json_best_effort(indent=2))
    (out / "model_config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    mngr = checkpoint.train_manager(out / "checkpoints", 1, 1)
    checkpoint.save_train(mngr, 0, state, s.frozen, data, force=True)
    mngr.wait_until_finished()
    mngr.close()
    return out


@pytest.fixture(scope="module")
def workdir(data_dir, tmp_path_factory):
    return untrained_workdir(micro_config(data_dir), tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def benchmarks(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return [sweep.Benchmark("pope", synthetic.write_pope(data_dir, out, 12, eval_only=False)),
            sweep.Benchmark("gqa", synthetic.write_gqa(data_dir, out, 12, suffix=synthetic.GQA_SUFFIX,
                                                       eval_only=False))]


@pytest.fixture(scope="module")
def one_device(workdir):
    return cli.load_assistant(workdir, single_mesh(), sweep.DEFAULT_BUCKETS)[0]


@pytest.fixture(scope="module")
def buckets(one_device, benchmarks):
    """Two length buckets: POPE's short questions in one, GQA's (with LLaVA's answer-format suffix) in the other."""
    lengths = {b.name: [len(p) for p in sweep.prompts_of(one_device, read_benchmark(b.name, *b.files))]
               for b in benchmarks}
    assert max(lengths["pope"]) < min(lengths["gqa"])
    return max(lengths["pope"]), max(lengths["gqa"])


@pytest.fixture(scope="module")
def through(workdir, benchmarks, buckets, tmp_path_factory):
    """An uninterrupted sweep, with the decode function's compilations counted over it."""
    out = tmp_path_factory.mktemp("through")
    infer.decode_arrays.clear_cache()
    summary = sweep.run([str(workdir)], benchmarks, SETTINGS, out, batch_size=BATCH, length_buckets=buckets)
    return out, summary, infer.decode_arrays._cache_size()


def _answers(out):
    return {p.relative_to(out): p.read_text() for p in sorted((out / "cells").rglob("*.jsonl"))}


@pytest.mark.slow
def test_one_compilation_per_bucket(through, buckets):
    out, summary, compiles = through
    assert summary.cells_run == 4 and summary.answered == 4 * 12
    # 2 length buckets × 2 static settings (greedy; temperature/top-p), over 8 batches
    assert compiles == len(summary.shapes) == 2 * 2
    assert {s[1] for s in summary.shapes} == set(buckets)
    rows = (out / "results.csv").read_text().splitlines()
    head = rows[0].split(",")
    assert len(rows) == 3 and head[:3] == ["checkpoint", "step", "setting"]
    for row in rows[1:]:
        rec = dict(zip(head, row.split(",")))
        assert rec["gqa/n"] == rec["pope/n"] == "12" and rec["step"] == "0"
        assert 0 <= float(rec["gqa/accuracy"]) <= 1 and 0 <= float(rec["pope/f1"]) <= 1
    md = (out / "results.md").read_text()
    assert "| gqa accuracy | pope f1 |" in md and "@0 | greedy |" in md and "@0 | sample |" in md


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_results(through, workdir, benchmarks, buckets, tmp_path, monkeypatch):
    ref, _, _ = through
    compiles = infer.decode_arrays._cache_size()
    written, real = [], sweep.write_answers

    def dies_after_three_batches(path, records, append=False):
        real(path, records, append)
        if append:
            written.append(len(records))
            if len(written) == 3:  # killed while writing the next batch: a torn line, then the process is gone
                with open(path, "a") as f:
                    f.write('{"question_id": 7, "prompt": "Is th')
                raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "write_answers", dies_after_three_batches)
    with pytest.raises(KeyboardInterrupt):
        sweep.run([str(workdir)], benchmarks, SETTINGS, tmp_path, batch_size=BATCH, length_buckets=buckets)
    assert len(list(tmp_path.rglob("*.done.json"))) == 1  # two batches made a cell; the third began the next
    before = sum(written)
    monkeypatch.setattr(sweep, "write_answers", real)
    summary = sweep.run([str(workdir)], benchmarks, SETTINGS, tmp_path, batch_size=BATCH, length_buckets=buckets)
    assert summary.cells_skipped == 1 and summary.cells_run == 3
    assert before + summary.answered == 4 * 12  # nothing answered twice
    for name in ("results.md", "results.csv"):
        assert (tmp_path / name).read_text() == (ref / name).read_text()
    assert _answers(tmp_path) == _answers(ref)  # sampled cells too: sampling is seeded per batch
    assert infer.decode_arrays._cache_size() == compiles  # the same shapes: nothing recompiled
    again = sweep.run([str(workdir)], benchmarks, SETTINGS, tmp_path, batch_size=BATCH, length_buckets=buckets)
    assert (again.cells_run, again.cells_skipped, again.answered) == (0, 4, 0)

    # a cell resumed with other settings under the same name is refused, naming the file and the fields
    other = {"greedy": infer.Settings(max_new_tokens=7)}
    refused = r"greedy/pope.(done|spec).json was made with other settings.max_new_tokens: 6 -> 7;"
    with pytest.raises(ValueError, match=refused):
        sweep.run([str(workdir)], benchmarks[:1], other, tmp_path, batch_size=BATCH, length_buckets=buckets)


@pytest.mark.slow
def test_batched_answers_equal_one_by_one(through, one_device, benchmarks, buckets):
    out, _, _ = through
    one_device.length_buckets = buckets  # the same left padding as the sweep; batch 1 on one device
    for b in benchmarks:
        items = read_benchmark(b.name, *b.files)
        prompts = sweep.prompts_of(one_device, items)
        lines = (next(out.rglob(f"greedy/{b.name}.jsonl"))).read_text().splitlines()
        batched = {json.loads(line)["metadata"]["key"]: json.loads(line)["text"] for line in lines}
        single = {it.key: one_device.reply([p], [it.load_image()], SETTINGS["greedy"])[0].text
                  for it, p in zip(items, prompts)}
        assert batched == single
        assert len(set(single.values())) > 1  # not one answer for everything


def _settings_flag(name, s: infer.Settings) -> str:
    return (f"--settings={name}:max_new_tokens={s.max_new_tokens},temperature={s.temperature},top_p={s.top_p},"
            f"seed={s.seed}")


def _run_processes(cmd, n, local_devices, logs, timeout=900) -> list[str]:
    """`cmd` as n processes of one JAX job (gloo on CPU); their logs, or an error with each one's tail."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={local_devices}",
           "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(n)}
    paths = [logs / f"process{i}.log" for i in range(n)]
    procs = [subprocess.Popen(cmd, env={**env, "JAX_PROCESS_ID": str(i)}, stdout=path.open("w"),
                              stderr=subprocess.STDOUT) for i, path in enumerate(paths)]
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break  # the others would wait for the failed one in a collective
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [path.read_text() for path in paths]
    if any(p.returncode != 0 for p in procs):
        raise AssertionError("\n".join(f"--- process {i} (exit {p.returncode}):\n{t[-3000:]}"
                                       for i, (p, t) in enumerate(zip(procs, texts))))
    return texts


@pytest.mark.slow
def test_two_hosts_redo_cells_to_the_same_bytes(through, workdir, benchmarks, buckets, tmp_path):
    """The command line as 2 processes × 2 devices: the POPE cells, deleted from a copy of the one-process sweep,
    are redone with each host loading its rows; the answers and the table (rebuilt from every finished cell, the
    GQA ones included) come out byte for byte the same."""
    ref, _, _ = through
    out = tmp_path / "sweep"
    shutil.copytree(ref, out)
    for path in out.glob("cells/*/*/pope.*"):
        path.unlink()
    pope = benchmarks[0]
    cmd = [sys.executable, "-m", "genllava_jax.sweep", f"--checkpoints={workdir}",
           f"--benchmark=pope:{':'.join(pope.files)}", *(_settings_flag(k, s) for k, s in SETTINGS.items()),
           f"--out={out}", f"--batch_size={BATCH}", f"--length_buckets={','.join(map(str, buckets))}"]
    logs = _run_processes(cmd, 2, 2, tmp_path)
    assert "2 cells run, 0 already done, 24 new answers" in logs[0]
    assert "new answers" not in logs[1]  # process 0 alone reports and writes
    assert _answers(out) == _answers(ref)
    for name in ("results.md", "results.csv"):
        assert (out / name).read_text() == (ref / name).read_text()
