"""Fits a small AutoencoderKL on a folder of images: the demo's stand-in for SD's pretrained VAE.

Reconstruction L1 + KL at SD's weight (1e-6); then `scaling_factor` = 1 / std of the latent means
(as SD's 0.18215 was chosen), so the diffusion latents have unit variance.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image
from tqdm import tqdm

from genllava_jax.data.pipeline import vae_pixels
from genllava_jax.models.vae import AutoencoderKL, VAEConfig


def load_images(folder, size: int, only=None) -> np.ndarray:
    """float32 (N, size, size, 3) in [-1, 1] from every PNG/JPEG in `folder` (sorted, so deterministic), or the
    files named in `only` (relative to `folder`), in that order."""
    files = ([Path(folder) / n for n in only] if only is not None else
             sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")))
    if not files:
        raise FileNotFoundError(f"{folder}: no .png/.jpg images")
    return np.stack([vae_pixels(Image.open(f), size) for f in files])  # the training pipeline's resize


def fit_vae(cfg: VAEConfig, images: np.ndarray, *, steps: int = 600, batch_size: int = 32, lr: float = 2e-3,
            kl_weight: float = 1e-6, deterministic: bool = True, seed: int = 0,
            recon: str = "l1") -> tuple[AutoencoderKL, dict]:
    """With `deterministic`, the decoder learns from the posterior mean (a briefly fitted VAE's posterior is too wide
    to decode samples sharply); the diffusion then uses the mean too (GenLLaVAConfig.sample_latents=False)."""
    recon_loss = recon
    vae = AutoencoderKL(cfg, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(vae)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(50, steps // 4), steps, lr * 0.05)
    tx = optax.adamw(schedule, weight_decay=0.0)
    opt = tx.init(params)

    def loss_fn(params, x, rng):
        model = nnx.merge(graphdef, params)
        mean, logvar = model.encode(x)
        recon = model.decode(mean if deterministic else model.sample(mean, logvar, rng))
        kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
        mse = jnp.mean(jnp.square(recon - x))
        # L1, as SD's VAE loss: sharper edges and truer flat colours than MSE's blur
        rec = jnp.mean(jnp.abs(recon - x)) if recon_loss == "l1" else mse
        return rec + kl_weight * kl, mse

    @jax.jit(donate_argnums=(0, 1))
    def step(params, opt, x, rng):
        (loss, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, rng)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, mse

    rng = np.random.RandomState(seed)
    key = jax.random.key(seed)
    for i in (bar := tqdm(range(steps), desc="fit VAE")):
        x = images[rng.randint(0, len(images), batch_size)]
        params, opt, mse = step(params, opt, jnp.asarray(x), jax.random.fold_in(key, i))
        if i % 100 == 0 or i == steps - 1:
            bar.set_postfix(mse=f"{float(mse):.4f}")
    vae = nnx.merge(graphdef, params)
    encode = jax.jit(lambda x: vae.encode(x)[0])  # one function: a new jit per chunk would compile per chunk
    pad = -len(images) % 64  # and every chunk the same shape
    padded = np.concatenate([images, np.repeat(images[:1], pad, axis=0)])
    means = np.concatenate([np.asarray(encode(jnp.asarray(padded[i:i + 64]))) for i in range(0, len(padded), 64)])
    means = means[:len(images)]
    scale = float(1.0 / means.std())
    vae.cfg = cfg.replace(scaling_factor=scale)
    return vae, {"vae_mse": float(mse), "scaling_factor": scale}
