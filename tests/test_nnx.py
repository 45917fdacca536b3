"""NNX models with Dropout: RNG state stays out of the lifted tree (jax.grad needs floats)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lora_jax as lj


class Net(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.up = nnx.Linear(8, 16, rngs=rngs)
    self.drop = nnx.Dropout(0.25, rngs=rngs)
    self.down = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.down(self.drop(nnx.relu(self.up(x))))


def test_whole_state_with_dropout_rng_is_refused_with_the_recipe():
  """Before: jax.grad failed with 'grad requires real- or complex-valued inputs ... uint32'."""
  graphdef, state = nnx.split(Net(nnx.Rngs(0, dropout=1)))
  config = lj.LoraConfig(rank=2, targets=r"kernel$")
  lp = lj.lift(state, config, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"drop/rngs/.*uint32[^$]*nnx.split\(model, nnx.Param, "
                     r"\.\.\.\)"):
    lj.optimizer(optax.adam(1e-3), config).init(lp)


def test_param_split_recipe_trains_with_dropout_and_matches_merge():
  graphdef, params, rest = nnx.split(Net(nnx.Rngs(0, dropout=1)), nnx.Param, ...)
  config = lj.LoraConfig(rank=2, targets=r"kernel$")
  lp = lj.lift(params, config, key=jax.random.key(0))
  lp = lj.LoraParams(lp.base, jax.tree.map(lambda a: a + 0.1, lp.adapters))
  fn = lambda p, x, rest: nnx.merge(graphdef, p, rest)(x)  # noqa: E731
  x = jax.random.normal(jax.random.key(1), (6, 8))
  factored, merged = lj.wrap(fn, config), lj.wrap(fn, config, mode="merge")
  tx = lj.optimizer(optax.adam(1e-2), config)
  tx.init(lp)
  # NNX mutates the RNG count while running: `rest` must be an argument of the jitted
  # function. (Plain NNX under jax.grad, as mode="merge" runs it, raises NNX's own
  # TraceContextError here; factored mode traces the function afresh and does not.)
  loss = lambda lp, rest: jnp.sum(factored(lp, x, rest) ** 2)  # noqa: E731
  grads = jax.jit(jax.grad(loss))(lp, rest)
  out = jax.jit(factored)(lp, x, rest)
  np.testing.assert_allclose(out, jax.jit(merged)(lp, x, rest), rtol=1e-5, atol=1e-6)
  assert (np.asarray(nnx.merge(graphdef, lj.merge(lp, config), rest)(x)) == 0).any()  # dropped
  for leaf in jax.tree.leaves(grads.adapters):
    assert np.isfinite(leaf).all()
  assert float(jnp.abs(grads.adapters["up"]["kernel"]["a"]).max()) > 0


def test_raw_nnx_state_paths_get_the_to_pure_dict_fix():
  """An NNX State saved as it is restores with every path ending in /value."""
  raw = {"up": {"kernel": {"value": jnp.ones((2, 3))}, "bias": {"value": jnp.ones(3)}}}
  with pytest.raises(ValueError, match=r"ends in '/value'.*to_pure_dict\(\)"):
    lj.lift(raw, lj.LoraConfig(rank=1, targets=r"kernel$"), key=jax.random.key(0))
