"""Launchers: the dry-runs print exactly the commands README.md documents; --execute runs them in order (with fake
gcloud/git/sbatch on PATH) and tears the TPU VM down after a failure; the sbatch script, run under a fake srun, gives
every task the jax.distributed settings `distributed.plan` turns into an explicit start-up."""

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from genllava_jax import distributed
from launch import slurm, tpu_pod

ROOT = Path(__file__).resolve().parent.parent


def documented(title: str) -> tuple[list[str], str]:
    """(the command's argv, its documented output) from README's `title` section: the first ``` block is the
    command (a `$ python -m launch...` line with \\ continuations), the next one its output."""
    text = (ROOT / "README.md").read_text()
    start = text.index(title)
    blocks = re.findall(r"```\n(.*?)```", text[start:], re.S)
    command = blocks[0].replace("\\\n", " ").strip()
    assert command.startswith("$ python -m launch."), command
    return shlex.split(command[2:])[3:], blocks[1]


def cli(module: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, capture_output=True, text=True, **kw)


def test_tpu_pod_dry_run_prints_the_documented_commands():
    argv, output = documented("### A TPU pod")
    run = cli("launch.tpu_pod", argv)
    assert run.returncode == 0, run.stderr
    assert run.stdout == output
    assert cli("launch.tpu_pod", ["--dry-run"] + argv).stdout == output  # --dry-run is the default


def test_slurm_dry_run_prints_the_documented_script():
    argv, output = documented("### A SLURM cluster")
    run = cli("launch.slurm", argv)
    assert run.returncode == 0, run.stderr
    assert run.stdout == output


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_bin(tmp_path, monkeypatch):
    """A PATH whose gcloud/git/sbatch log their arguments (one line each) to calls.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for name in ("gcloud", "git", "sbatch"):
        # a command whose arguments contain $FAIL_ON fails
        _fake(bin_dir, name, f'echo "{name} $*" >> {log}\n'
                             '[[ -n "$FAIL_ON" && "$*" == *"$FAIL_ON"* ]] && exit 3\nexit 0\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("FAIL_ON", raising=False)
    return log


TPU_ARGS = ["--name=t1", "--zone=z1", "--accelerator-type=v5p-16", "--version=v2-alpha-tpuv5",
            "--config=configs/tiny.py", "--workdir=/mnt/shared/run", "--execute"]


def test_tpu_pod_execute_runs_every_step_in_order(fake_bin):
    assert tpu_pod.main(TPU_ARGS + ["--", "--config.train.steps=5"]) == 0
    calls = fake_bin.read_text().splitlines()
    assert [c.split()[:5] for c in calls] == [
        ["git", "archive", "--format=tar.gz", "--output=/tmp/genllava_jax.tar.gz", "HEAD"],
        ["gcloud", "compute", "tpus", "tpu-vm", "create"], ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
        ["gcloud", "compute", "tpus", "tpu-vm", "delete"]]
    assert calls[4].endswith("--distributed=cluster --config=configs/tiny.py --workdir=/mnt/shared/run "
                             "--config.train.steps=5")


def test_tpu_pod_tears_down_after_a_failed_run_but_never_a_vm_it_did_not_create(fake_bin, monkeypatch):
    monkeypatch.setenv("FAIL_ON", "genllava_jax.train")
    assert tpu_pod.main(TPU_ARGS) == 3
    calls = fake_bin.read_text().splitlines()
    assert "genllava_jax.train" in calls[-2] and calls[-1].startswith("gcloud compute tpus tpu-vm delete t1")
    fake_bin.unlink()
    monkeypatch.setenv("FAIL_ON", "create")  # e.g. the name is taken: that VM is someone else's
    assert tpu_pod.main(TPU_ARGS) == 3
    assert not any(" delete " in c for c in fake_bin.read_text().splitlines())
    fake_bin.unlink()
    monkeypatch.delenv("FAIL_ON")
    assert tpu_pod.main(TPU_ARGS + ["--keep"]) == 0
    assert not any(" delete " in c for c in fake_bin.read_text().splitlines())


def test_slurm_execute_writes_the_script_and_submits_it(fake_bin, tmp_path):
    script = tmp_path / "job.sbatch"
    assert slurm.main(["--nodes=1", "--gpus-per-node=2", "--config=c.py", "--workdir=w", f"--script={script}",
                       "--execute"]) == 0
    assert fake_bin.read_text() == f"sbatch {script}\n"
    assert "#SBATCH --ntasks-per-node=2" in script.read_text()


@pytest.mark.parametrize("per", ["gpu", "node"])
def test_sbatch_script_gives_each_task_its_jax_distributed_settings(tmp_path, per):
    """Runs the generated script with fake scontrol/srun (2 nodes × 2 GPUs) and a fake python recording what each
    task sees; `distributed.plan` must turn that into an explicit, detection-free jax.distributed start-up."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir, "scontrol", 'printf "gpu-a17\\ngpu-a18\\n"\n')
    # srun: NODES × TASKS_PER_NODE tasks, one after another, each with the variables SLURM gives a task
    _fake(bin_dir, "srun", 'shift\nn=$((NODES * TASKS_PER_NODE))\nfor ((i = 0; i < n; i++)); do\n'
                           '  SLURM_PROCID=$i SLURM_LOCALID=$((i % TASKS_PER_NODE)) SLURM_NTASKS=$n "$@" || exit\n'
                           'done\n')
    record = tmp_path / "tasks.jsonl"
    fake_python = tmp_path / "python"
    fake_python.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                           f"with open({str(record)!r}, 'a') as f:\n"
                           "    f.write(json.dumps({'argv': sys.argv[1:], 'env': {k: v for k, v in os.environ.items()"
                           " if k.startswith(('JAX_', 'XLA_'))}}) + '\\n')\n")
    fake_python.chmod(0o755)
    text = slurm.sbatch_script(nodes=2, gpus_per_node=2, per=per, config="configs/genllava_7b.py",
                               workdir="/shared/run", repo=str(tmp_path), python=str(fake_python),
                               env={"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true"},
                               train_args=["--config.train.steps=10"])
    (tmp_path / "job.sbatch").write_text(text)
    tasks_per_node = 2 if per == "gpu" else 1
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "gpu-a[17-18]", "NODES": "2", "TASKS_PER_NODE": str(tasks_per_node)}
    run = subprocess.run(["bash", str(tmp_path / "job.sbatch")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    tasks = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(tasks) == 2 * tasks_per_node
    port = 61440 + 123456 % 4096
    for i, task in enumerate(tasks):
        assert task["argv"] == ["-m", "genllava_jax.train", "--config=configs/genllava_7b.py",
                                "--workdir=/shared/run", "--config.train.steps=10"]
        e = task["env"]
        assert e["XLA_FLAGS"] == "--xla_gpu_enable_latency_hiding_scheduler=true"
        assert e.get("JAX_LOCAL_DEVICE_IDS") == (str(i % 2) if per == "gpu" else None)
        assert distributed.plan(env=e) == {"coordinator_address": f"gpu-a17:{port}", "num_processes": len(tasks),
                                           "process_id": i, "cluster_detection_method": "deactivate"}


def test_launchers_reject_bad_arguments():
    with pytest.raises(ValueError, match="--per='socket'"):
        slurm.sbatch_script(nodes=1, gpus_per_node=1, per="socket", config="c", workdir="w")
    with pytest.raises(ValueError, match="--env 'XLA_FLAGS'"):
        slurm.parse_env(["XLA_FLAGS"])


def test_libtpu_presets_export_their_flags_once_before_any_given():
    argv = ["--name=n", "--zone=z", "--accelerator-type=v5p-8", "--version=v", "--config=c", "--workdir=w",
            "--libtpu-preset=async_collectives", "--libtpu-preset=dense_vmem",
            "--env", "LIBTPU_INIT_ARGS=--xla_tpu_extra=1"]
    run = cli("launch.tpu_pod", argv)
    assert run.returncode == 0, run.stderr
    want = " ".join(tpu_pod.LIBTPU_PRESETS["async_collectives"] + tpu_pod.LIBTPU_PRESETS["dense_vmem"]) \
        + " --xla_tpu_extra=1"
    assert f"export LIBTPU_INIT_ARGS={shlex.quote(want)}; " in shlex.split(run.stdout.splitlines()[4])[-1]
    both = tpu_pod.libtpu_init_args(["async_all_gather", "async_collectives"])
    assert len(both.split()) == len(set(both.split())) == len(tpu_pod.LIBTPU_PRESETS["async_collectives"])
    with pytest.raises(ValueError, match="choose from"):
        tpu_pod.libtpu_init_args(["fast"])


PROBE = """
import os
os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
import jax, jax.numpy as jnp
from launch import aot
mesh = jax.sharding.Mesh(aot.target_devices("v5p-8"), ("x",))
sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
a = jax.ShapeDtypeStruct((512, 512), jnp.bfloat16, sharding=sh)
jax.jit(lambda x, y: x @ y.T).lower(a, a).compile()
print("compiled")
"""


@pytest.mark.slow
def test_libtpu_accepts_every_presets_flags():
    """libtpu exits on an unknown flag ('Unknown command line flag'); every preset's flags, all at once, compile a
    sharded matmul for a v5p-8 through the pinned libtpu (a made-up flag does not)."""
    def compile_with(args):
        env = {**os.environ, "LIBTPU_INIT_ARGS": args, "PYTHONPATH": str(ROOT)}
        return subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True)

    every = " ".join(dict.fromkeys(f for flags in tpu_pod.LIBTPU_PRESETS.values() for f in flags))
    ok = compile_with(every)
    assert ok.returncode == 0 and "compiled" in ok.stdout, ok.stderr[-2000:]
    bad = compile_with("--xla_tpu_made_up_flag=true")
    assert bad.returncode != 0 and "Unknown command line flag 'xla_tpu_made_up_flag'" in bad.stderr
