"""Small models that mirror real architectures, written the way their own code bases write them.

Each is built so that lora_jax's assumptions are not baked in: Gemma's einsum kernels with the
input axis inside (NNX, bf16, GQA, RoPE, RMSNorm, gated MLP, tied embeddings), a Llama-style
Linen decoder without biases (the bias rule cannot help), an MoE block with ``ragged_dot``, a
ResNet-style conv net with a depthwise convolution, and a ViT.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

D, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, SEQ = 32, 4, 2, 8, 64, 64, 12


class Arch(NamedTuple):
  name: str
  apply: Callable[..., Any]
  params: Any
  x: jax.Array
  targets: str
  rank: int
  tol: float           # relative tolerance, factored vs merged (per dtype)


def _rope(x: jax.Array) -> jax.Array:
  """Rotary position embedding over the last axis of (B, T, heads, head_dim)."""
  half = x.shape[-1] // 2
  freq = 1.0 / (10000 ** (jnp.arange(half, dtype=jnp.float32) / half))
  angle = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * freq
  sin, cos = jnp.sin(angle)[None, :, None], jnp.cos(angle)[None, :, None]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def _rms(x: jax.Array, scale: jax.Array) -> jax.Array:
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6)
  return (normed * (1 + scale.astype(jnp.float32))).astype(x.dtype)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  k, v = (jnp.repeat(t, q.shape[2] // t.shape[2], axis=2) for t in (k, v))  # GQA
  logits = jnp.einsum("BTNH,BSNH->BNTS", q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
  causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
  probs = jax.nn.softmax(jnp.where(causal, logits, -1e9), -1).astype(v.dtype)
  return jnp.einsum("BNTS,BSNH->BTNH", probs, v)


# --- Gemma-style NNX decoder -----------------------------------------------------------------


class _GemmaBlock(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, dtype: Any):
    init = lambda *shape: nnx.Param(  # noqa: E731
        (jax.random.normal(rngs.params(), shape) * shape[-2] ** -0.5).astype(dtype))
    self.pre_norm = nnx.Param(jnp.zeros(D, dtype))
    self.q_einsum = init(HEADS, D, HEAD_DIM)
    self.kv_einsum = init(2, KV_HEADS, D, HEAD_DIM)
    self.attn_vec_einsum = init(HEADS, HEAD_DIM, D)
    self.mlp_norm = nnx.Param(jnp.zeros(D, dtype))
    self.gating_einsum = nnx.Param((jax.random.normal(rngs.params(), (2, MLP, D))
                                    * D ** -0.5).astype(dtype))
    self.linear = init(MLP, D)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)

  def __call__(self, x):
    h = _rms(x, self.pre_norm[...])
    q = _rope(jnp.einsum("BTD,NDH->BTNH", h, self.q_einsum[...]))
    k, v = jnp.einsum("BSD,CKDH->CBSKH", h, self.kv_einsum[...])
    mix = _attend(q, _rope(k), v)
    x = x + self.dropout(jnp.einsum("BTNH,NHD->BTD", mix, self.attn_vec_einsum[...]))
    h = _rms(x, self.mlp_norm[...])
    gate, up = jnp.einsum("BTD,CFD->CBTF", h, self.gating_einsum[...])
    return x + jnp.einsum("BTF,FD->BTD", jax.nn.gelu(gate) * up, self.linear[...])


class GemmaNnx(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, dtype: Any = jnp.bfloat16):
    self.embedder = nnx.Param((jax.random.normal(rngs.params(), (VOCAB, D))).astype(dtype))
    self.blocks = nnx.List([_GemmaBlock(rngs, dtype) for _ in range(2)]) \
        if hasattr(nnx, "List") else [_GemmaBlock(rngs, dtype) for _ in range(2)]
    self.final_norm = nnx.Param(jnp.zeros(D, dtype))

  def __call__(self, ids):
    x = self.embedder[...][ids] * jnp.sqrt(D).astype(self.embedder[...].dtype)
    for block in self.blocks:
      x = block(x)
    return _rms(x, self.final_norm[...]) @ self.embedder[...].T  # tied embeddings


def _gemma() -> Arch:
  model = GemmaNnx(nnx.Rngs(0))
  model.eval()  # deterministic: Dropout off
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def apply(params, ids):
    return nnx.merge(graphdef, params, rest)(ids)

  ids = jax.random.randint(jax.random.key(1), (2, SEQ), 0, VOCAB)
  return Arch("gemma_nnx_bf16", apply, params, ids,
              r"(q_einsum|kv_einsum|attn_vec_einsum|gating_einsum|linear)$", 4, 3e-2)


# --- Llama-style Linen decoder without biases ------------------------------------------------


class _LlamaBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    dense = lambda features, name: nn.DenseGeneral(features, use_bias=False, name=name)  # noqa: E731
    h = _rms(x, self.param("attn_norm", nn.initializers.zeros, (D,)))
    q = _rope(dense((HEADS, HEAD_DIM), "q_proj")(h))
    k = _rope(dense((KV_HEADS, HEAD_DIM), "k_proj")(h))
    v = dense((KV_HEADS, HEAD_DIM), "v_proj")(h)
    x = x + nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, name="o_proj")(_attend(q, k, v))
    h = _rms(x, self.param("mlp_norm", nn.initializers.zeros, (D,)))
    gated = jax.nn.silu(dense(MLP, "gate_proj")(h)) * dense(MLP, "up_proj")(h)
    return x + dense(D, "down_proj")(gated)


class LlamaLinen(nn.Module):
  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(VOCAB, D, name="embed_tokens")(ids)
    for i in range(2):
      x = _LlamaBlock(name=f"layers_{i}")(x)
    x = _rms(x, self.param("norm", nn.initializers.zeros, (D,)))
    return nn.Dense(VOCAB, use_bias=False, name="lm_head")(x)


def _linen(name, module, x, targets, rank, tol) -> Arch:
  return Arch(name, module.apply, jax.jit(module.init)(jax.random.key(0), x), x, targets, rank,
              tol)


# --- MoE block (ragged_dot), ResNet with a depthwise conv, ViT --------------------------------


class MoeBlock(nn.Module):
  experts: int = 4

  @nn.compact
  def __call__(self, x):
    router = nn.Dense(self.experts, use_bias=False, name="router")(x)
    expert = jnp.argmax(router, -1)
    gate = jnp.take_along_axis(jax.nn.softmax(router, -1), expert[:, None], -1)
    order = jnp.argsort(expert)
    sizes = jnp.bincount(expert, length=self.experts).astype(jnp.int32)
    w_in = self.param("w_in", nn.initializers.lecun_normal(), (self.experts, D, MLP))
    w_out = self.param("w_out", nn.initializers.lecun_normal(), (self.experts, MLP, D))
    h = jax.nn.gelu(jax.lax.ragged_dot(x[order], w_in, sizes))
    y = jax.lax.ragged_dot(h, w_out, sizes)
    return x + jnp.zeros_like(y).at[order].set(y) * gate


class ResNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3), name="stem")(x))
    for i in range(2):
      h = nn.relu(nn.Conv(16, (3, 3), feature_group_count=16, name=f"depthwise_{i}")(x))
      x = x + nn.Conv(16, (1, 1), name=f"pointwise_{i}")(h)
    return nn.Dense(10, name="head")(x.mean((1, 2)))


class ViT(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(D, (4, 4), strides=(4, 4), name="patch_embed")(x)
    x = x.reshape(x.shape[0], -1, D)
    x = x + self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], D))
    for i in range(2):
      h = nn.LayerNorm(name=f"ln1_{i}")(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name=f"attn_{i}")(h, h)
      h = nn.gelu(nn.Dense(MLP, name=f"fc1_{i}")(nn.LayerNorm(name=f"ln2_{i}")(x)))
      x = x + nn.Dense(D, name=f"fc2_{i}")(h)
    return nn.Dense(10, name="head")(x.mean(1))


@functools.cache
def architectures() -> list[Arch]:
  ids = jax.random.randint(jax.random.key(1), (2, SEQ), 0, VOCAB)
  tokens = jax.random.normal(jax.random.key(2), (24, D))
  img = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
  return [
      _gemma(),
      _linen("llama_linen", LlamaLinen(), ids,
             r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel$", 4, 1e-4),
      _linen("moe_ragged_dot", MoeBlock(), tokens, r"w_(in|out)$", 4, 1e-4),
      _linen("resnet_depthwise", ResNet(), img, r"kernel$", 2, 1e-4),
      _linen("vit", ViT(), img, r"(patch_embed|query|key|value|out|fc1_\d|fc2_\d)/kernel$",
             4, 1e-4),
  ]
