"""GenLLaVA: SigLIP -> projector -> Mistral -> [IMG] states -> Q-former head -> Stable Diffusion (DESIGN.md §1).

`<image>` placeholders in the token sequence (the data pipeline writes exactly `num_patches` of them) are replaced by
the projected patch features; the LLM's last hidden states at `[IMG0..N-1]` plus those tokens' input embeddings go
through the Q-former head to the UNet's conditioning. The loss is CE on the labelled tokens + λ_gen · MSE(ε̂, ε)
(+ λ_align · MSE(conditioning, CLIP text states of the caption): GILL's alignment, the frozen CLIP text encoder
running inside the step).
Editing: `semantic` regenerates the target from the conditioning alone (frozen SD); `latent_concat` gives the UNet
8 input channels, the source image's latents concatenated (InstructPix2Pix / MGIE).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from genllava_jax import diffusion
from genllava_jax.constants import IGNORE
from genllava_jax.errors import BadValue
from genllava_jax.layers import param
from genllava_jax.losses import tiled_cross_entropy
from genllava_jax.models.clip import CLIP, CLIPConfig
from genllava_jax.models.mistral import Mistral, MistralConfig
from genllava_jax.models.projector import Projector, ProjectorConfig
from genllava_jax.models.qformer import QFormerHead, QFormerHeadConfig
from genllava_jax.models.siglip import SiglipVision, SiglipVisionConfig
from genllava_jax.models.unet import UNet, UNetConfig
from genllava_jax.models.vae import AutoencoderKL, VAEConfig

PARTS = {"vision": SiglipVisionConfig, "projector": ProjectorConfig, "llm": MistralConfig,
         "head": QFormerHeadConfig, "unet": UNetConfig, "vae": VAEConfig, "schedule": diffusion.NoiseSchedule,
         "text_encoder": CLIPConfig}


@dataclasses.dataclass(frozen=True)
class GenLLaVAConfig:
    vision: SiglipVisionConfig
    projector: ProjectorConfig
    llm: MistralConfig
    head: QFormerHeadConfig
    unet: UNetConfig
    vae: VAEConfig
    image_token_id: int
    img_token_ids: tuple[int, ...]  # [IMG0..N-1]
    schedule: diffusion.NoiseSchedule = diffusion.NoiseSchedule()
    edit_mode: str = "semantic"  # or "latent_concat"
    cond_drop_prob: float = 0.1  # classifier-free guidance: the learned null conditioning replaces it
    lambda_gen: float = 1.0
    # rows of a batch that run the diffusion branch (those with a target image first); 0: all rows. Fixed shapes
    # either way; fewer rows skip UNet/VAE work on understanding and text rows.
    diffusion_rows: int = 0
    # Min-SNR-γ loss weighting (Hang et al. 2023; diffusers' --snr_gamma): faster convergence for a UNet trained
    # from scratch. None: plain MSE, as the paper (whose UNet is frozen).
    snr_gamma: float | None = None
    # noise draws per target image per step: more UNet updates for one LLM/Q-former pass (the UNet is the part that
    # learns slowest when it trains from scratch, as in the demo); 1 in the paper's setting
    diffusion_repeats: int = 1
    # diffuse a posterior sample of the target's latents (SD's practice) or its mean (for a VAE whose posterior is
    # still wide, like the demo's briefly fitted one: its samples would be mostly noise)
    sample_latents: bool = True
    # GILL's alignment loss: λ_align · MSE between the head's conditioning and the frozen CLIP text encoder's last
    # hidden states of the caption (batches then carry caption_ids / has_caption: data.caption_tokenizer)
    lambda_align: float = 0.0
    text_encoder: CLIPConfig | None = None  # SD's CLIP text tower (a text-only CLIPConfig); needed for lambda_align
    # the LM loss over vocabulary tiles of this many columns (losses.tiled_cross_entropy): the (B, T, V) logits are
    # never materialised; same loss and gradients. Used when the vocabulary is larger than a tile; 0: never.
    ce_vocab_tile: int = 8192

    def __post_init__(self):
        if self.edit_mode not in ("semantic", "latent_concat"):
            raise ValueError(f"edit_mode={self.edit_mode!r}: choose 'semantic' or 'latent_concat'")
        want_in = self.vae.latent_channels * (2 if self.edit_mode == "latent_concat" else 1)
        checks = [
            (self.projector.vision_size == self.vision.hidden_size, "projector.vision_size != vision.hidden_size"),
            (self.projector.text_size == self.llm.hidden_size, "projector.text_size != llm.hidden_size"),
            (self.head.llm_hidden_size == self.llm.hidden_size, "head.llm_hidden_size != llm.hidden_size"),
            (self.head.out_dim == self.unet.cross_attention_dim, "head.out_dim != unet.cross_attention_dim"),
            (self.unet.in_channels == want_in, f"unet.in_channels must be {want_in} for edit_mode={self.edit_mode}"),
            (self.unet.out_channels == self.vae.latent_channels, "unet.out_channels != vae.latent_channels"),
        ]
        if self.lambda_align:
            te = self.text_encoder.text if self.text_encoder is not None else None
            checks += [(te is not None, "lambda_align > 0 needs text_encoder (a CLIP config with a text tower)")]
            checks += [] if te is None else [
                (te.hidden_size == self.head.out_dim, "text_encoder.text.hidden_size != head.out_dim"),
                (te.max_position_embeddings >= self.head.num_query_tokens,
                 "text_encoder.text.max_position_embeddings < head.num_query_tokens (the caption length)")]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ValueError("inconsistent GenLLaVA config: " + "; ".join(bad))

    @property
    def num_patches(self) -> int:
        return self.vision.grid ** 2

    def replace(self, **kw) -> "GenLLaVAConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GenLLaVAConfig":
        """From `dataclasses.asdict` output or a (nested) ConfigDict's `to_dict()`."""
        d = dict(d)
        for name, sub in PARTS.items():
            if name in d and isinstance(d[name], dict):
                d[name] = sub(**d[name])
        d["img_token_ids"] = tuple(d["img_token_ids"])
        return cls(**d)


class GenLLaVA(nnx.Module):
    def __init__(self, cfg: GenLLaVAConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision = SiglipVision(cfg.vision, rngs=rngs)
        self.projector = Projector(cfg.projector, rngs=rngs)
        self.llm = Mistral(cfg.llm, rngs=rngs)
        self.head = QFormerHead(cfg.head, rngs=rngs)
        self.unet = UNet(cfg.unet, rngs=rngs)
        self.vae = AutoencoderKL(cfg.vae, rngs=rngs)
        self.text_encoder = CLIP(cfg.text_encoder, rngs=rngs) if cfg.text_encoder is not None else None
        # learned unconditional context; converters overwrite it with CLIP("") when SD has a text encoder
        self.null_cond = param(rngs, nnx.initializers.normal(0.02), (cfg.head.num_query_tokens, cfg.head.out_dim),
                               (None, "embed"), jnp.dtype(cfg.head.param_dtype))

    # -- understanding -----------------------------------------------------------------------------------------

    def embed_inputs(self, input_ids_BT, image_BHWC, has_image_B):
        """Token embeddings with the k-th `<image>` position of a row replaced by its k-th projected patch."""
        with jax.named_scope("llm"):  # the scopes name each part's ops in the compiled program (launch/simulate.py)
            tok_BTD = self.llm.embed(input_ids_BT)
        with jax.named_scope("vision"):
            features_BPC = self.vision(image_BHWC).features
        with jax.named_scope("projector"):
            patches_BPD = self.projector(features_BPC)
        is_img_BT = (input_ids_BT == self.cfg.image_token_id) & has_image_B[:, None]
        idx_BT = jnp.clip(jnp.cumsum(is_img_BT, axis=1) - 1, 0, patches_BPD.shape[1] - 1)
        spliced_BTD = jnp.take_along_axis(patches_BPD, idx_BT[..., None], axis=1).astype(tok_BTD.dtype)
        return jnp.where(is_img_BT[..., None], spliced_BTD, tok_BTD)

    # -- generation --------------------------------------------------------------------------------------------

    def img_states(self, input_ids_BT, hidden_BTD, embeds_BTD):
        """(hidden, input embeddings) at [IMG0..N-1], each (B, N, D), and whether a row has all of them."""
        ids_N = jnp.asarray(self.cfg.img_token_ids)
        hit_BNT = input_ids_BT[:, None, :] == ids_N[None, :, None]
        pos_BN = jnp.argmax(hit_BNT, axis=-1)
        found_B = hit_BNT.any(-1).all(-1)
        take = lambda x: jnp.take_along_axis(x, pos_BN[..., None], axis=1)
        return take(hidden_BTD), take(embeds_BTD), found_B

    def condition(self, input_ids_BT, attention_mask_BT, image_BHWC, has_image_B):
        """The UNet conditioning (B, Q, C) from a sequence that contains [IMG0..N-1] (teacher-forced)."""
        embeds = self.embed_inputs(input_ids_BT, image_BHWC, has_image_B)
        hidden = self.llm.hidden(inputs_embeds=embeds, attention_mask=attention_mask_BT)[0]
        h, e, _ = self.img_states(input_ids_BT, hidden, embeds)
        return self.head(h, e)

    def unet_input(self, noisy_BHWC, source_latents_BHWC=None):
        if self.cfg.edit_mode == "latent_concat":
            src = jnp.zeros_like(noisy_BHWC) if source_latents_BHWC is None else source_latents_BHWC
            return jnp.concatenate([noisy_BHWC, src.astype(noisy_BHWC.dtype)], axis=-1)
        return noisy_BHWC

    # -- training ----------------------------------------------------------------------------------------------

    def token_losses(self, hidden_BTD, labels_BT):
        """(cross-entropy (B, T) in float32, predicted ids (B, T)) of the LLM head on `hidden`: over vocabulary tiles
        when the vocabulary is larger than `ce_vocab_tile`, else from the whole logits."""
        tile = self.cfg.ce_vocab_tile
        head = self.llm.lm_head  # a LoRA on it goes through the whole logits: the tiles read the kernel alone
        if tile and self.cfg.llm.vocab_size > tile and (head is None or head.lora is None):
            w, vocab_axis = self.llm.head_weight()
            return tiled_cross_entropy(hidden_BTD, w, labels_BT, tile=tile, vocab_axis=vocab_axis)
        logits = self.llm.logits(hidden_BTD).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels_BT), logits.argmax(-1)

    def loss(self, batch: dict, rng: jax.Array):
        """CE on labelled tokens + λ_gen · MSE(ε̂, ε) on rows with a target image (+ λ_align · the alignment loss on
        those with a caption); returns (loss, metrics)."""
        cfg = self.cfg
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        embeds = self.embed_inputs(ids, batch["image"], batch["has_image"])
        with jax.named_scope("llm"):  # (the output projection is in "ce": token_losses tiles it with the loss)
            hidden, _ = self.llm.hidden(inputs_embeds=embeds, attention_mask=mask)
        with jax.named_scope("ce"):
            tgt = labels[:, 1:]
            trained = tgt != IGNORE
            ce_tok, pred = self.token_losses(hidden[:, :-1], jnp.where(trained, tgt, 0))
            n_tok = trained.sum()
            ce = (ce_tok * trained).sum() / jnp.maximum(n_tok, 1)
            acc = ((pred == tgt) & trained).sum() / jnp.maximum(n_tok, 1)

        r_noise, r_t, r_drop, r_vae = jax.random.split(rng, 4)
        h, e, found = self.img_states(ids, hidden, embeds)
        has = batch["has_target"] & found
        target_image, source_image = jnp.asarray(batch["target_image"]), jnp.asarray(batch["source_image"])
        aligned = jnp.asarray(batch["has_caption"]) & found if cfg.lambda_align else found
        if cfg.diffusion_rows:
            rows = jnp.argsort(~has, stable=True)[:cfg.diffusion_rows]
            h, e, has, target_image, source_image, aligned = (
                x[rows] for x in (h, e, has, target_image, source_image, aligned))
        B = h.shape[0]
        with jax.named_scope("head"):
            cond = self.head(h, e)
        align = self.align_loss(cond, batch, rows if cfg.diffusion_rows else None, aligned)
        drop = jax.random.bernoulli(r_drop, cfg.cond_drop_prob, (B,))
        cond = jnp.where(drop[:, None, None], self.null_cond[...].astype(cond.dtype)[None], cond)
        with jax.named_scope("vae"):
            latents = jax.lax.stop_gradient(self.vae.latents(target_image, r_vae if cfg.sample_latents else None))
            source = (jax.lax.stop_gradient(self.vae.latents(source_image))
                      if cfg.edit_mode == "latent_concat" else None)
        if cfg.diffusion_repeats > 1:
            rep = lambda x: None if x is None else jnp.repeat(x, cfg.diffusion_repeats, axis=0)
            cond, latents, source, has = rep(cond), rep(latents), rep(source), rep(has)
            B = B * cfg.diffusion_repeats
        noise = jax.random.normal(r_noise, latents.shape, latents.dtype)
        t = jax.random.randint(r_t, (B,), 0, cfg.schedule.num_train_timesteps)
        noisy = diffusion.add_noise(cfg.schedule, latents, noise, t)
        target = noise if cfg.schedule.prediction_type == "epsilon" else diffusion.velocity(cfg.schedule, latents,
                                                                                             noise, t)
        with jax.named_scope("unet"):
            pred = self.unet(self.unet_input(noisy, source), t, cond)
        mse_B = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=(1, 2, 3))
        weight_B = jnp.ones_like(mse_B)
        if cfg.snr_gamma:
            ac = jnp.asarray(cfg.schedule.alphas_cumprod())[t]
            snr = ac / (1 - ac)
            denom = snr if cfg.schedule.prediction_type == "epsilon" else snr + 1
            weight_B = jnp.minimum(snr, cfg.snr_gamma) / denom
        n_img = has.sum()
        mse = (mse_B * has).sum() / jnp.maximum(n_img, 1)
        gen_loss = (weight_B * mse_B * has).sum() / jnp.maximum(n_img, 1)
        n_img = n_img // cfg.diffusion_repeats
        loss = ce + cfg.lambda_gen * gen_loss + cfg.lambda_align * align
        metrics = {"ce": ce, "mse": mse, "token_accuracy": acc, "tokens": mask.sum().astype(jnp.float32),
                   "images": n_img.astype(jnp.float32)}
        return loss, metrics | ({"align": align} if cfg.lambda_align else {})

    def align_loss(self, cond_BQC, batch, rows, aligned_B):
        """GILL's alignment: mean over the rows with a caption of MSE(conditioning, CLIP text states of the caption
        padded to Q tokens); the CLIP text encoder is frozen (no gradient flows into it). 0 without lambda_align."""
        if not self.cfg.lambda_align:
            return jnp.zeros((), jnp.float32)
        if "caption_ids" not in batch:
            raise BadValue("model.lambda_align > 0 needs caption_ids in the batch: set data.caption_tokenizer")
        ids_BQ = jnp.asarray(batch["caption_ids"])
        ids_BQ = ids_BQ if rows is None else ids_BQ[rows]
        target_BQC = jax.lax.stop_gradient(self.text_encoder.encode_text(ids_BQ).last_hidden_state)
        mse_B = jnp.mean(jnp.square(cond_BQC.astype(jnp.float32) - target_BQC.astype(jnp.float32)), axis=(1, 2))
        return (mse_B * aligned_B).sum() / jnp.maximum(aligned_B.sum(), 1)
