"""GenLLaVA composed in torch from transformers/diffusers modules, loaded from our weights via each part's `to_hf`.

    from convert.torch_genllava import TorchGenLLaVA, draws_of
    ref = TorchGenLLaVA.from_jax(model, folder)
    loss, metrics = ref.loss(batch, draws_of(model.cfg, rng, batch_size))   # = model.loss(batch, rng)

The parts are SiglipVisionModel, a Linear-GELU-Linear projector, MistralForCausalLM, Blip2QFormerModel with the
head's linears, UNet2DConditionModel, AutoencoderKL and DDPMScheduler: the PyTorch modules each part is proved on.
The loss is `models.genllava.GenLLaVA.loss` written against them. It is the oracle of the joint loss and its
gradients (tests/test_torch_genllava.py) and the torch side of bench/train_step.py. `draws_of` makes the step's random
draws (noise, timesteps, guidance drop, posterior sample) with JAX's keys exactly as our loss does, so both sides
compute the same number.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from genllava_jax.constants import IGNORE

from . import mistral, projector, qformer, siglip, unet, vae


def draws_of(cfg, rng, batch_size: int) -> dict[str, np.ndarray]:
    """The random draws of `GenLLaVA.loss(batch, rng)` (config `cfg`) for `batch_size` rows (NCHW where images)."""
    import jax

    r_noise, r_t, r_drop, r_vae = jax.random.split(rng, 4)
    rows = cfg.diffusion_rows or batch_size
    n = rows * cfg.diffusion_repeats
    side = cfg.vae.sample_size // 2 ** (len(cfg.vae.block_out_channels) - 1)
    latent = (side, side, cfg.vae.latent_channels)
    nchw = lambda x: np.asarray(x).transpose(0, 3, 1, 2)
    return {"noise": nchw(jax.random.normal(r_noise, (n, *latent))),
            "t": np.asarray(jax.random.randint(r_t, (n,), 0, cfg.schedule.num_train_timesteps)),
            "drop": np.asarray(jax.random.bernoulli(r_drop, cfg.cond_drop_prob, (rows,))),
            "posterior": nchw(jax.random.normal(r_vae, (rows, *latent)))}


def torch_projector(cfg, folder) -> torch.nn.Sequential:
    """LLaVA's Linear-GELU-Linear projector (config `cfg`) in torch, loaded strictly from `projector.to_hf`'s folder."""
    from safetensors.torch import load_file

    proj = torch.nn.Sequential(torch.nn.Linear(cfg.vision_size, cfg.text_size), torch.nn.GELU(),
                               torch.nn.Linear(cfg.text_size, cfg.text_size))
    weights = load_file(str(Path(folder) / "model.safetensors"))
    proj.load_state_dict({k.removeprefix(projector.PREFIX): v for k, v in weights.items()}, strict=True)
    return proj


class TorchHead(torch.nn.Module):
    """Our Q-former head on `Blip2QFormerModel`: hidden + embeddings -> [in linear] -> queries attend -> out linear.
    Its parameter (and module) names are the export's keys (`qformer.*`, `query_tokens`, `gen_head.*`), so it loads
    the folder strictly and PEFT adapters of the head name its modules as `convert/lora.py` does."""

    def __init__(self, folder: Path):
        super().__init__()
        from safetensors.torch import load_file
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        hf = json.loads((folder / "config.json").read_text())
        sd = load_file(str(folder / "model.safetensors"))
        # our Q-former has no dropout; BLIP-2's config defaults to 0.1 (active in train mode)
        qcfg = {**hf["qformer_config"], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
        self.qformer = Blip2QFormerModel(Blip2QFormerConfig.from_dict(qcfg))
        self.query_tokens = torch.nn.Parameter(torch.empty_like(sd["query_tokens"]))
        self.gen_head = torch.nn.ModuleDict({name: torch.nn.Linear(*sd[f"gen_head.{name}.weight"].shape[::-1])
                                             for name in ("in_proj", "out_proj") if f"gen_head.{name}.weight" in sd})
        self.load_state_dict(sd, strict=True)

    def forward(self, hidden, embeds):
        x = hidden + embeds
        x = self.gen_head["in_proj"](x) if "in_proj" in self.gen_head else x
        y = self.qformer(query_embeds=self.query_tokens.expand(x.shape[0], -1, -1),
                         encoder_hidden_states=x).last_hidden_state
        return self.gen_head["out_proj"](y) if "out_proj" in self.gen_head else y


class TorchGenLLaVA(torch.nn.Module):
    def __init__(self, cfg, parts: dict[str, torch.nn.Module], null_cond: torch.Tensor):
        super().__init__()
        from diffusers import DDPMScheduler

        self.cfg = cfg
        self.vision, self.projector, self.llm = parts["vision"], parts["projector"], parts["llm"]
        self.head, self.unet, self.vae = parts["head"], parts["unet"], parts["vae"]
        self.null_cond = torch.nn.Parameter(null_cond)
        s = cfg.schedule
        self.scheduler = DDPMScheduler(num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start,
                                       beta_end=s.beta_end, beta_schedule=s.beta_schedule,
                                       prediction_type=s.prediction_type)

    @classmethod
    def from_jax(cls, model, folder) -> "TorchGenLLaVA":
        """Exports each part of our `GenLLaVA` with its converter into `folder` and loads the torch modules."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import MistralForCausalLM, SiglipVisionModel

        folder = Path(folder)
        for name, conv in (("vision", siglip), ("projector", projector), ("llm", mistral), ("head", qformer),
                           ("unet", unet), ("vae", vae)):
            conv.to_hf(getattr(model, name), folder / name, overwrite=True)
        parts = {"vision": SiglipVisionModel.from_pretrained(str(folder / "vision")),
                 "projector": torch_projector(model.cfg.projector, folder / "projector"),
                 "llm": MistralForCausalLM.from_pretrained(str(folder / "llm")), "head": TorchHead(folder / "head"),
                 "unet": UNet2DConditionModel.from_pretrained(str(folder / "unet")),
                 "vae": AutoencoderKL.from_pretrained(str(folder / "vae"))}
        null = torch.from_numpy(np.asarray(model.null_cond[...], np.float32).copy())
        return cls(model.cfg, parts, null).train()

    def embed_inputs(self, ids, image, has_image):
        tok = self.llm.get_input_embeddings()(ids)
        feats = self.vision(image.permute(0, 3, 1, 2), output_hidden_states=True)
        patches = self.projector(feats.hidden_states[self.cfg.vision.feature_layer])
        is_img = (ids == self.cfg.image_token_id) & has_image[:, None]
        idx = (torch.cumsum(is_img.long(), 1) - 1).clamp(0, patches.shape[1] - 1)
        spliced = torch.gather(patches, 1, idx[..., None].expand(-1, -1, patches.shape[-1]))
        return torch.where(is_img[..., None], spliced, tok)

    def loss(self, batch: dict, draws: dict) -> tuple[torch.Tensor, dict]:
        """CE + λ·(Min-SNR-weighted) MSE as `GenLLaVA.loss`, for a numpy/torch batch and `draws_of`'s draws."""
        cfg = self.cfg
        keys = ("input_ids", "labels", "attention_mask", "image", "has_image", "target_image", "source_image",
                "has_target")
        b = {k: torch.as_tensor(np.array(batch[k])) for k in keys}
        d = {k: torch.as_tensor(np.array(v)) for k, v in draws.items()}
        ids, labels, mask = b["input_ids"].long(), b["labels"].long(), b["attention_mask"].long()
        embeds = self.embed_inputs(ids, b["image"], b["has_image"])
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        tgt = labels[:, 1:]
        trained = tgt != IGNORE
        n_tok = trained.sum().clamp(min=1)
        logits = out.logits[:, :-1].float()
        ce_tok = F.cross_entropy(logits.flatten(0, 1), torch.where(trained, tgt, 0).flatten(), reduction="none")
        ce = (ce_tok * trained.flatten()).sum() / n_tok
        acc = ((logits.argmax(-1) == tgt) & trained).sum() / n_tok

        hit = ids[:, None, :] == torch.tensor(cfg.img_token_ids)[None, :, None]
        pos = hit.long().argmax(-1)  # the first [IMGk] of each row
        take = lambda x: torch.gather(x, 1, pos[..., None].expand(-1, -1, x.shape[-1]))
        h, e = take(out.hidden_states[-1]), take(embeds)
        has = b["has_target"] & hit.any(-1).all(-1)
        target, source = b["target_image"], b["source_image"]
        if cfg.diffusion_rows:
            rows = torch.argsort((~has).long(), stable=True)[:cfg.diffusion_rows]
            h, e, has, target, source = (x[rows] for x in (h, e, has, target, source))
        cond = self.head(h, e)
        cond = torch.where(d["drop"][:, None, None], self.null_cond[None].to(cond.dtype), cond)
        with torch.no_grad():  # the VAE only encodes targets: no gradient, as stop_gradient in ours
            dist = self.vae.encode(target.permute(0, 3, 1, 2)).latent_dist
            z = dist.mean + dist.std * d["posterior"] if cfg.sample_latents else dist.mean
            latents = (z - (cfg.vae.shift_factor or 0.0)) * cfg.vae.scaling_factor
            source_latents = (self.vae.encode(source.permute(0, 3, 1, 2)).latent_dist.mean
                              if cfg.edit_mode == "latent_concat" else None)
        if cfg.diffusion_repeats > 1:
            rep = lambda x: None if x is None else x.repeat_interleave(cfg.diffusion_repeats, 0)
            cond, latents, source_latents, has = rep(cond), rep(latents), rep(source_latents), rep(has)
        noise, t = d["noise"], d["t"].long()
        noisy = self.scheduler.add_noise(latents, noise, t)
        unet_in = noisy if source_latents is None else torch.cat([noisy, source_latents], 1)
        target_eps = noise if cfg.schedule.prediction_type == "epsilon" else self.scheduler.get_velocity(
            latents, noise, t)
        pred = self.unet(unet_in, t, encoder_hidden_states=cond).sample
        mse_B = (pred.float() - target_eps.float()).square().mean((1, 2, 3))
        weight_B = torch.ones_like(mse_B)
        if cfg.snr_gamma:
            ac = self.scheduler.alphas_cumprod[t]
            snr = ac / (1 - ac)
            weight_B = snr.clamp(max=cfg.snr_gamma) / (snr if cfg.schedule.prediction_type == "epsilon" else snr + 1)
        n_img = has.sum().clamp(min=1)
        mse = (mse_B * has).sum() / n_img
        loss = ce + cfg.lambda_gen * (weight_B * mse_B * has).sum() / n_img
        return loss, {"ce": ce, "mse": mse, "token_accuracy": acc}
