"""merge / unmerge / wrap numerics against the plain NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo
from reference import reference_merge

import lora_jax as lj

CASES = {c.name: c for c in zoo.cases()}
TOL = {jnp.float32: dict(rtol=2e-5, atol=2e-5), jnp.bfloat16: dict(rtol=1e-2, atol=1e-2)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_merge_matches_reference(key, name):
  case = CASES[name]
  lp = zoo.randomize(lj.lift(case.params, case.config, key=key))
  merged = lj.merge(lp, case.config)
  expected = reference_merge(case.params, lp.adapters, case.config)
  assert jax.tree.structure(merged) == jax.tree.structure(case.params)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **TOL[jnp.float32]),
               merged, expected)


@pytest.mark.parametrize("name", sorted(CASES))
def test_wrap_matches_reference(key, name):
  case = CASES[name]
  lp = zoo.randomize(lj.lift(case.params, case.config, key=key))
  out = jax.jit(lj.wrap(case.apply, case.config))(lp, case.x)
  expected = case.apply(reference_merge(case.params, lp.adapters, case.config), case.x)
  assert not np.allclose(expected, case.apply(case.params, case.x), atol=1e-3)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_dense_explicit_formula(key):
  w = jax.random.normal(key, (16, 8))
  config = lj.LoraConfig(rank=4, alpha=6.0)
  lp = zoo.randomize(lj.lift({"kernel": w}, config, key=jax.random.key(1)))
  x = jax.random.normal(jax.random.key(2), (5, 16))
  a, b = lp.adapters["kernel"]["a"], lp.adapters["kernel"]["b"]
  expected = np.asarray(x) @ np.asarray(w) + 1.5 * (np.asarray(x) @ np.asarray(a)) @ np.asarray(b)
  out = jax.jit(lj.wrap(lambda p, x: x @ p["kernel"], config))(lp, x)
  np.testing.assert_allclose(out, expected, **TOL[jnp.float32])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_merge_keeps_dtype_and_unmerge_roundtrips(key, dtype):
  params = {"d": {"kernel": jax.random.normal(key, (32, 24)).astype(dtype),
                  "bias": jnp.zeros(24, dtype)}}
  config = lj.LoraConfig(rank=4)
  lp = zoo.randomize(lj.lift(params, config, key=key))
  merged = lj.merge(lp, config)
  assert merged["d"]["kernel"].dtype == dtype
  expected = reference_merge(params, lp.adapters, config)["d"]["kernel"]
  np.testing.assert_allclose(np.asarray(merged["d"]["kernel"], np.float32),
                             np.asarray(expected, np.float32), **TOL[dtype])
  restored = lj.unmerge(merged, lp.adapters, config)
  np.testing.assert_allclose(np.asarray(restored["d"]["kernel"], np.float32),
                             np.asarray(params["d"]["kernel"], np.float32), **TOL[dtype])
  np.testing.assert_array_equal(restored["d"]["bias"], params["d"]["bias"])


@pytest.mark.parametrize("use_rslora, scale", [(False, 16.0 / 4), (True, 16.0 / 2)])
def test_scaling(key, use_rslora, scale):
  config = lj.LoraConfig(rank=4, alpha=16.0, use_rslora=use_rslora)
  assert config.scale_for("any/kernel") == scale
  params = {"kernel": jnp.zeros((8, 8))}
  lp = zoo.randomize(lj.lift(params, config, key=key))
  a, b = lp.adapters["kernel"]["a"], lp.adapters["kernel"]["b"]
  np.testing.assert_allclose(lj.merge(lp, config)["kernel"], scale * (a @ b), **TOL[jnp.float32])


def test_rank_and_alpha_patterns(key):
  params = {"q": {"kernel": jnp.zeros((16, 16))}, "v": {"kernel": jnp.zeros((16, 16))}}
  config = lj.LoraConfig(rank=8, alpha=16.0, rank_pattern={r"^v/": 2},
                         alpha_pattern={r"^v/": 1.0})
  lp = zoo.randomize(lj.lift(params, config, key=key))
  assert lp.adapters["q"]["kernel"]["a"].shape == (16, 8)
  assert lp.adapters["v"]["kernel"]["a"].shape == (16, 2)
  assert config.scale_for("v/kernel") == 0.5 and config.scale_for("q/kernel") == 2.0
  merged = lj.merge(lp, config)
  a, b = lp.adapters["v"]["kernel"]["a"], lp.adapters["v"]["kernel"]["b"]
  np.testing.assert_allclose(merged["v"]["kernel"], 0.5 * (a @ b), **TOL[jnp.float32])


@pytest.mark.parametrize("name", ["dense", "attention", "nnx"])
def test_disable_gives_base_exactly(key, name):
  case = CASES[name]
  lp = zoo.randomize(lj.lift(case.params, case.config, key=key))
  apply = jax.jit(lj.wrap(case.apply, case.config))
  np.testing.assert_array_equal(apply(lj.disable(lp), case.x),
                                jax.jit(case.apply)(case.params, case.x))


def test_nnx_roundtrip_through_merge(key):
  from flax import nnx

  case = CASES["nnx"]
  lp = zoo.randomize(lj.lift(case.params, case.config, key=key))
  merged_state = lj.merge(lp, case.config)
  assert isinstance(merged_state, nnx.State)
  graphdef, _ = nnx.split(zoo.NnxMlp(nnx.Rngs(0)))
  model = nnx.merge(graphdef, merged_state)
  expected = case.apply(reference_merge(case.params, lp.adapters, case.config), case.x)
  np.testing.assert_allclose(model(case.x), expected, rtol=1e-5, atol=1e-5)


def test_merge_does_not_retrace(key):
  case = CASES["dense"]
  lp = lj.lift(case.params, case.config, key=key)
  traces = []
  original = lj._src.adapters.merge.fold

  def counting(*args):
    traces.append(1)
    return original(*args)

  lj._src.adapters.merge.fold = counting
  try:
    lj._src.adapters.merge._merge.clear_cache()
    lj.merge(lp, case.config)
    lj.merge(zoo.randomize(lp), case.config)
    lj.merge(lp, lj.LoraConfig(**case.config.to_dict()))  # equal config: same cache entry
  finally:
    lj._src.adapters.merge.fold = original
  assert len(traces) == 1


def test_merge_dtype_applies_to_adapted_leaves_of_a_bf16_base():
  """dtype= is the dtype of every leaf the merge computes, not only dequantized ones."""
  base = {"dense": {"kernel": jnp.ones((4, 3), jnp.bfloat16), "bias": jnp.ones(3, jnp.bfloat16)}}
  config = lj.LoraConfig(rank=2, targets=r"kernel$", in_axes={r"kernel$": (0,)})
  lp = lj.lift(base, config, key=jax.random.key(0))
  lp = lj.LoraParams(lp.base, jax.tree.map(lambda x: x + 0.01, lp.adapters))
  merged = lj.merge(lp, config, dtype=jnp.float32)
  assert merged["dense"]["kernel"].dtype == jnp.float32
  assert merged["dense"]["bias"].dtype == jnp.bfloat16  # neither adapted nor quantized
  assert lj.merge(lp, config)["dense"]["kernel"].dtype == jnp.bfloat16
  entry = lp.adapters["dense"]["kernel"]
  want = np.float32(1) + config.scale_for("dense/kernel") * (
      np.asarray(entry["a"], np.float32) @ np.asarray(entry["b"], np.float32))
  np.testing.assert_allclose(np.asarray(merged["dense"]["kernel"]), want, rtol=1e-6)
