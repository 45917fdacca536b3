"""Factored convolutions: values, gradients and dropout against plain references; step cost."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj


class _Net(nn.Module):
  channels: int = 16

  @nn.compact
  def __call__(self, x):
    for i in range(3):
      x = jax.nn.relu(nn.Conv(self.channels, (3, 3), name=f"conv{i}")(x))
    return x.mean((1, 2))


def _setup(channels=16, shape=(2, 8, 8, 4), rank=2):
  model = _Net(channels)
  x = jax.random.normal(jax.random.key(0), shape)
  params = model.init(jax.random.key(1), x)
  config = lj.LoraConfig(rank=rank, targets=r"kernel$", dropout=0.5)
  lp = lj.lift(params, config, key=jax.random.key(2))
  lp = lj.LoraParams(lp.base, jax.tree.map(
      lambda a: a + 0.1 * jax.random.normal(jax.random.key(3), a.shape), lp.adapters))
  return model, x, config, lp


def test_values_and_gradients_equal_merged():
  model, x, config, lp = _setup()
  apply = lj.wrap(model.apply, config)
  loss = lambda lp, f: jnp.sum(f(lp, x) ** 2)  # noqa: E731
  merged = lj.wrap(model.apply, config, mode="merge")
  np.testing.assert_allclose(jax.jit(apply)(lp, x), merged(lp, x), rtol=1e-4, atol=1e-5)
  got = jax.jit(jax.grad(loss), static_argnums=1)(lp, apply)
  want = jax.grad(loss)(lp, merged)
  for g, w in zip(jax.tree.leaves(got.adapters), jax.tree.leaves(want.adapters)):
    np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-5)


def test_dropout_reference():
  """With LoRA dropout: conv(x, W) + s * conv(x * mask, A) B, checked against that formula."""
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, 5))
  params = {"conv": {"kernel": w}}
  config = lj.LoraConfig(rank=2, dropout=0.5, alpha=4.0)
  lp = lj.lift(params, config, key=jax.random.key(2))
  a = lp.adapters["conv"]["kernel"]["a"]
  b = jax.random.normal(jax.random.key(3), (2, 5))
  lp = lj.LoraParams(params, {"conv": {"kernel": {"a": a, "b": b}}})
  conv = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  apply = lj.wrap(lambda p, x: conv(x, p["conv"]["kernel"]), config)
  key = jax.random.key(4)
  out = apply(lp, x, lora_rng=key)
  # The mask the interpreter draws: the first use's fold of the key.
  keep = jax.random.bernoulli(jax.random.fold_in(key, 0), 0.5, x.shape).astype(x.dtype) / 0.5
  expected = conv(x, w) + 2.0 * jnp.einsum("bhwr,ro->bhwo", conv(x * keep, a), b)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
  grad = jax.grad(lambda a: jnp.sum(apply(lj.LoraParams(params, {"conv": {"kernel": {
      "a": a, "b": b}}}), x, lora_rng=key) ** 2))(a)
  ref = jax.grad(lambda a: jnp.sum((conv(x, w) + 2.0 * jnp.einsum(
      "bhwr,ro->bhwo", conv(x * keep, a), b)) ** 2))(a)
  np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels, flops_bound", [(16, 1.25), (64, 1.1)])
def test_training_step_cost(channels, flops_bound):
  """FLOPs near the frozen floor, no weight gradient; temporary memory bounded (see README)."""
  model, x, config, lp = _setup(channels, (16, 24, 24, 16), rank=4)
  config = lj.LoraConfig(rank=4, targets=r"kernel$")
  params = lp.base

  def stats(f, *args):
    compiled = jax.jit(f).lower(*args).compile()
    return compiled.cost_analysis()["flops"], compiled.memory_analysis().temp_size_in_bytes

  floor = stats(jax.grad(lambda x: jnp.sum(model.apply(params, x))), x)
  factored = stats(jax.grad(lambda lp: jnp.sum(lj.wrap(model.apply, config)(lp, x))), lp)
  merged = stats(jax.grad(lambda lp: jnp.sum(
      lj.wrap(model.apply, config, mode="merge")(lp, x))), lp)
  # Two r-feature convolutions in the backward pass: measured 1.121 (16 channels), 1.020 (64).
  assert factored[0] <= flops_bound * floor[0], (factored, floor)
  assert factored[0] < merged[0]  # no weight gradient
  # The folded forward keeps what merge mode keeps, plus the r-feature x·A and s·dy·Bᵀ of the
  # backward pass: measured 1.142x merge (16 channels, r/channels = 1/4), 1.035x (64).
  assert factored[1] <= (1.2 if channels == 16 else 1.06) * merged[1], (factored, merged)
