"""Training on a Cloud TPU pod slice: create the TPU VM, copy this repository to every worker, install, run the
train command on all workers at once, tear down.

    python -m launch.tpu_pod --name=genllava --zone=us-east5-a --accelerator-type=v5p-32 \
        --version=v2-alpha-tpuv5 --config=configs/genllava_7b.py --workdir='~/bucket/runs/7b' --bucket=my-bucket \
        [--project=P] [--spot] [--env KEY=VALUE] [--libtpu-preset=async_collectives] [--keep] [--execute] \
        [-- --config.train.steps=1000 ...]

Without --execute (the default, --dry-run) it prints the commands and runs nothing. With --execute it runs them in
order and, unless --keep, deletes the TPU VM at the end even if a step failed. Each worker runs the same command;
`--distributed=cluster` makes `genllava_jax.distributed.initialize` call `jax.distributed.initialize()`, which
finds the coordinator (worker 0), the process count and this worker's index from the TPU VM's metadata server.
What is copied is `git archive HEAD` (committed files only). The workdir and the config's data must be on storage
every worker sees: `--bucket` mounts a Cloud Storage bucket with gcsfuse at ~/bucket on every worker.
`--libtpu-preset` (repeatable) exports LIBTPU_INIT_ARGS from the named sets of XLA:TPU flags below.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from genllava_jax import errors

ROOT = Path(__file__).resolve().parent.parent

# LIBTPU_INIT_ARGS presets: MaxText's flag sets, under its names where it has one (benchmarks/xla_flags_library.py;
# the flags are described in MaxText's docs, "List of XLA compiler flags"). libtpu exits on a flag it does not
# know; tests/test_launch.py compiles with every preset's flags through the libtpu this project pins.
_CF = ("--xla_tpu_enable_async_collective_fusion=true", "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
       "--xla_tpu_overlap_compute_collective_tc=true")
LIBTPU_PRESETS = {
    # continuation fusion: FSDP's weight all-gathers run asynchronously inside the compute scheduled between their
    # start and done (MaxText: CF_FOR_ALL_GATHER)
    "async_all_gather": _CF + ("--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
                               "--xla_enable_async_all_gather=true"),
    # the same for all-reduces (MaxText: CF_FOR_ALL_REDUCE)
    "async_all_reduce": _CF + ("--xla_tpu_enable_async_collective_fusion_fuse_all_reduce=true",
                               "--xla_enable_async_all_reduce=true"),
    # both (MaxText: CF_FOR_ALL_REDUCE_AND_ALL_GATHER): the preset for fsdp meshes
    "async_collectives": _CF + ("--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
                                "--xla_enable_async_all_gather=true", "--xla_enable_async_all_reduce=true"),
    # data parallelism across slices (DCN): pipeline the gradient all-reduce with the step (DATA_PARALLEL_OVERLAP)
    "data_parallel_overlap": ("--xla_tpu_enable_data_parallel_all_reduce_opt=true",
                              "--xla_tpu_data_parallel_opt_different_sized_ops=true"),
    # MaxText's dense-LLM recipes: 96 MiB of scoped VMEM for fusions and kernels (DENSE_VMEM_LIMIT_FLAG)
    "dense_vmem": ("--xla_tpu_scoped_vmem_limit_kib=98304",),
    # remat policies that offload activations to host memory: overlap the transfers (HOST_OFFLOAD_FLAGS)
    "host_offload": ("--xla_tpu_enable_all_experimental_scheduler_features=true",
                     "--xla_tpu_enable_scheduler_memory_pressure_tracking=true",
                     "--xla_tpu_host_transfer_overlap_limit=24", "--xla_tpu_aggressive_opt_barrier_removal=ENABLED",
                     "--xla_lhs_prioritize_async_depth_over_stall=ENABLED",
                     "--xla_tpu_enable_ag_backward_pipelining=true",
                     "--xla_should_allow_loop_variant_parameter_in_chain=ENABLED",
                     "--xla_should_add_loop_invariant_op_in_chain=ENABLED", "--xla_max_concurrent_host_send_recv=100",
                     "--xla_tpu_scheduler_percent_shared_memory_limit=100", "--xla_latency_hiding_scheduler_rerun=2"),
}


def libtpu_init_args(presets: list[str], given: str = "") -> str:
    """LIBTPU_INIT_ARGS of the presets (each flag once, in order) followed by `given`; a flag two presets set to
    different values is an error."""
    flags: dict[str, str] = {}
    for name in presets:
        if name not in LIBTPU_PRESETS:
            raise errors.BadValue(f"--libtpu-preset={name!r}: choose from {sorted(LIBTPU_PRESETS)}")
        for flag in LIBTPU_PRESETS[name]:
            key = flag.partition("=")[0]
            if flags.setdefault(key, flag) != flag:
                raise errors.BadValue(f"--libtpu-preset: {flags[key]} and {flag} disagree")
    return " ".join(list(flags.values()) + ([given] if given else []))
ARCHIVE = "genllava_jax.tar.gz"
REMOTE_DIR = "~/genllava_jax"  # expanded by the worker's shell


def _remote_arg(arg: str) -> str:
    """Quoted for the worker's shell; a value under ~/ becomes "$HOME"/..., which that shell expands (a shell leaves
    ~ after "--flag=" alone, and the train CLI does not expand it either)."""
    key, eq, value = arg.partition("=")
    if eq and value.startswith("~/"):
        return shlex.quote(key + "=") + '"$HOME"' + shlex.quote(value[1:])
    return shlex.quote(arg)


def commands(*, name: str, zone: str, accelerator_type: str, version: str, config: str, workdir: str,
             project: str | None = None, spot: bool = False, bucket: str | None = None,
             env: dict[str, str] | None = None, train_args: list[str] = (), keep: bool = False,
             archive_dir: str = "/tmp") -> list[list[str]]:
    """Every command, in order, as argv lists, to run from the repository's root; the last is the tear-down unless
    `keep`."""
    where = [f"--zone={zone}"] + ([f"--project={project}"] if project else [])
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    archive = f"{archive_dir}/{ARCHIVE}"

    def on_all(command: str) -> list[str]:
        return tpu + ["ssh", name, "--worker=all", *where, f"--command={command}"]

    install = (f"set -e; mkdir -p {REMOTE_DIR} && tar -xzf ~/{ARCHIVE} -C {REMOTE_DIR} && cd {REMOTE_DIR} && "
               'python3 -m pip install -q -e ".[tpu]"')
    if bucket:
        install += (f" && mkdir -p ~/bucket && (mountpoint -q ~/bucket || "
                    f"gcsfuse --implicit-dirs {shlex.quote(bucket)} ~/bucket)")
    exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in (env or {}).items())
    train = ["python3", "-m", "genllava_jax.train", "--distributed=cluster", f"--config={config}",
             f"--workdir={workdir}", *train_args]
    run = f"cd {REMOTE_DIR} && {exports}" + " ".join(map(_remote_arg, train))
    out = [
        ["git", "archive", "--format=tar.gz", f"--output={archive}", "HEAD"],
        tpu + ["create", name, *where, f"--accelerator-type={accelerator_type}", f"--version={version}"]
        + (["--spot"] if spot else []),
        tpu + ["scp", archive, f"{name}:~/{ARCHIVE}", "--worker=all", *where],
        on_all(install),
        on_all(run),
    ]
    if not keep:
        out.append(tpu + ["delete", name, *where, "--quiet"])
    return out


def execute(cmds: list[list[str]], keep: bool) -> int:
    """Runs the commands in order, stopping at the first failure. The tear-down (last) runs whatever happened
    later, but only once `create` succeeded: a VM of that name that existed before is never deleted."""
    body, teardown = (cmds, None) if keep else (cmds[:-1], cmds[-1])
    code, created = 0, False
    try:
        for cmd in body:
            print(f"+ {shlex.join(cmd)}", flush=True)
            code = subprocess.run(cmd, cwd=ROOT).returncode
            if code:
                print(f"failed (exit {code}): {shlex.join(cmd)}", file=sys.stderr, flush=True)
                break
            created = created or cmd[4:5] == ["create"]
    finally:
        if teardown is not None and created:
            print(f"+ {shlex.join(teardown)}", flush=True)
            down = subprocess.run(teardown, cwd=ROOT).returncode
            code = code or down
    return code


def main(argv=None) -> int:
    from .slurm import parse_env

    argv = sys.argv[1:] if argv is None else argv
    argv, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m launch.tpu_pod", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="the TPU VM's name")
    p.add_argument("--zone", required=True)
    p.add_argument("--accelerator-type", required=True, help="e.g. v5p-32, v5litepod-16, v4-8")
    p.add_argument("--version", required=True, help="the TPU VM software version, e.g. v2-alpha-tpuv5")
    p.add_argument("--config", required=True, help="a configs/*.py file (relative to the repository)")
    p.add_argument("--workdir", required=True, help="checkpoints and logs, on storage every worker sees")
    p.add_argument("--project")
    p.add_argument("--spot", action="store_true", help="a Spot TPU VM (preemptible, cheaper)")
    p.add_argument("--bucket", help="a Cloud Storage bucket to mount at ~/bucket on every worker (gcsfuse)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="exported for the train command")
    p.add_argument("--libtpu-preset", action="append", default=[], choices=sorted(LIBTPU_PRESETS),
                   help="export LIBTPU_INIT_ARGS with these XLA:TPU flag sets (repeatable; before any given by --env)")
    p.add_argument("--keep", action="store_true", help="do not delete the TPU VM at the end")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the commands (the default)")
    mode.add_argument("--execute", action="store_true", help="run them")
    errors.add_verbose(p)
    a = p.parse_args(argv)
    env = parse_env(a.env)
    if a.libtpu_preset:
        env["LIBTPU_INIT_ARGS"] = libtpu_init_args(a.libtpu_preset, env.get("LIBTPU_INIT_ARGS", ""))
    cmds = commands(name=a.name, zone=a.zone, accelerator_type=a.accelerator_type, version=a.version,
                    config=a.config, workdir=a.workdir, project=a.project, spot=a.spot, bucket=a.bucket,
                    env=env, train_args=train_args, keep=a.keep)
    if not a.execute:
        print("\n".join(shlex.join(c) for c in cmds))
        return 0
    return execute(cmds, a.keep)


if __name__ == "__main__":
    sys.exit(errors.guard(main))
