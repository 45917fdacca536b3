"""MoE expert kernels: per-expert adapters stay factored through batched einsums and ragged_dot."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj

E, C, D, F, R = 4, 3, 16, 32, 2
S = jax.ShapeDtypeStruct


def _params(dtype=jnp.float32):
  k = jax.random.split(jax.random.key(0), 2)
  return {"moe": {"w_in": jax.random.normal(k[0], (E, D, F)).astype(dtype) / 4,
                  "w_out": jax.random.normal(k[1], (E, F, D)).astype(dtype) / 4}}


def einsum_moe(p, x):  # x: (experts, capacity, D), tokens already dispatched
  h = jax.nn.gelu(jnp.einsum("ECD,EDF->ECF", x, p["moe"]["w_in"]))
  return jnp.einsum("ECF,EFD->ECD", h, p["moe"]["w_out"])


def transposed_moe(p, x):  # the weight as the left operand: dot_general(W, x)
  h = jnp.einsum("EDF,ECD->EFC", p["moe"]["w_in"], x)
  return jnp.einsum("EFC,EFD->ECD", jax.nn.gelu(h), p["moe"]["w_out"])


GROUPS = jnp.array([2, 0, 5, 5], jnp.int32)  # tokens per expert, one expert empty


def ragged_moe(p, x):  # x: (tokens, D), sorted by expert
  h = jax.nn.gelu(jax.lax.ragged_dot(x, p["moe"]["w_in"], GROUPS))
  return jax.lax.ragged_dot(h, p["moe"]["w_out"], GROUPS)


CASES = [(einsum_moe, (E, C, D)), (transposed_moe, (E, C, D)), (ragged_moe, (12, D))]


@pytest.mark.parametrize("fn, x_shape", CASES, ids=["einsum", "weight-lhs", "ragged_dot"])
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 5e-2)])
def test_expert_adapters_stay_factored(fn, x_shape, dtype, tol):
  params = _params(dtype)
  config = lj.infer_axes(fn, params, S(x_shape, dtype),
                         config=lj.LoraConfig(rank=R, targets=r"w_(in|out)$"))
  lp = lj.lift(params, config, key=jax.random.key(1))
  assert lp.adapters["moe"]["w_in"]["a"].shape == (E, D, R)   # one adapter per expert
  lp = lj.LoraParams(lp.base, jax.tree.map(
      lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), lp.adapters))
  x = jax.random.normal(jax.random.key(3), x_shape).astype(dtype)
  apply = lj.wrap(fn, config)
  loss = lambda lp: jnp.sum(apply(lp, x).astype(jnp.float32) ** 2)  # noqa: E731
  with warnings.catch_warnings():
    warnings.simplefilter("error", lj.FallbackWarning)
    out = jax.jit(apply)(lp, x)
    grads = jax.jit(jax.grad(loss))(lp)
  merged = lj.wrap(fn, config, mode="merge")
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(fn(lj.merge(lp, config), x), np.float32),
                             rtol=tol, atol=tol)
  reference = jax.grad(lambda lp: jnp.sum(merged(lp, x).astype(jnp.float32) ** 2))(lp)
  for g, r in zip(jax.tree.leaves(grads.adapters), jax.tree.leaves(reference.adapters)):
    scale = float(jnp.max(jnp.abs(r))) + 1e-6
    np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(r) / scale, atol=tol)


@pytest.mark.parametrize("fn, x_shape", CASES, ids=["einsum", "weight-lhs", "ragged_dot"])
def test_no_weight_sized_product_in_the_training_step(fn, x_shape):
  """Structural: the factored step costs about the frozen model, far below the merged one."""
  params = _params()
  config = lj.infer_axes(fn, params, S(x_shape, jnp.float32),
                         config=lj.LoraConfig(rank=R, targets=r"w_(in|out)$"))
  lp = lj.lift(params, config, key=jax.random.key(1))
  x = jnp.ones(x_shape)

  def flops(apply):
    step = jax.jit(jax.grad(lambda lp: jnp.sum(apply(lp, x) ** 2)))
    return step.lower(lp).compile().cost_analysis()["flops"]

  frozen = jax.jit(jax.grad(lambda x: jnp.sum(fn(params, x) ** 2)))
  floor = frozen.lower(x).compile().cost_analysis()["flops"]
  factored = flops(lj.wrap(fn, config))
  merged = flops(lj.wrap(fn, config, mode="merge"))
  assert factored < merged
  assert factored <= 1.15 * floor, (factored, floor)  # measured 1.06 (einsum), 1.09 (ragged)


def test_ragged_dot_dropout_and_input_gradients_match_a_reference():
  """Dropout on the adapter branch only; gradients for x and A, B of both experts' kernels
  (w_out's input, a GELU output, is recomputed in the backward pass)."""
  params = _params()
  config = lj.infer_axes(ragged_moe, params, S((12, D), jnp.float32),
                         config=lj.LoraConfig(rank=R, alpha=2.0 * R, dropout=0.5,
                                              targets=r"w_(in|out)$"))
  lp = lj.lift(params, config, key=jax.random.key(1))
  names = ("w_in", "w_out")
  factors = [jax.random.normal(jax.random.key(2 + i), lp.adapters["moe"][n][p].shape) / 4
             for i, (n, p) in enumerate((n, p) for n in names for p in "ab")]
  x = jax.random.normal(jax.random.key(9), (12, D))
  key = jax.random.key(5)
  # The masks the interpreter draws: each use's fold of the key, in order of use.
  keep_in, keep_out = (
      jax.random.bernoulli(jax.random.fold_in(key, i), 0.5, shape).astype(x.dtype) / 0.5
      for i, shape in enumerate([(12, D), (12, F)]))
  w_in, w_out = params["moe"]["w_in"], params["moe"]["w_out"]

  def adapted(v, keep, w, a, b):
    low = jax.lax.ragged_dot(jax.lax.ragged_dot(v * keep, a, GROUPS), b, GROUPS)
    return jax.lax.ragged_dot(v, w, GROUPS) + 2.0 * low

  def reference(x, a_in, b_in, a_out, b_out):
    h = jax.nn.gelu(adapted(x, keep_in, w_in, a_in, b_in))
    return jnp.sum(adapted(h, keep_out, w_out, a_out, b_out) ** 2)

  apply = lj.wrap(ragged_moe, config)

  def loss(x, a_in, b_in, a_out, b_out):
    adapters = {"moe": {"w_in": {"a": a_in, "b": b_in}, "w_out": {"a": a_out, "b": b_out}}}
    return jnp.sum(apply(lj.LoraParams(lp.base, adapters), x, lora_rng=key) ** 2)

  np.testing.assert_allclose(jax.jit(loss)(x, *factors), reference(x, *factors), rtol=1e-4)
  argnums = tuple(range(5))
  grads = jax.jit(jax.grad(loss, argnums=argnums))(x, *factors)
  expected = jax.grad(reference, argnums=argnums)(x, *factors)
  for g, r in zip(grads, expected):
    scale = float(jnp.max(jnp.abs(r)))
    np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(r) / scale, atol=1e-4)


def test_per_group_gradients_agree_between_cpu_and_accelerator_forms():
  """The masked form (XLA:CPU) and ragged_dot's transpose (GPU/TPU) of dA and dB agree."""
  from lora_jax._src.factored import experts  # noqa: PLC0415

  k = jax.random.split(jax.random.key(0), 4)
  xd, g = jax.random.normal(k[0], (12, D)), jax.random.normal(k[1], (12, R))
  xa, dy = jax.random.normal(k[2], (12, R)), jax.random.normal(k[3], (12, F))
  sizes = jnp.array([2, 0, 5, 3], jnp.int32)  # 2 rows belong to no group
  masked = experts.group_grads_masked(xd, g, xa, dy, sizes, E, jnp.float32, None)
  transposed = experts.group_grads_transposed(xd, g, xa, dy, sizes, E, jnp.float32, None)
  for m, t in zip(masked, transposed):
    assert m.shape == t.shape
    np.testing.assert_allclose(m, t, rtol=1e-5, atol=1e-5)
