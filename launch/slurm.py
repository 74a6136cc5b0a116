"""Multi-node GPU training under SLURM: writes an sbatch script (srun, one process per GPU or per node) and submits it.

    python -m launch.slurm --nodes=2 --gpus-per-node=8 --workdir=/shared/runs/7b \
        --config=configs/genllava_7b.py [--per=gpu|node] [--partition=P] [--account=A] [--time=24:00:00] \
        [--env XLA_FLAGS=...] [--execute] [-- --config.train.steps=1000 ...]

Without --execute (the default, --dry-run) it prints the script and the `sbatch` command and runs nothing. The
script tells every task the coordinator (the job's first node, a port derived from the job id, as JAX itself does),
the process count and this task's index from SLURM_* variables; `genllava_jax.distributed.initialize` reads them
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, and JAX_LOCAL_DEVICE_IDS = the task's GPU when there is
one process per GPU). The repository, its .venv and the workdir must be on a filesystem every node sees.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from genllava_jax import errors

ROOT = Path(__file__).resolve().parent.parent


def sbatch_script(*, nodes: int, gpus_per_node: int, config: str, workdir: str, per: str = "gpu",
                  job_name: str = "genllava", partition: str | None = None, account: str | None = None,
                  time: str | None = None, cpus_per_task: int | None = None, repo: str = str(ROOT),
                  python: str = ".venv/bin/python", env: dict[str, str] | None = None,
                  train_args: list[str] = ()) -> str:
    """The sbatch script's text."""
    if per not in ("gpu", "node"):
        raise errors.BadValue(f"--per={per!r}: expected gpu (one process per GPU) or node (one per node, all its GPUs)")
    if nodes < 1 or gpus_per_node < 1:
        raise errors.BadValue(f"--nodes={nodes} and --gpus-per-node={gpus_per_node} must be at least 1")
    tasks_per_node = gpus_per_node if per == "gpu" else 1
    directives = [f"--job-name={job_name}", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}",
                  f"--gpus-per-node={gpus_per_node}", "--output=%x-%j.out"]
    directives += [f"--{k}={v}" for k, v in (("partition", partition), ("account", account), ("time", time),
                                             ("cpus-per-task", cpus_per_task)) if v]
    train = [python, "-m", "genllava_jax.train", f"--config={config}", f"--workdir={workdir}", *train_args]
    # per task: SLURM_PROCID, SLURM_LOCALID and SLURM_NTASKS exist only inside srun
    task_env = "export JAX_PROCESS_ID=$SLURM_PROCID JAX_NUM_PROCESSES=$SLURM_NTASKS"
    if per == "gpu":
        task_env += " JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID"  # every task sees the node's GPUs and takes its own
    task = f"{task_env}; exec {shlex.join(train)}"
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), "set -euo pipefail", ""]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    lines += [
        "# jax.distributed: process 0 runs on the first node; the port comes from the job id (as JAX picks it), so",
        "# two jobs sharing a node do not collide",
        # sed reads to the end: `head -n 1` may close the pipe first, and pipefail makes scontrol's SIGPIPE exit 141
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
        'export JAX_COORDINATOR_ADDRESS="$head_node:$((61440 + SLURM_JOB_ID % 4096))"',
        f"cd {shlex.quote(repo)}",
        f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(task)}",
        "",
    ]
    return "\n".join(lines)


def parse_env(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise errors.BadValue(f"--env {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    argv, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--per", choices=("gpu", "node"), default="gpu", help="one process per GPU (default) or per node")
    p.add_argument("--config", required=True, help="a configs/*.py file (relative to --repo)")
    p.add_argument("--workdir", required=True, help="checkpoints and logs, on a filesystem every node sees")
    p.add_argument("--job-name", default="genllava")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", help="wall-clock limit, e.g. 24:00:00")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--repo", default=str(ROOT), help="this repository's path on the cluster's shared filesystem")
    p.add_argument("--python", default=".venv/bin/python", help="the interpreter with genllava_jax installed")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="exported for every task")
    p.add_argument("--script", default="genllava.sbatch", help="where --execute writes the script")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the script and the command (the default)")
    mode.add_argument("--execute", action="store_true", help="write the script and submit it with sbatch")
    errors.add_verbose(p)
    a = p.parse_args(argv)
    script = sbatch_script(nodes=a.nodes, gpus_per_node=a.gpus_per_node, config=a.config, workdir=a.workdir,
                           per=a.per, job_name=a.job_name, partition=a.partition, account=a.account, time=a.time,
                           cpus_per_task=a.cpus_per_task, repo=a.repo, python=a.python, env=parse_env(a.env),
                           train_args=train_args)
    command = ["sbatch", a.script]
    if not a.execute:
        print(f"# {a.script} (written by --execute)\n{script}\n# then:\n{shlex.join(command)}")
        return 0
    Path(a.script).write_text(script)
    print(f"wrote {a.script}; {shlex.join(command)}", flush=True)
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(errors.guard(main))
