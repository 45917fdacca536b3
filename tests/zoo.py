"""Small models of every layer kind lora_jax supports, shared by the tests."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

import lora_jax as lj


class Case(NamedTuple):
  name: str
  apply: Callable[..., Any]
  params: Any
  x: jax.Array
  config: lj.LoraConfig


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(32)(x))
    return nn.Dense(8)(x)


class _Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm()(x)
    return nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16)(x, x)


class _Conv(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    return nn.Conv(6, (3, 3), padding="VALID", use_bias=False)(x)


class _Embed(nn.Module):
  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(50, 12)
    h = embed(ids)
    return embed.attend(jnp.tanh(nn.Dense(12)(h)))


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.Dense(16)(nn.gelu(nn.Dense(24)(x))), None


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    stack = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True},
                    length=3)
    return stack(name="blocks")(x, None)[0]


class _Remat(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.remat(_Mlp)()(x)


class NnxMlp(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.up = nnx.Linear(16, 32, rngs=rngs)
    self.down = nnx.Linear(32, 8, rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.gelu(self.up(x)))


def _linen(name, module, x, config, seed=0) -> Case:
  params = jax.jit(module.init)(jax.random.key(seed), x)
  return Case(name, module.apply, params, x, config)


def _nnx_case() -> Case:
  graphdef, state = nnx.split(NnxMlp(nnx.Rngs(0)))

  def apply(state, x):
    return nnx.merge(graphdef, state)(x)

  x = jax.random.normal(jax.random.key(1), (4, 16))
  return Case("nnx", apply, state, x, lj.LoraConfig(rank=4, targets=r"kernel$"))


def _plain_case() -> Case:
  k1, k2 = jax.random.split(jax.random.key(3))
  params = {"layers": [{"w": jax.random.normal(k1, (16, 24))},
                       {"w": jax.random.normal(k2, (24, 8))}]}

  def apply(p, x):
    for layer in p["layers"]:
      x = jnp.tanh(x @ layer["w"])
    return x

  x = jax.random.normal(jax.random.key(4), (4, 16))
  return Case("plain", apply, params, x, lj.LoraConfig(rank=4, targets=r"/w$"))


@functools.cache
def cases() -> list[Case]:
  x = jax.random.normal(jax.random.key(1), (4, 16))
  seq = jax.random.normal(jax.random.key(2), (2, 5, 16))
  img = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
  ids = jax.random.randint(jax.random.key(4), (2, 7), 0, 50)
  return [
      _linen("dense", _Mlp(), x, lj.LoraConfig(rank=4, trainable=r"Dense_1/bias$")),
      _linen("attention", _Attention(), seq,
             lj.LoraConfig(rank=4, targets=r"(query|key|value|out)/kernel$")),
      _linen("conv", _Conv(), img, lj.LoraConfig(rank=2, targets=r"Conv_\d/kernel$")),
      _linen("embed", _Embed(), ids,
             lj.LoraConfig(rank=4, targets=(r"embedding$", r"Dense_0/kernel$"))),
      _linen("scan", _Scanned(), x,
             lj.LoraConfig(rank=4, targets=r"blocks/.*kernel$", stack_axes={r"blocks/": 1})),
      _linen("remat", _Remat(), x, lj.LoraConfig(rank=4)),
      _nnx_case(),
      _plain_case(),
  ]


def randomize(lp: lj.LoraParams, seed: int = 7, scale: float = 0.1) -> lj.LoraParams:
  """Gives B non-zero values so that adapters change the output."""
  leaves, treedef = jax.tree.flatten(lp.adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return lj.LoraParams(lp.base, jax.tree.unflatten(treedef, leaves))
