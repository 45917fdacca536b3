"""infer_axes: input and stack axes read from how the model uses each target."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj

S = jax.ShapeDtypeStruct
D, N, K, H, R = 16, 4, 2, 8, 2


def _gemma_params():
  k = jax.random.split(jax.random.key(0), 3)
  return {"attn": {"q_einsum": {"w": jax.random.normal(k[0], (N, D, H))},
                   "kv_einsum": {"w": jax.random.normal(k[1], (2, K, D, H))},
                   "attn_vec_einsum": {"w": jax.random.normal(k[2], (N, H, D))}}}


def _gemma_attention(p, x):
  """Gemma's einsum layouts (DeepMind's gemma package): the input axis is inside the kernel."""
  a = p["attn"]
  q = jnp.einsum("BTD,NDH->BTNH", x, a["q_einsum"]["w"])
  k, v = jnp.einsum("BSD,CKDH->CBSKH", x, a["kv_einsum"]["w"])
  k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)  # GQA
  logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) * H ** -0.5
  mix = jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(logits, -1), v)
  return jnp.einsum("BTNH,NHD->BTD", mix, a["attn_vec_einsum"]["w"])


def test_gemma_einsums_get_standard_lora_shapes():
  params = _gemma_params()
  x = S((2, 5, D), jnp.float32)
  config = lj.infer_axes(_gemma_attention, params, x, config=lj.LoraConfig(rank=R, targets="w$"))
  assert dict(config.in_axes) == {r"^attn/q_einsum/w$": (1,), r"^attn/kv_einsum/w$": (2,),
                                  r"^attn/attn_vec_einsum/w$": (0, 1)}
  lp = lj.lift(params, config, key=jax.random.key(1))
  shapes = jax.tree.map(jnp.shape, lp.adapters)["attn"]
  assert shapes["q_einsum"]["w"] == {"a": (D, R), "b": (R, N, H)}       # 2,048 + ... per layer
  assert shapes["kv_einsum"]["w"] == {"a": (D, R), "b": (R, 2, K, H)}
  assert shapes["attn_vec_einsum"]["w"] == {"a": (N, H, R), "b": (R, D)}
  lp = lj.LoraParams(lp.base, jax.tree.map(lambda v: v + 0.1, lp.adapters))
  xs = jax.random.normal(jax.random.key(2), (2, 5, D))
  with warnings.catch_warnings():
    warnings.simplefilter("error", lj.FallbackWarning)  # every use stays factored
    out = jax.jit(lj.wrap(_gemma_attention, config))(lp, xs)
  np.testing.assert_allclose(out, _gemma_attention(lj.merge(lp, config), xs), rtol=1e-4,
                             atol=1e-4)
  assert lj.LoraConfig.from_dict(config.to_dict()) == config  # reviewable, saveable


def test_out_in_kernel_and_plain_dense():
  params = {"gpt2": {"kernel": jnp.zeros((8, 8))}, "dense": {"kernel": jnp.zeros((8, 3))}}
  apply = lambda p, x: (x @ p["gpt2"]["kernel"].T) @ p["dense"]["kernel"]  # noqa: E731
  config = lj.infer_axes(apply, params, S((4, 8), jnp.float32),
                         config=lj.LoraConfig(rank=2))
  assert dict(config.in_axes) == {"^gpt2/kernel$": (1,), "^dense/kernel$": (0,)}
  assert all(t.layout_certain for t in lj.plan(params, config))  # PEFT export can trust them


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.Dense(D, name="mlp")(jnp.tanh(x)), None


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    stack = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    x, _ = stack(name="blocks")(x, None)
    return x


def test_scanned_layers_are_stacked():
  model = _Scanned()
  x = S((2, D), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)
  config = lj.infer_axes(model.apply, params, x, config=lj.LoraConfig(rank=2))
  assert dict(config.stack_axes)[r"^params/blocks/mlp/kernel$"] == (0,)
  assert dict(config.in_axes)[r"^params/blocks/mlp/kernel$"] == (1,)
  (target,) = lj.plan(params, config)
  assert target.a_shape == (3, D, 2) and target.b_shape == (3, 2, D)


def test_python_loop_over_a_stacked_weight_and_numbered_layers():
  params = {"stacked": jnp.zeros((3, D, D)),
            "layers_0": {"kernel": jnp.zeros((D, D))}, "layers_1": {"kernel": jnp.zeros((D, D))}}

  def apply(p, x):
    for i in range(3):
      x = jnp.tanh(x @ p["stacked"][i])
    for name in ("layers_0", "layers_1"):
      x = x @ p[name]["kernel"]
    return x

  config = lj.infer_axes(apply, params, S((2, D), jnp.float32),
                         config=lj.LoraConfig(rank=2, targets=("stacked$", "kernel$")))
  assert dict(config.stack_axes) == {"^stacked$": (0,), r"^layers_\d+/kernel$": ()}
  assert dict(config.in_axes) == {"^stacked$": (1,), r"^layers_\d+/kernel$": (0,)}


def _moe_params(e=4, f=32):
  k = jax.random.split(jax.random.key(3), 2)
  return {"moe": {"w_in": jax.random.normal(k[0], (e, D, f)),
                  "w_out": jax.random.normal(k[1], (e, f, D))}}


def test_moe_expert_kernels_are_stacked_over_experts():
  params = _moe_params()

  def einsum_moe(p, x):  # x: (experts, capacity, D)
    h = jax.nn.gelu(jnp.einsum("ECD,EDF->ECF", x, p["moe"]["w_in"]))
    return jnp.einsum("ECF,EFD->ECD", h, p["moe"]["w_out"])

  def ragged_moe(p, x, group_sizes):  # x: (tokens, D), tokens grouped by expert
    h = jax.nn.gelu(jax.lax.ragged_dot(x, p["moe"]["w_in"], group_sizes))
    return jax.lax.ragged_dot(h, p["moe"]["w_out"], group_sizes)

  base = lj.LoraConfig(rank=2, targets="w_(in|out)$")
  for config in (lj.infer_axes(einsum_moe, params, S((4, 3, D), jnp.float32), config=base),
                 lj.infer_axes(ragged_moe, params, S((12, D), jnp.float32),
                               S((4,), jnp.int32), config=base)):
    assert dict(config.stack_axes) == {"^moe/w_in$": (0,), "^moe/w_out$": (0,)}
    assert dict(config.in_axes) == {"^moe/w_in$": (1,), "^moe/w_out$": (1,)}
    shapes = {t.path: (t.a_shape, t.b_shape) for t in lj.plan(params, config)}
    assert shapes["moe/w_in"] == ((4, D, 2), (4, 2, 32))  # one adapter per expert


class _Convs(nn.Module):
  @nn.compact
  def __call__(self, x, ids):
    x = nn.Conv(8, (3, 3), name="conv")(x)
    x = nn.Conv(8, (3, 3), feature_group_count=8, name="depthwise")(x)
    embed = nn.Embed(10, 8, name="embed")
    return embed.attend(x.mean((1, 2)) + embed(ids).sum(1))  # tied: lookup and x @ E.T


def test_convolutions_and_tied_embeddings():
  model = _Convs()
  x, ids = S((2, 6, 6, 3), jnp.float32), S((2, 5), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), x, ids)
  config = lj.infer_axes(model.apply, params, x, ids,
                         config=lj.LoraConfig(rank=2, targets=("kernel$", "embedding$")))
  in_axes = dict(config.in_axes)
  assert in_axes[r"^params/conv/kernel$"] == (0, 1, 2)
  assert in_axes[r"^params/depthwise/kernel$"] == (0, 1, 2)
  # Used both as a lookup (rows) and as x @ E.T (attend): the lookup says rows are input.
  assert in_axes[r"^params/embed/embedding$"] == (0,)


def test_uses_that_do_not_settle_the_axes_are_errors():
  params = {"tied": jnp.zeros((8, 8)), "unused": jnp.zeros((8, 8)),
            "summed": jnp.zeros((8, 8))}

  def apply(p, x):
    return (x @ p["tied"]) @ p["tied"].T + p["summed"].sum()

  with pytest.raises(ValueError) as info:
    lj.infer_axes(apply, params, S((2, 8), jnp.float32),
                  config=lj.LoraConfig(rank=2, targets=("tied", "unused", "summed")))
  message = str(info.value)
  assert ("tied (shape (8, 8)): used with incompatible contractions: dot_general: input axes "
          "(0,), stack axes (); dot_general: input axes (1,), stack axes ()") in message
  assert "unused (shape (8, 8)): never contracted with activations by the function (uses: none)" \
      in message
  assert "summed (shape (8, 8)): never contracted with activations by the function (uses: " \
      "reduce_sum (not a contraction with activations))" in message


def test_nothing_is_computed():
  """Abstract parameters and inputs are enough, and no device buffer is created."""
  params = jax.tree.map(lambda v: S(v.shape, jnp.bfloat16), _gemma_params())
  config = lj.infer_axes(_gemma_attention, params, S((2, 5, D), jnp.bfloat16),
                         config=lj.LoraConfig(rank=R, targets="w$"))
  assert len(config.in_axes) == 3
