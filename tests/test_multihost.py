"""Multi-host: 2 local processes × 2 CPU devices (gloo) train, checkpoint, restart from the checkpoint, and give the
losses of 1 process × 4 devices; and how `distributed.initialize` reads flags and the environment.

Data: each process reads only its shard of the records (`[process_index::process_count]`, then its own seeded
shuffle), so a 2-process global batch is [process 0's rows; process 1's rows], which is not what a 1-process
`make_dataset` would read. The 1-process reference is fed exactly those rows (the two shards' batches concatenated,
as `jax.make_array_from_process_local_data` lays them out); equal losses then show that every host fed its own
rows into the right place of the global batch.

    python tests/test_multihost.py train WORLD_DIR WORKDIR [STOP_AFTER]   # one worker; the tests start two
    python tests/test_multihost.py orbax CHECKPOINT_DIR
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from micro import FAST_COMPILE, fast_compile, logged_losses, metric_rows, micro_config

from genllava_jax import distributed, sharding as shd, train
from genllava_jax.data.pipeline import make_dataset

ROOT = Path(__file__).resolve().parent.parent
NUM_PROCESSES, LOCAL_DEVICES = 2, 2


def config(world):
    c = micro_config(Path(world))
    # fsdp spans the two processes (devices are ordered by process): each host holds, saves and restores only its
    # halves of the parameters; tensor stays inside a host
    c.mesh = dict(data=1, fsdp=2, tensor=2)
    return c


# ---------------------------------------------------------------------------------------------------------------
# flags and environment -> jax.distributed.initialize arguments


def test_plan_explicit_settings_from_the_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.plan(env=env) == {"coordinator_address": "10.0.0.2:8476", "num_processes": 4, "process_id": 3,
                                         "cluster_detection_method": "deactivate"}
    # flags win over the environment
    assert distributed.plan(process_id=1, env=env)["process_id"] == 1
    assert distributed.plan(env={**env, "JAX_NUM_PROCESSES": "1"}) is None  # one process: a no-op
    with pytest.raises(ValueError, match=r"missing \['process_id'\]"):
        distributed.plan(env={k: v for k, v in env.items() if k != "JAX_PROCESS_ID"})
    with pytest.raises(ValueError, match="process_id=4 is not in"):
        distributed.plan(env={**env, "JAX_PROCESS_ID": "4"})
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
        distributed.plan(env={**env, "JAX_NUM_PROCESSES": "two"})


def test_plan_lets_jax_detect_clusters_of_more_than_one_process():
    slurm = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "16", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
             "SLURM_STEP_NODELIST": "gpu[001-002]"}
    assert distributed.plan(env=slurm) == {}  # {}: jax.distributed.initialize() with no arguments
    assert distributed.plan(env={**slurm, "SLURM_NTASKS": "1"}) is None  # an interactive single-task job
    assert distributed.plan(env={"OMPI_COMM_WORLD_SIZE": "8"}) == {}
    assert distributed.plan(env={"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}) == {}
    assert distributed.plan(env={"TPU_WORKER_HOSTNAMES": "t-0"}) is None
    assert distributed.plan(env={}) is None
    assert distributed.plan("cluster", env={}) == {}  # GCE TPU pod slices: JAX asks the metadata server
    assert distributed.plan("off", env=slurm) is None


def test_initialize_is_a_no_op_for_one_process(monkeypatch):
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
                "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.initialize() is False and not jax.distributed.is_initialized()
    assert distributed.initialize(num_processes=1, coordinator_address="localhost:1", process_id=0) is False


# ---------------------------------------------------------------------------------------------------------------
# 2 processes × 2 devices vs 1 process × 4 devices


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Workers:
    """NUM_PROCESSES worker processes of one job, started at once; `wait()` returns their logs or raises with the
    tail of each."""

    def __init__(self, args: list, logs: Path, tag: str):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES} {FAST_COMPILE}",
               "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}",
               "JAX_NUM_PROCESSES": str(NUM_PROCESSES), "PYTHONPATH": str(ROOT),
               # the restarted job reuses the first one's compilations (they take most of the time on this CPU)
               "JAX_COMPILATION_CACHE_DIR": str(logs / "jax_cache"),
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
        cmd = [sys.executable, __file__, *map(str, args)]
        self.procs, self.paths = [], [logs / f"{tag}_process{i}.log" for i in range(NUM_PROCESSES)]
        for i, path in enumerate(self.paths):
            with path.open("w") as log:
                self.procs.append(subprocess.Popen(cmd, env={**env, "JAX_PROCESS_ID": str(i)}, stdout=log,
                                                   stderr=subprocess.STDOUT, cwd=ROOT))

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def wait(self, timeout=900) -> list[str]:
        deadline = time.time() + timeout
        try:
            while any(p.poll() is None for p in self.procs) and time.time() < deadline:
                if any(p.returncode not in (None, 0) for p in self.procs):
                    break  # one failed: the other would wait for it until the timeout
                time.sleep(0.5)
        finally:
            self.kill()
        texts = [path.read_text() for path in self.paths]
        if any(p.returncode != 0 for p in self.procs):
            tails = "\n".join(f"--- process {i} (exit {p.returncode}):\n{t[-3000:]}"
                              for i, (p, t) in enumerate(zip(self.procs, texts)))
            raise AssertionError(f"multi-host workers failed or timed out ({timeout} s):\n{tails}")
        return texts


def reference_losses(world, steps: int) -> list[float]:
    """1 process × 4 devices, the same mesh shape, fed [shard 0's batch; shard 1's batch] at every step."""
    c = config(world)
    mesh = shd.make_mesh(dict(c.mesh), jax.devices()[:NUM_PROCESSES * LOCAL_DEVICES])
    _, model, tokenizer, _ = train.build(c, mesh)
    state, s = train.setup(model, c.train, mesh, c.seed)
    shards = [make_dataset(c.data, tokenizer, global_batch=c.train.batch_size, seed=c.seed, process_index=i,
                           process_count=NUM_PROCESSES)[0] for i in range(NUM_PROCESSES)]
    step_fn, losses = train.jit_train_step(s, c.train.accum), []
    with jax.set_mesh(mesh):
        for _ in range(steps):
            parts = [next(it) for it in shards]
            batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            state, metrics = step_fn(state, s.frozen, train.to_global(batch, s))
            losses.append(float(metrics["loss"]))
    return losses


@pytest.mark.slow
@fast_compile()  # the reference, compiled as the workers' programs are
def test_two_processes_checkpoint_restart_and_match_one_process(data_dir, tmp_path):
    workdir = tmp_path / "run"
    job = Workers(["train", data_dir, workdir, 3], tmp_path, "first")  # stops after the step-3 checkpoint
    try:
        reference = reference_losses(data_dir, 6)  # meanwhile: compiling takes most of the time here
    except BaseException:
        job.kill()
        raise
    first = job.wait()
    assert len(logged_losses(workdir)) == 3
    second = Workers(["train", data_dir, workdir], tmp_path, "second").wait()  # a fresh 2-process job resumes
    assert "resumed from step 3" in second[0]
    ckpt = workdir / "checkpoints" / "6"
    assert {p.name for p in (ckpt / "data").iterdir()} >= {"process_0-of-2.json", "process_1-of-2.json"}

    losses = logged_losses(workdir)
    # process 0 alone logs: one row a step, not one per process
    assert [r["step"] for r in metric_rows(workdir) if "loss" in r] == list(range(1, 7))
    assert not any(" loss " in line for log in (first[1], second[1]) for line in log.splitlines())
    np.testing.assert_allclose(losses, reference, rtol=1e-5, atol=1e-5)
    assert [r["step"] for r in metric_rows(workdir) if "eval/ce" in r] == [3, 6]
    assert {p.name for p in (workdir / "samples").iterdir()} == {"step_0000003.png", "step_0000006.png"}


@pytest.mark.slow
def test_orbax_round_trip_across_processes_that_arrive_far_apart(tmp_path):
    """An fsdp-sharded array saved and restored by 2 processes, one reaching the CheckpointManager 35 s after the
    other (unequal compiles on a busy host do that): a gloo-collective barrier would time out after 30 s."""
    logs = Workers(["orbax", tmp_path / "ckpt"], tmp_path, "orbax").wait(timeout=300)
    assert all(f"restored {np.arange(24.0).sum()}" in log for log in logs)


def _train_worker(world, workdir, stop_after=None):
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py does for the reference
    c = config(world)
    # eval losses and sample grids of a model that spans both hosts: every process must take part in each
    c.data.eval_path = str(Path(world) / "eval.jsonl")
    c.train.update(eval_every=3, eval_batches=2, sample_every=3)
    c.sample.num_steps = 2
    train.run(c, workdir, stop_after=None if stop_after is None else int(stop_after))


def _orbax_worker(directory):
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding, PartitionSpec as P

    sharding = NamedSharding(jax.make_mesh((4,), ("fsdp",), devices=jax.devices()), P("fsdp"))
    x = jax.make_array_from_callback((8, 3), sharding, lambda index: np.arange(24.0).reshape(8, 3)[index])
    if jax.process_index() == 1:
        time.sleep(35)
    mngr = ocp.CheckpointManager(Path(directory), options=ocp.CheckpointManagerOptions(create=True))
    mngr.save(1, args=ocp.args.StandardSave({"x": x}))
    mngr.wait_until_finished()
    target = {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)}
    y = mngr.restore(1, args=ocp.args.StandardRestore(target))["x"]
    assert y.sharding == sharding and len(y.addressable_shards) == LOCAL_DEVICES
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(sharding.mesh, P()))(y)
    print(f"restored {float(total)}", flush=True)
    mngr.close()


if __name__ == "__main__":
    distributed.initialize()  # JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID from the test
    assert jax.process_count() == NUM_PROCESSES and jax.local_device_count() == LOCAL_DEVICES, jax.devices()
    {"train": _train_worker, "orbax": _orbax_worker}[sys.argv[1]](*sys.argv[2:])
