"""lj.nnx_module: a lifted model as an NNX module whose call runs the adapters factored."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_jax as lj


class Mlp(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(6, 8, rngs=rngs)
    self.down = nnx.Linear(8, 5, use_bias=False, rngs=rngs)

  def __call__(self, x, *, scale=1.0):
    return self.down(jax.nn.relu(self.up(x))) * scale

  def width(self):
    return self.up.out_features


CONFIG = lj.LoraConfig(rank=2, alpha=4.0, targets=r"(up|down)/kernel$")
X = jnp.asarray(np.random.RandomState(0).randn(3, 6), jnp.float32)


def _lifted(pure: bool):
  model = Mlp(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  lp = lj.lift(state.to_pure_dict() if pure else state, CONFIG, key=jax.random.key(1))
  leaves, treedef = jax.tree.flatten(lp.adapters)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  adapters = jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape)
                                          for k, x in zip(keys, leaves)])
  return model, lj.LoraParams(lp.base, adapters)


def _module_with(params):
  """A fresh Mlp holding ``params`` (an nnx.State or its pure dict)."""
  module = Mlp(nnx.Rngs(0))
  state = nnx.state(module, nnx.Param)
  if isinstance(params, nnx.State):
    state = params
  else:
    nnx.replace_by_pure_dict(state, params)
  nnx.update(module, state)
  return module


@pytest.mark.parametrize("pure", [False, True], ids=["state", "pure_dict"])
def test_module_call_equals_merged_and_survives_split_merge_jit(pure):
  model, lp = _lifted(pure)
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())
  module = lj.nnx_module(model, lp, CONFIG)
  assert isinstance(module, nnx.Module) and isinstance(module, lj.LoraModule)
  reference = _module_with(lj.merge(lp, CONFIG))
  expected = np.asarray(reference(X, scale=2.0))
  np.testing.assert_allclose(np.asarray(module(X, scale=2.0)), expected, atol=1e-5, rtol=0)
  # What a sampler does: split once, jit a function of the state, merge inside.
  graphdef, state = nnx.split(module)
  traces = []

  @jax.jit
  def run(state, x):
    traces.append(1)
    return nnx.merge(graphdef, state)(x, scale=2.0)

  np.testing.assert_allclose(np.asarray(run(state, X)), expected, atol=1e-5, rtol=0)
  run(state, X + 1)
  assert len(traces) == 1
  # Attributes and methods the wrapper lacks are the base module's; the model is unchanged.
  assert module.width() == 8 and module.up.out_features == 8
  after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())
  jax.tree.map(np.testing.assert_array_equal, before, after)


def test_disabled_adapters_run_the_base():
  model, lp = _lifted(False)
  module = lj.nnx_module(model, lj.disable(lp), CONFIG)
  np.testing.assert_allclose(np.asarray(module(X)), np.asarray(model(X)), atol=1e-6, rtol=0)


def test_bad_inputs_are_refused():
  model, lp = _lifted(False)
  with pytest.raises(TypeError, match="LoraParams"):
    lj.nnx_module(model, lp.base, CONFIG)
  with pytest.raises(TypeError, match="ZooModel .* or an nnx.Module"):
    lj.nnx_module(lambda x: x, lp, CONFIG)
  other = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"missing \['bias', 'kernel'\].*up/bias"):
    lj.nnx_module(other, lp, CONFIG)
  stack, stack_config = lj.stack_adapters({"a": (lp.adapters, CONFIG), "b": (lp.adapters,
                                                                             CONFIG)})
  with pytest.raises(ValueError, match=r"stack of 2 adapters \['a', 'b'\].*select\(name\)"):
    lj.nnx_module(model, lj.LoraParams(lp.base, stack), stack_config)
