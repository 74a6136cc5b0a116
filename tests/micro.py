"""The micro GenLLaVA that the joint tests share (configs/tiny.py shrunk further, so the joint step compiles in
seconds), and helpers around it. Its fixtures (`data_dir`, `built`) are in conftest.py."""

import contextlib
import importlib.util
import json
from pathlib import Path

import jax
from absl import flags

from genllava_jax import sharding as shd
from genllava_jax.data.pipeline import make_dataset

ROOT = Path(__file__).resolve().parent.parent
flags.FLAGS.mark_as_parsed()  # grain reads absl flags

# XLA's CPU backend without LLVM's optimisations compiles the micro model's train step in 11.5 s instead of 20 s and
# runs it as fast (matmuls and convolutions are library calls either way); losses move in the 7th digit, so every
# run a test compares bit for bit is compiled alike. For the subprocesses tests start (XLA_FLAGS); in-process:
# `fast_compile`.
FAST_COMPILE = "--xla_backend_optimization_level=0"


@contextlib.contextmanager
def fast_compile():
    """FAST_COMPILE for the compiles inside (CPU only: not for TPU AOT compiles). JAX's in-memory caches are cleared
    on the way out: what was compiled inside is not reused by a test that compares against a default compile."""
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", False)
        jax.clear_caches()


def load_config_file(name: str):
    """`get_config()` of configs/<name>.py, loaded by path as the train CLI does."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def micro_config(data_dir):
    """configs/tiny.py shrunk further so that the joint step compiles in seconds."""
    c = load_config_file("tiny")
    c.data.update(path=str(data_dir / "train.jsonl"), tokenizer=str(data_dir / "tokenizer"), max_len=40,
                  image_size=16, num_patches=4, target_image_size=16, num_img_tokens=4, read_threads=1)
    m = c.model
    m.vision.update(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, image_size=16, patch_size=8)
    m.projector.update(vision_size=16, text_size=32)
    m.llm.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    m.head.update(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, encoder_hidden_size=32,
                  llm_hidden_size=32, num_query_tokens=4, out_dim=16)
    m.unet.update(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16, heads=(2, 2))
    m.vae.update(block_out_channels=(8, 8), norm_num_groups=4, sample_size=16)
    m.diffusion_rows = 0
    c.train.update(steps=6, batch_size=8, lr=3e-3, log_every=1, checkpoint_every=3, warmup_frac=0.2)
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    return c


def single_mesh():
    return shd.make_mesh({"data": 1}, jax.devices()[:1])


def fixed_batch(c, tokenizer, n=8):
    it, _ = make_dataset(c.data, tokenizer, global_batch=n, seed=0)
    return next(it)


def metric_rows(workdir):
    """The rows of a training run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def logged_losses(workdir):
    return [r["loss"] for r in metric_rows(workdir) if "loss" in r]


def tiny_sd_pipeline(tmp):
    """(diffusers StableDiffusionPipeline, the folder it is saved in): a tiny random one (CLIP text encoder over the
    words a, b, c + tokenizer, UNet, VAE, SD's DDIM config), 16 px images."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "c</w>": 4, "a": 5, "b": 6, "c": 7}
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=24, intermediate_size=48,
                                           num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                           bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                                attention_head_dim=4).eval()
    vae = AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=16,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(tmp / "pipeline"))
    return pipe, tmp / "pipeline"
