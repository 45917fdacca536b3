"""lj.adapt: one call from a model to (lp, config, apply), for each kind of model users hold."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_jax as lj


def _perturbed(lp):
  return lj.LoraParams(lp.base, jax.tree.map(lambda a: a + 0.05, lp.adapters))


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.body = nnx.Einsum("bd,dnh->bnh", (8, 2, 4), rngs=rngs)  # input axis 0 of 3
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.body(x).reshape(x.shape[0], -1))


def test_nnx_module_axes_inferred_head_trained_in_full():
  config = lj.LoraConfig(rank=2, targets=r"body/kernel$", trainable=r"head/")
  adapted = lj.adapt(_Net(nnx.Rngs(0)), config, jnp.ones((2, 8)), key=jax.random.key(0))
  assert dict(adapted.config.in_axes)[r"^body/kernel$"] == (0,)
  lp = _perturbed(adapted.lp)
  x = jax.random.normal(jax.random.key(1), (2, 8))
  np.testing.assert_allclose(jax.jit(adapted.apply)(lp, x),
                             adapted.params_fn(lj.merge(lp, adapted.config), x), rtol=1e-5,
                             atol=1e-6)
  grads = jax.grad(lambda lp: jnp.sum(adapted.apply(lp, x) ** 2))(lp)
  assert np.abs(np.asarray(grads.base["head"]["kernel"])).max() > 0   # trained in full
  assert np.abs(np.asarray(grads.base["body"]["kernel"])).max() == 0  # frozen


def test_linen_module_with_variables():
  module = nn.Dense(3, use_bias=False)  # no bias: only the model's use tells the axes
  variables = module.init(jax.random.key(0), jnp.ones((1, 5)))
  adapted = lj.adapt(module, lj.LoraConfig(rank=2, targets=r"kernel$"), jnp.ones((1, 5)),
                     key=jax.random.key(1), variables=variables)
  assert adapted.config.in_axes_for("kernel") == (0,)
  x = jnp.ones((2, 5))
  np.testing.assert_allclose(adapted.apply(_perturbed(adapted.lp), x),
                             module.apply({"params": lj.merge(_perturbed(adapted.lp),
                                                              adapted.config)}, x), rtol=1e-6)


def test_linen_module_without_variables_is_refused():
  with pytest.raises(TypeError, match="needs its variables"):
    lj.adapt(nn.Dense(3), lj.LoraConfig(rank=2), jnp.ones((1, 5)), key=jax.random.key(0))


def test_unknown_model_gets_the_recipe():
  with pytest.raises(TypeError, match=r"lj\.infer_axes\(fn, params"):
    lj.adapt(object(), lj.LoraConfig(rank=2), key=jax.random.key(0))


@pytest.mark.slow
def test_tunix_model(tmp_path):
  pytest.importorskip("tunix.models")
  pytest.importorskip("torch")
  import hf_tiny
  hf_tiny.save("gemma2", tmp_path)
  model = lj.load_hf(tmp_path)
  config = lj.LoraConfig(rank=4, targets=r"attn/(qkv_einsum|attn_vec_einsum)/w$")
  tokens = jnp.zeros((1, 6), jnp.int32)
  adapted = lj.adapt(model, config, tokens, key=jax.random.key(0))
  assert dict(adapted.config.in_axes)[r"^layers/\d+/attn/qkv_einsum/w$"] == (2,)
  lp = _perturbed(adapted.lp)
  with jax.numpy_dtype_promotion("standard"):
    merged = lj.merge(lp, adapted.config)
  np.testing.assert_allclose(adapted.apply(lp, tokens)[0], model.apply(merged, tokens)[0],
                             rtol=1e-4, atol=1e-5)
