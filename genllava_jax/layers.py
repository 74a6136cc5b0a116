"""Layers shared by the towers: linears, norms, embeddings, RoPE, scan over stacked layers under a remat policy.

Attention is `genllava_jax.attention`.

Every parameter carries logical axis names in its `out_sharding` metadata; `sharding.py` maps them to the mesh.
Kernels are stored (in, out) or (in, heads, head_dim); converters reshape from torch's (out, in).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from genllava_jax.errors import BadValue
from genllava_jax.sharding import constrain

Dtype = Any
Names = tuple[str | None, ...]


def param(rngs: nnx.Rngs | None, init: Callable, shape: Sequence[int], names: Names, dtype: Dtype) -> nnx.Param:
    """A parameter with logical axis names; placement on devices is done by `sharding.create_sharded`."""
    assert len(names) == len(shape), (names, shape)
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, tuple(shape), dtype), out_sharding=tuple(names), eager_sharding=False)


class Linear(nnx.Module):
    """y = x @ W (+ b) contracting the last `len(in_shape)` axes of x; `in_shape`/`out_shape` may be multi-axis."""

    def __init__(self, in_shape, out_shape, names: Names, *, use_bias: bool = False, rngs: nnx.Rngs,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 kernel_init: Callable | None = None):
        self.in_shape = tuple(in_shape) if isinstance(in_shape, (tuple, list)) else (in_shape,)
        self.out_shape = tuple(out_shape) if isinstance(out_shape, (tuple, list)) else (out_shape,)
        init = kernel_init or nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                                in_axis=tuple(range(len(self.in_shape))),
                                                                out_axis=tuple(range(len(self.in_shape), len(names))))
        self.kernel = param(rngs, init, self.in_shape + self.out_shape, names, param_dtype)
        self.bias = (param(rngs, nnx.initializers.zeros, self.out_shape, names[len(self.in_shape):], param_dtype)
                     if use_bias else None)
        self.dtype = dtype
        self.lora = nnx.data(None)  # genllava_jax.lora.LoRA: low-rank factors added beside the kernel

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        k = self.kernel[...].astype(self.dtype)
        y = jax.lax.dot_general(x.astype(self.dtype), k,
                                ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x)
        return y


class Embed(nnx.Module):
    def __init__(self, num: int, features: int, *, rngs: nnx.Rngs, names: Names = ("vocab", "embed"),
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, stddev: float = 0.02):
        self.embedding = param(rngs, nnx.initializers.normal(stddev), (num, features), names, param_dtype)
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        # FSDP: gather the whole table first (as XLA does for matmul weights); a gather out of an fsdp-sharded
        # table into batch-sharded activations otherwise makes the partitioner replicate it the slow way
        table = constrain(self.embedding[...], (None, None))
        return jnp.take(table, ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output head: logits = x @ E^T."""
        return jnp.einsum("...d,vd->...v", x, self.embedding[...].astype(self.dtype))


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32 as HF's MistralRMSNorm does."""

    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs | None = None, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, names: Names = ("norm",)):
        self.scale = param(None, nnx.initializers.ones, (dim,), names, param_dtype)
        self.eps, self.dtype = eps, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...].astype(jnp.float32) * y).astype(self.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs | None = None, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, names: Names = ("norm",)):
        self.scale = param(None, nnx.initializers.ones, (dim,), names, param_dtype)
        self.bias = param(None, nnx.initializers.zeros, (dim,), names, param_dtype)
        self.eps, self.dtype = eps, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Rotary position embedding, in HF's "rotate half" layout (so converters copy q/k weights without permuting).


def apply_rope(x_BTHD: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    head_dim = x_BTHD.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    angles_BTD = jnp.concatenate([angles_BTF, angles_BTF], axis=-1)[:, :, None, :]
    # the angles in float32, the rotation in x's dtype, as transformers does: a float32 rotation of bfloat16 q and k
    # costs the TPU a float32 copy of each (~2 % of a 7B layer's time, bench/llm_layer.py)
    cos, sin = jnp.cos(angles_BTD).astype(x_BTHD.dtype), jnp.sin(angles_BTD).astype(x_BTHD.dtype)
    x1, x2 = jnp.split(x_BTHD, 2, axis=-1)
    return x_BTHD * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


# ---------------------------------------------------------------------------------------------------------------
# Stacked layers: built with nnx.vmap (adds a leading "layers" axis to every parameter), run with lax.scan.

# Activations the towers tag with `checkpoint_name`, for remat policies that save (or offload) just these.
CHECKPOINT_NAMES = ("layer_input", "q_proj", "k_proj", "v_proj", "attn_out", "out_proj", "mlp_in", "mlp_out")
_ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "attn_out", "out_proj")
_cp = jax.checkpoint_policies


def _offload(*names):
    return _cp.save_and_offload_only_these_names(names_which_can_be_saved=(), names_which_can_be_offloaded=names,
                                                 offload_src="device", offload_dst="pinned_host")


REMAT_POLICIES = {
    "none": None,
    "full": _cp.nothing_saveable,
    "dots_saveable": _cp.dots_saveable,
    "dots_with_no_batch_dims_saveable": _cp.dots_with_no_batch_dims_saveable,
    "everything_saveable": _cp.everything_saveable,
    # by name: the attention's projections and output kept, the MLP (the most activation memory: its hidden width
    # is 3.5x the model's in Mistral-7B) recomputed; or everything named kept
    "save_qkv_proj": _cp.save_only_these_names("q_proj", "k_proj", "v_proj"),
    "save_dots_except_mlp": _cp.save_only_these_names(*_ATTENTION_NAMES),
    "save_all_names": _cp.save_only_these_names(*CHECKPOINT_NAMES),
    # kept in host memory and copied back for the backward pass. "layer_input" is what full remat keeps on the
    # device (each scanned layer's input); offloading it leaves the device with one layer's activations at a time
    "offload_layer_input": _offload("layer_input"),
    "offload_dots_except_mlp": _offload(*_ATTENTION_NAMES),
    "offload_all_names": _offload(*CHECKPOINT_NAMES),
}


def remat_policy(name: str):
    """A policy by name: a key of REMAT_POLICIES, or "save:NAME,..." / "offload:NAME,..." over CHECKPOINT_NAMES."""
    if name in REMAT_POLICIES:
        return REMAT_POLICIES[name]
    kind, _, names = name.partition(":")
    chosen = tuple(n for n in names.split(",") if n)
    bad = [n for n in chosen if n not in CHECKPOINT_NAMES]
    if kind not in ("save", "offload") or not chosen or bad:
        raise BadValue(f"unknown remat policy {name!r}" + (f" (unknown names {bad})" if bad else "") +
                         f"; choose one of {sorted(REMAT_POLICIES)} or save:NAME,... / offload:NAME,... with names "
                         f"from {CHECKPOINT_NAMES}")
    return _cp.save_only_these_names(*chosen) if kind == "save" else _offload(*chosen)


def remat(fn: Callable, policy: str) -> Callable:
    pol = remat_policy(policy)
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=pol, prevent_cse=False)


def stack_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """One module whose parameters have a leading `layers` axis of size `num_layers`."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(r):
        return make_layer(r)

    return build(rngs)


def scan_layers(stacked: nnx.Module, body: Callable, carry, xs=None, *, policy: str = "none", scan: bool = True):
    """Runs `body(layer, carry, x) -> (carry, y)` over the stacked layers; `xs`/`ys` carry a leading layer axis.

    The layer is rebuilt from its state slice with `nnx.merge` inside the scanned function, so the loop is plain
    `lax.scan` (compile time independent of depth) under a named remat policy.
    """
    graphdef, state = nnx.split(stacked)

    def step(c, inputs):
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), c, x)

    step = remat(step, policy)
    if scan:
        return jax.lax.scan(step, carry, (state, xs))
    num = jax.tree.leaves(state)[0].shape[0]
    ys = []
    for i in range(num):
        carry, y = step(carry, jax.tree.map(lambda a: a[i], (state, xs)))
        ys.append(y)
    return carry, (None if ys[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *ys))


# ---------------------------------------------------------------------------------------------------------------
# Convolutions and group norm (NHWC images, HWIO kernels), for the vision and diffusion towers.


class Conv(nnx.Module):
    # The kernel is gathered whole (replicated) before the convolution: sharded on its output channels (fsdp), XLA:TPU
    # otherwise runs it as a windowed all-gather loop of fsdp convolutions with out/fsdp channels each (8 of 128 on
    # 16 chips), which starves the MXU (bench/conv_gather.py: the SD VAE's encoder on v5e-16). The class attribute
    # is that benchmark's switch.
    gather_kernel = True

    def __init__(self, in_ch: int, out_ch: int, kernel: int | tuple[int, int], *, stride: int = 1,
                 padding: int | tuple[int, int] | str = 0, use_bias: bool = True, rngs: nnx.Rngs,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 names: Names = ("conv_h", "conv_w", "conv_in", "conv_out")):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1, 2), out_axis=3)
        self.kernel = param(rngs, init, (kh, kw, in_ch, out_ch), names, param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (out_ch,), names[-1:], param_dtype) if use_bias else None
        self.stride = stride
        if isinstance(padding, int):
            padding = (padding, padding)
        self.padding = padding if isinstance(padding, str) else tuple((p, p) for p in padding)  # (h, w) as torch
        self.dtype = dtype

    def __call__(self, x_NHWC: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        if self.gather_kernel:
            kernel = constrain(kernel, (None,) * kernel.ndim)
        y = jax.lax.conv_general_dilated(x_NHWC.astype(self.dtype), kernel,
                                         (self.stride, self.stride), self.padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm over the channel (last) axis of NHWC or (N, L, C) tensors, in float32."""

    def __init__(self, num_groups: int, channels: int, eps: float = 1e-5, *, rngs: nnx.Rngs | None = None,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, names: Names = ("norm",)):
        if channels % num_groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {num_groups} groups")
        self.scale = param(None, nnx.initializers.ones, (channels,), names, param_dtype)
        self.bias = param(None, nnx.initializers.zeros, (channels,), names, param_dtype)
        self.num_groups, self.eps, self.dtype = num_groups, eps, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        g = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, shape[-1] // self.num_groups)
        mean = g.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 3), keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


def gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS = {"gelu": gelu_exact, "gelu_pytorch_tanh": gelu_tanh, "gelu_new": gelu_tanh, "quick_gelu":
               lambda x: x * jax.nn.sigmoid(1.702 * x), "silu": jax.nn.silu, "swish": jax.nn.silu,
               "relu": jax.nn.relu, "tanh": jnp.tanh}
