"""Every test process sees 8 simulated CPU devices; single-device runs use the first one."""

import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# One persistent compilation cache per test session, shared with the subprocesses tests start (CLIs, multi-host):
# the micro model's steps are compiled again by every train.run and restart; a fresh directory keeps each session
# from depending on an earlier one.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="genllava-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# ---------------------------------------------------------------------------------------------------------------
# Fixtures shared by the joint-model tests (the micro model: tests/micro.py)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small synthetic world (96 train, 8 eval records, 16 px) with its tokenizer; one per test module."""
    import micro  # noqa: F401  (marks absl flags parsed: grain reads them)

    from genllava_jax.data import synthetic

    out = tmp_path_factory.mktemp("world")
    synthetic.make_synthetic(out, num_train=96, num_eval=8, image_size=16, num_img_tokens=4)
    return out


@pytest.fixture(scope="module")
def built(data_dir):
    """The micro model, built once (initialisation compiles slowly on CPU); tests take fresh copies."""
    import jax.numpy as jnp
    from flax import nnx
    from micro import micro_config, single_mesh

    from genllava_jax import train

    c = micro_config(data_dir)
    cfg, model, tokenizer, _ = train.build(c, single_mesh())
    graphdef, state = nnx.split(model)
    return c, cfg, tokenizer, lambda: nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
