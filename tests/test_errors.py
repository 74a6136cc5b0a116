"""One error style for user errors in every CLI (genllava_jax.errors): one line naming the flag, key or file and the
fix on stderr, exit status 2, no traceback unless --verbose; a bug keeps its traceback and status 1."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": str(ROOT)}

# A stand-in CLI on errors.run: imports no JAX, so the mechanics are tested in a fraction of a second.
TOY = """
import sys
from absl import flags
from genllava_jax import errors
from ml_collections import config_flags
config_flags.DEFINE_config_file("config", None, "a config file")
flags.DEFINE_integer("n", 1, "a number")
def main(argv):
    if flags.FLAGS.n == 2:
        raise errors.MissingFile("--n=2: the file two.txt does not exist; create it or pass --n=1")
    if flags.FLAGS.n == 3:
        raise KeyError("a bug")
    print("ran", flags.FLAGS.config.steps if flags.FLAGS.config else None)
errors.run(main)
"""


def toy(tmp_path, *args):
    cfg = tmp_path / "c.py"
    cfg.write_text("import ml_collections\n\n\ndef get_config():\n    return ml_collections.ConfigDict("
                   "{'steps': 1})\n")
    (tmp_path / "undefined.py").write_text("def get_config():\n    x = 1\n    return undefined_name\n")
    (tmp_path / "syntax.py").write_text("def get_config(:\n")
    args = [a.replace("CFG", str(cfg)).replace("DIR", str(tmp_path)) for a in args]
    return subprocess.run([sys.executable, "-c", TOY, *args], cwd=tmp_path, capture_output=True, text=True, env=ENV,
                          timeout=120)


def one_line(out, *want):
    """The run exited 2 with one line on stderr: `<prog>: error: ...` holding each of `want`."""
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, (out.returncode, out.stderr[-3000:])
    assert ": error: " in lines[0] and all(w in lines[0] for w in want), (lines[0], want)
    return lines[0]


@pytest.mark.parametrize("args,want", [
    (["--config=CFG", "--config.stpes=3"], ["--config.stpes: no such key", 'Did you mean "steps"']),
    (["--config=CFG", "--config.steps=abc"], ["flag --config.steps=abc", "invalid literal for int()"]),
    (["--config=DIR/nope.py"], ["--config=", "nope.py", "cannot load the config file", "No such file"]),
    (["--config=DIR/undefined.py"], ["undefined.py", "NameError", "undefined_name", "undefined.py:3"]),
    (["--config=DIR/syntax.py"], ["syntax.py", "SyntaxError", "syntax.py:1"]),
    (["--config=CFG", "--n=x"], ["--n", "x"]),
    (["--config=CFG", "--nn=1"], ["--nn"]),
    (["--config=CFG", "--n=2"], ["--n=2: the file two.txt does not exist; create it or pass --n=1"]),
])
def test_user_errors_are_one_line_and_status_2(tmp_path, args, want):
    line = one_line(toy(tmp_path, *args), *want)
    verbose = toy(tmp_path, *args, "--verbose")
    assert verbose.returncode == 2 and "Traceback (most recent call last)" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1] == line


def test_bugs_keep_their_traceback_and_good_runs_are_untouched(tmp_path):
    bug = toy(tmp_path, "--config=CFG", "--n=3")
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "KeyError: 'a bug'" in bug.stderr
    ok = toy(tmp_path, "--config=CFG", "--config.steps=7")
    assert ok.returncode == 0 and ok.stdout == "ran 7\n" and not ok.stderr


# Each real CLI, with one mistake a user makes (they fail before any model is built: a few seconds each).
CASES = {
    "train": (["-m", "genllava_jax.train", "--config=configs/tiny.py", "--workdir=DIR/w", "--config.train.stepz=3"],
              ["--config.train.stepz: no such key", 'Did you mean "steps"']),
    "train data": (["-m", "genllava_jax.train", "--config=configs/tiny.py", "--workdir=DIR/w",
                    "--config.data.tokenizer=DIR/tok"], ["DIR/tok", "does not exist"]),
    "convert": (["-m", "convert", "mistral", "--from-hf", "DIR/hf", "--out", "DIR/o"], ["--from-hf DIR/hf: no such"]),
    "aot": (["-m", "launch.aot", "--config=configs/tiny.py", "--topology=v9x-8"], ["--topology='v9x-8'", "use one"]),
    "sweep": (["-m", "genllava_jax.sweep", "--checkpoints=DIR", "--benchmark=gqa:DIR/q.jsonl:DIR/img:DIR/a.json",
               "--out=DIR/s"], ["--benchmark=gqa:", "q.jsonl", "does not exist"]),
    "generate": ([str(Path(sys.executable).parent / "genllava-generate"), "--workdir=DIR", "--prompt=x"],
                 ["DIR: no config.json; pass the --workdir of a training run"]),
    "arrayrecord": (["-m", "genllava_jax.data.arrayrecord", "--src=DIR/d.jsonl", "--out=DIR/d.arrayrecord"],
                    ["DIR/d.jsonl", "does not exist"]),
    "slurm": (["-m", "launch.slurm", "--nodes=0", "--gpus-per-node=1", "--repo=DIR", "--config=c", "--workdir=w"],
              ["--nodes=0", "must be at least 1"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_cli_reports_a_user_error_in_one_line(tmp_path, name):
    args, want = CASES[name]
    args = [a.replace("DIR", str(tmp_path)) for a in args]
    cmd = args if args[0].startswith("/") else [sys.executable, *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300)
    one_line(out, *[w.replace("DIR", str(tmp_path)) for w in want])
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing was written
