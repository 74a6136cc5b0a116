"""GenLLaVA-7B as in the paper: SigLIP So400m/14@384 (layer -2) -> MLP projector -> Mistral-7B-Instruct v0.2 ->
Q-former head (77 x 768) -> Stable Diffusion v1.4 (frozen UNet and VAE).

Convert the pretrained parts once (HF / diffusers folders downloaded elsewhere), then train on a pod:

    python -m convert siglip  --from-hf siglip-so400m-patch14-384 --out ckpt/siglip
    python -m convert mistral --from-hf Mistral-7B-Instruct-v0.2  --out ckpt/mistral
    python -m convert.stable_diffusion stable-diffusion-v1-4 ckpt/sd   # unet/ vae/ text_encoder/ null_conditioning.npy
    python -m genllava_jax.train --config=configs/genllava_7b.py --workdir=gs://bucket/genllava7b \
        --config.data.path=gvit.jsonl --config.data.tokenizer=Mistral-7B-Instruct-v0.2

GILL's alignment loss (DESIGN.md §1): `--config=configs/genllava_7b.py:align` adds λ_align = 1 · MSE between the
head's conditioning and SD's frozen CLIP text encoder states of each record's caption (or t2i prompt), with
init.text_encoder=ckpt/sd/text_encoder and data.caption_tokenizer=ckpt/sd/tokenizer from the SD conversion.

LoRA on the LLM (`--config=configs/genllava_7b.py:lora`, or `:align,lora`): LLaVA-1.5's LoRA recipe, rank 128,
alpha 256, dropout 0.05 on every linear layer of Mistral's decoder, the factors at 10x the learning rate (2e-4);
the decoder's kernels are frozen, the rest trains as above (projector, head, embeddings and norms). `python -m
launch.aot --config=configs/genllava_7b.py:lora ...` reports what it saves; `python -m convert.lora` merges the
factors or exports them as a PEFT adapter (README).

It prints a progress bar and every `train.log_every` steps a line such as
    step 10 loss 3.2 ce 2.4 mse 0.14 token_accuracy 0.51 grad_norm 2.1 lr 6.7e-07 tokens_per_s ... images_per_s ...
Parameters are kept in float32 and computed in bfloat16; Mistral and SigLIP are scanned with full remat; the mesh is
fully sharded (fsdp) over all chips. Attention is `auto` per tower (TPU: Pallas splash for the LLM, flash elsewhere;
`--config.model.llm.attention=xla` etc. for the dense one) and the LM loss is tiled over the vocabulary.
`python -m launch.aot --config=configs/genllava_7b.py` checks the fit first.
"""

from genllava_jax.config import base_config


def get_config(arg=None):
    """`arg` (what follows the file name's colon): "align" for GILL's alignment loss, "lora" for LoRA on the LLM,
    or both, comma-separated."""
    variants = set(arg.split(",")) if arg else set()
    if variants - {"align", "lora"}:
        raise ValueError(f"configs/genllava_7b.py:{arg}: the variants are 'align' and 'lora' (comma-separated)")
    c = base_config()  # its train and sample defaults are this model's recipe (AdamW 2e-5, batch 128, ...)
    c.mesh = dict(data=1, fsdp=-1, tensor=1)

    c.data.update(path="", tokenizer="", max_len=2048, image_size=384, num_patches=729, target_image_size=512,
                  num_img_tokens=16, worker_count=8)

    bf16 = dict(dtype="bfloat16", param_dtype="float32")
    m = c.model
    m.vision = dict(hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16, image_size=384,
                    patch_size=14, feature_layer=-2, remat="full", attention="auto", **bf16)
    m.projector = dict(vision_size=1152, text_size=4096, **bf16)
    m.llm = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                 num_kv_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None,
                 tie_embeddings=False, remat="full", attention="auto", **bf16)
    m.head = dict(hidden_size=768, num_layers=4, num_heads=12, intermediate_size=3072, cross_attention_frequency=1,
                  encoder_hidden_size=4096, llm_hidden_size=4096, num_query_tokens=77, out_dim=768, attention="auto",
                  **bf16)
    m.unet = dict(remat="full", attention="auto", **bf16)  # SD v1.4 defaults (genllava_jax.models.unet.UNetConfig)
    m.vae = dict(attention="auto", **bf16)  # SD v1.4 defaults, scaling factor 0.18215
    m.edit_mode = "semantic"
    m.cond_drop_prob = 0.1
    m.lambda_gen = 1.0
    m.diffusion_rows = 0
    m.ce_vocab_tile = 8192  # the LM loss over vocabulary tiles (0: the whole logits)

    # our-format checkpoints written by `python -m convert ...`; a .npy sets a single parameter
    c.init = dict(vision="ckpt/siglip", llm="ckpt/mistral", unet="ckpt/sd/unet", vae="ckpt/sd/vae",
                  null_cond="ckpt/sd/null_conditioning.npy")

    if "align" in variants:
        # SD v1.4's text encoder: CLIP ViT-L/14's text tower (its 77 x 768 states match the head's output)
        m.lambda_align = 1.0
        m.text_encoder = dict(text=dict(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
                                        max_position_embeddings=77), vision=None, projection_dim=None, **bf16)
        c.init.text_encoder = "ckpt/sd/text_encoder"
        c.data.caption_tokenizer = "ckpt/sd/tokenizer"
    if "lora" in variants:
        c.train.lora.llm.update(rank=128, alpha=256.0, dropout=0.05, targets=("layers/.*",))
        c.train.lr_scales = ((r"llm/.*/lora/.*", 10.0),)
    return c
