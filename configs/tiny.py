"""The demo: a tiny GenLLaVA on the synthetic world of shapes, trained on 2 CPU cores.

    .venv/bin/python -m genllava_jax.train --config=configs/tiny.py --workdir=runs/tiny \
        --config.data.path=runs/demo/data/train.jsonl --config.data.tokenizer=runs/demo/data/tokenizer

`make demo` runs the whole thing (data, VAE fit, this training, evaluation) and prints the three accuracies. This
command alone prints a progress bar and a metrics line every `train.log_every` steps, e.g.
    step 100 ce 0.2688 grad_norm 1.171 loss 0.4076 lr 0.0009984 mse 0.1855 token_accuracy 0.8855 ...
(from the demo's data; `make demo` then prints understanding 85.9 %, generation colour 79.7 %: see README).
No pretrained SigLIP or Stable Diffusion exists on this machine, so unlike the 7B config the vision tower and
the UNet are trained here too; the VAE is fitted first by the demo and frozen (init.vae).
"""

from genllava_jax.config import base_config


def get_config():
    c = base_config()
    c.mesh = dict(data=-1, fsdp=1, tensor=1)

    c.data.update(path="runs/demo/data/train.jsonl", tokenizer="runs/demo/data/tokenizer", max_len=48,
                  image_size=32, num_patches=16, target_image_size=16, num_img_tokens=8,
                  eval_path="runs/demo/data/eval.jsonl")

    m = c.model
    m.vision = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, image_size=32, patch_size=8,
                    feature_layer=-1)
    m.projector = dict(vision_size=64, text_size=128)
    m.llm = dict(vocab_size=0, hidden_size=128, intermediate_size=256, num_layers=3, num_heads=4, num_kv_heads=2,
                 head_dim=32, rope_theta=1e4, tie_embeddings=False)  # vocab_size: from the tokenizer
    m.head = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, cross_attention_frequency=1,
                  encoder_hidden_size=128, llm_hidden_size=128, num_query_tokens=8, out_dim=64)
    m.unet = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, heads=(4, 4))
    # 16 px images, 8x8x4 latents: a 2-level VAE fits in ~2 CPU minutes; a 32 px 3-level one did not (see README)
    m.vae = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=16,
                 scaling_factor=1.0)
    m.edit_mode = "semantic"
    m.cond_drop_prob = 0.1
    m.lambda_gen = 1.0
    m.diffusion_rows = 16  # of 32: about half the synthetic rows have a target image
    m.sample_latents = False  # the demo's VAE is fitted for a minute: its posterior is still wide
    m.snr_gamma = 5.0  # the UNet trains from scratch here: Min-SNR weighting speeds it up
    m.diffusion_repeats = 2  # and it learns slowest: two noise draws per target image per step

    c.init = dict(vae="")  # our-format checkpoints to start parts from (python -m convert ... / the demo's VAE fit)

    c.train.update(steps=1400, batch_size=32, lr=1e-3, final_lr_frac=0.05, weight_decay=0.0, b2=0.98,
                   trainable=("vision/.*", "projector/.*", "llm/.*", "head/.*", "unet/.*", "null_cond"),
                   log_every=50, keep_checkpoints=2)
    # the vision tower and the UNet start from scratch here (pretrained in the 7B config): the tower learns kind and
    # place of a shape several times faster at 8x the rate; the UNet at 2x reaches in 1400 steps what took 1600
    c.train.lr_scales = (("vision/.*", 8.0), ("unet/.*", 2.0))
    c.sample = dict(num_steps=20, guidance_scale=3.0, sampler="ddim")
    return c
