"""lift: adapter shapes by the axis rule, determinism, abstract trees, no mutation."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo

import lora_jax as lj

CASES = {c.name: c for c in zoo.cases()}


def _shapes(lp):
  flat = {}
  for path, leaf in zip(lj.paths(lp.adapters), jax.tree.leaves(lp.adapters)):
    flat[path] = leaf.shape
  return flat


def test_attention_kernels_follow_bias_rule(key):
  case = CASES["attention"]
  lp = lj.lift(case.params, case.config, key=key)
  s = _shapes(lp)
  prefix = "params/MultiHeadDotProductAttention_0"
  # query kernel (embed=16, heads=4, head_dim=4): A (embed, r), B (r, heads, head_dim)
  assert s[f"{prefix}/query/kernel/a"] == (16, 4)
  assert s[f"{prefix}/query/kernel/b"] == (4, 4, 4)
  # out kernel (heads, head_dim, embed): A (heads, head_dim, r), B (r, embed)
  assert s[f"{prefix}/out/kernel/a"] == (4, 4, 4)
  assert s[f"{prefix}/out/kernel/b"] == (4, 16)


@pytest.mark.parametrize("name, path, a_shape, b_shape", [
    ("dense", "params/Dense_0/kernel", (16, 4), (4, 32)),
    ("conv", "params/Conv_0/kernel", (3, 3, 3, 2), (2, 8)),
    ("conv", "params/Conv_1/kernel", (3, 3, 8, 2), (2, 6)),  # no bias: all but last are input
    ("embed", "params/Embed_0/embedding", (50, 4), (4, 12)),
    ("scan", "params/blocks/Dense_0/kernel", (3, 24, 4), (3, 4, 16)),
    ("nnx", "up/kernel", (16, 4), (4, 32)),
    ("plain", "layers/1/w", (24, 4), (4, 8)),
])
def test_adapter_shapes(key, name, path, a_shape, b_shape):
  case = CASES[name]
  s = _shapes(lj.lift(case.params, case.config, key=key))
  assert s[f"{path}/a"] == a_shape
  assert s[f"{path}/b"] == b_shape


def test_in_axes_override(key):
  params = {"k": {"kernel": jnp.ones((6, 4, 5))}}
  config = lj.LoraConfig(rank=2, in_axes={r"k/kernel": 2})
  s = _shapes(lj.lift(params, config, key=key))
  assert s["k/kernel/a"] == (6, 4, 2) and s["k/kernel/b"] == (2, 5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_starts_equal_to_base(key, name):
  case = CASES[name]
  lp = lj.lift(case.params, case.config, key=key)
  for b in [e for p, e in zip(lj.paths(lp.adapters), jax.tree.leaves(lp.adapters))
            if p.endswith("/b")]:
    assert not b.any()
  out = jax.jit(lj.wrap(case.apply, case.config))(lp, case.x)
  np.testing.assert_array_equal(out, jax.jit(case.apply)(case.params, case.x))


def test_same_key_same_adapters_and_keys_differ_per_leaf(key):
  case = CASES["dense"]
  lp1 = lj.lift(case.params, case.config, key=key)
  lp2 = lj.lift(case.params, case.config, key=jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, lp1.adapters, lp2.adapters)
  lp3 = lj.lift(case.params, case.config, key=jax.random.key(1))
  a1 = lp1.adapters["params"]["Dense_0"]["kernel"]["a"]
  assert not np.allclose(a1, lp3.adapters["params"]["Dense_0"]["kernel"]["a"])
  # One subkey per leaf: the two kernels' A matrices are not the same draw.
  a2 = lp1.adapters["params"]["Dense_1"]["kernel"]["a"]
  assert not np.allclose(a1[:8, :4], a2[:8, :4])


def test_base_is_input_and_nothing_is_mutated(key):
  case = CASES["dense"]
  before = jax.tree.map(np.array, case.params)
  lp = lj.lift(case.params, case.config, key=key)
  assert lp.base is case.params
  lp = zoo.randomize(lp)
  lj.merge(lp, case.config)
  jax.tree.map(np.testing.assert_array_equal, before, case.params)


@pytest.mark.parametrize("init, bound_or_std", [("default", None), ("gaussian", 1 / 16)])
def test_init_distributions(key, init, bound_or_std):
  params = {"w": {"kernel": jnp.zeros((512, 512))}}
  config = lj.LoraConfig(rank=16, init=init)
  a = np.asarray(lj.lift(params, config, key=key).adapters["w"]["kernel"]["a"])
  if init == "default":
    bound = math.sqrt(6 / 512)  # he-uniform over the input axes
    assert np.abs(a).max() <= bound
    np.testing.assert_allclose(a.std(), bound / math.sqrt(3), rtol=0.05)
  else:
    np.testing.assert_allclose(a.std(), bound_or_std, rtol=0.05)
    np.testing.assert_allclose(a.mean(), 0.0, atol=0.005)


def test_abstract_tree_allocates_nothing(key):
  # A 100-billion-parameter-sized layer planned on a laptop.
  params = {"layers": {"mlp": {"kernel": jax.ShapeDtypeStruct((100, 8192, 131072), jnp.bfloat16)},
                       "attn": {"kernel": jax.ShapeDtypeStruct((100, 8192, 8192), jnp.bfloat16)}}}
  config = lj.LoraConfig(rank=16, stack_axes={r"layers/": 1}, dtype="bfloat16")
  lp = lj.lift(params, config, key=key)
  a = lp.adapters["layers"]["mlp"]["kernel"]["a"]
  assert isinstance(a, jax.ShapeDtypeStruct)
  assert a.shape == (100, 8192, 16) and a.dtype == jnp.bfloat16
  assert lp.adapters["layers"]["mlp"]["kernel"]["b"].shape == (100, 16, 131072)
  s = lj.summary(lp, config)
  assert s.base_params == 100 * 8192 * (131072 + 8192)


def test_lift_under_eval_shape_and_jit(key):
  case = CASES["attention"]
  shapes = jax.eval_shape(lambda p: lj.lift(p, case.config, key=key), case.params)
  concrete = lj.lift(case.params, case.config, key=key)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), shapes.adapters) == jax.tree.map(
      lambda x: (x.shape, x.dtype), concrete.adapters)
  jitted = jax.jit(lambda p, k: lj.lift(p, case.config, key=k))(case.params, key)
  jax.tree.map(np.testing.assert_array_equal, jitted.adapters, concrete.adapters)


def test_adapter_dtype(key):
  case = CASES["dense"]
  lp = lj.lift(case.params, lj.LoraConfig(rank=4, dtype="bfloat16"), key=key)
  assert {x.dtype for x in jax.tree.leaves(lp.adapters)} == {jnp.dtype(jnp.bfloat16)}


def test_raw_uint32_key_accepted():
  case = CASES["dense"]
  lp1 = lj.lift(case.params, case.config, key=jax.random.PRNGKey(0))
  lp2 = lj.lift(case.params, case.config, key=jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, lp1.adapters, lp2.adapters)


def test_paths_of_tree_kinds():
  nnx_state = CASES["nnx"].params
  assert lj.paths(nnx_state) == ["down/bias", "down/kernel", "up/bias", "up/kernel"]
  assert lj.paths({"layers": [{"w": 1.0}, {"w": 2.0}]}) == ["layers/0/w", "layers/1/w"]
  linen = nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 2)))
  assert lj.paths(linen) == ["params/bias", "params/kernel"]
