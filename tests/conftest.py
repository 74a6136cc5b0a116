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
def trained_workdir(data_dir, tmp_path_factory):
    """The micro model after a two-step training run (its checkpoint at step 2), for the CLI and server tests."""
    from micro import micro_config, single_mesh

    from genllava_jax import train

    c = micro_config(data_dir)
    c.train.update(steps=2, checkpoint_every=2)
    out = tmp_path_factory.mktemp("run")
    train.run(c, out, mesh=single_mesh())
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


# ---------------------------------------------------------------------------------------------------------------
# Bad data (tests/test_reliability.py, tests/test_bad_input.py)


@pytest.fixture(scope="module")
def tok(data_dir):
    from genllava_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(data_dir / "tokenizer", 4)


@pytest.fixture(scope="module")
def root(data_dir, tmp_path_factory):
    """A data root full of bad images (and a few good ones in odd modes), plus files and links outside it."""
    import numpy as np
    from PIL import Image

    top = tmp_path_factory.mktemp("bad_data")
    root = top / "data"
    root.mkdir()
    good = next((data_dir / "images").iterdir())
    png = good.read_bytes()
    (root / "good.png").write_bytes(png)
    (top / "outside.png").write_bytes(png)
    (root / "truncated.png").write_bytes(png[:len(png) // 2])
    (root / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "folder.png").mkdir()
    os.mkfifo(root / "fifo.png")  # opening it would block forever
    (root / "bomb.png").write_bytes(png_with_size(png, 100_000, 100_000))  # PIL's own ceiling
    (root / "big.png").write_bytes(png_with_size(png, 2000, 2000))  # over data.max_image_pixels below
    (root / "link_out.png").symlink_to(top / "outside.png")
    (root / "link_in.png").symlink_to(root / "good.png")
    rgb = np.asarray(Image.open(good).convert("RGB"))
    for mode, fmt in (("1", "png"), ("L", "png"), ("LA", "png"), ("P", "png"), ("RGBA", "png"), ("I;16", "png"),
                      ("CMYK", "tiff"), ("I", "tiff"), ("F", "tiff"), ("YCbCr", "tiff")):
        source = Image.fromarray(rgb[..., 0] if mode in ("I;16", "I", "F") else rgb)  # grey for the integer modes
        # LZW: Pillow cannot read back its own uncompressed YCbCr TIFF ("image file is truncated")
        kw = {"compression": "tiff_lzw"} if fmt == "tiff" else {}
        source.convert(mode).save(root / f"mode_{mode.replace(';', '_')}.{fmt}", **kw)
    return root


def png_with_size(png: bytes, width: int, height: int) -> bytes:
    """The PNG with its header claiming another size (the IHDR chunk and its CRC rewritten)."""
    import zlib

    ihdr = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + png[24:29]
    return png[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + png[33:]
