"""Adapters follow the base's shardings on an 8-device CPU mesh; merge keeps them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj


@pytest.fixture(scope="module")
def mesh():
  if jax.device_count() < 8:
    pytest.fail("tests need XLA_FLAGS=--xla_force_host_platform_device_count=8 (conftest.py)")
  return jax.make_mesh((2, 4), ("data", "model"))


def _params(mesh):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
  return {
      "up": {"kernel": put(jax.random.normal(k1, (16, 32)), P("data", "model")),
             "bias": put(jnp.zeros(32), P("model"))},
      "qkv": {"kernel": put(jax.random.normal(k2, (16, 4, 8)), P(None, "model", "data")),
              "bias": put(jnp.zeros((4, 8)), P("model", "data"))},
      "stack": {"kernel": put(jax.random.normal(k3, (4, 16, 8)), P("data", None, "model"))},
  }


CONFIG = lj.LoraConfig(rank=4, targets=r"kernel$", stack_axes={r"^stack/": 1})


def test_adapters_follow_base_sharding(mesh):
  lp = lj.lift(_params(mesh), CONFIG, key=jax.random.key(1))
  ad = lp.adapters
  assert ad["up"]["kernel"]["a"].sharding.spec == P("data", None)
  assert ad["up"]["kernel"]["b"].sharding.spec == P(None, "model")
  assert ad["qkv"]["kernel"]["a"].sharding.spec == P(None, None)
  assert ad["qkv"]["kernel"]["b"].sharding.spec == P(None, "model", "data")
  assert ad["stack"]["kernel"]["a"].sharding.spec == P("data", None, None)
  assert ad["stack"]["kernel"]["b"].sharding.spec == P("data", None, "model")


def test_abstract_lift_carries_shardings(mesh):
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _params(mesh))
  lp = lj.lift(abstract, CONFIG, key=jax.random.key(1))
  b = lp.adapters["up"]["kernel"]["b"]
  assert isinstance(b, jax.ShapeDtypeStruct)
  assert b.sharding == NamedSharding(mesh, P(None, "model"))


def test_merge_keeps_base_shardings_and_values(mesh):
  params = _params(mesh)
  lp = lj.lift(params, CONFIG, key=jax.random.key(1))
  lp = lj.LoraParams(lp.base, jax.tree.map(lambda x: x + 0.01, lp.adapters))
  merged = lj.merge(lp, CONFIG)
  for m, p in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    assert m.sharding.is_equivalent_to(p.sharding, m.ndim), (m.sharding, p.sharding)
  host = jax.device_get(lp)
  ref = lj.merge(host, CONFIG)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), merged, ref)


def test_sharded_forward_and_grad(mesh):
  params = _params(mesh)
  lp = lj.lift(params, CONFIG, key=jax.random.key(1))
  x = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P("data", None)))
  apply = lj.wrap(lambda p, x: jnp.tanh(x @ p["up"]["kernel"] + p["up"]["bias"]), CONFIG)
  loss = lambda lp, x: jnp.sum(apply(lp, x) ** 2)  # noqa: E731
  grads = jax.jit(jax.grad(loss))(lp, x)
  assert grads.adapters["up"]["kernel"]["a"].shape == (16, 4)
  np.testing.assert_allclose(jax.jit(apply)(lp, x), apply(jax.device_get(lp), np.ones((8, 16))),
                             rtol=1e-5, atol=1e-5)


def test_dora_on_a_sharded_base(mesh):
  """DoRA magnitudes follow B's output-axis shardings (plain, multi-axis and stacked kernels);
  on the explicitly sharded mesh, factored values and gradients equal unsharded ones."""
  params = _params(mesh)
  config = lj.LoraConfig(**{**CONFIG.to_dict(), "use_dora": True})
  lp = lj.lift(params, config, key=jax.random.key(1))
  ad = lp.adapters
  assert ad["up"]["kernel"]["m"].sharding.spec == P("model")
  assert ad["qkv"]["kernel"]["m"].sharding.spec == P("model", "data")
  assert ad["stack"]["kernel"]["m"].sharding.spec == P("data", "model")
  lp = lj.LoraParams(lp.base, jax.tree.map(lambda x: x * 1.1 + 0.01, lp.adapters))
  x = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P("data", None)))

  x2 = jax.device_put(jnp.full((8, 16), 0.5), NamedSharding(mesh, P(None, None)))

  def f(p, x, x2):
    h = jnp.tanh(x @ p["up"]["kernel"] + p["up"]["bias"])
    q = jnp.tanh(jnp.einsum("bi,ihd->bhd", x2, p["qkv"]["kernel"]))
    return jnp.sum(h ** 2) + jnp.sum(q ** 2)

  apply = lj.wrap(f, config)
  host = jax.device_get(lp)
  plain = (np.ones((8, 16)), np.full((8, 16), 0.5))
  np.testing.assert_allclose(jax.jit(apply)(lp, x, x2), apply(host, *plain), rtol=1e-5)
  grads, want = jax.jit(jax.grad(apply))(lp, x, x2), jax.grad(apply)(host, *plain)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):  # float32 sums of up to 10
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(np.abs(w).max()))


def test_factored_multi_axis_and_stacked_kernels_on_auto_mesh():
  """GSPMD-style (Auto axes) sharding with DenseGeneral-like and scanned kernels."""
  auto = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  params = _params(auto)
  lp = lj.lift(params, CONFIG, key=jax.random.key(1))
  lp = lj.LoraParams(lp.base, jax.tree.map(lambda x: x + 0.05, lp.adapters))
  x = jax.device_put(jnp.ones((8, 16)), NamedSharding(auto, P("data", None)))

  def fn(p, x):
    h = jnp.einsum("bd,dhk->bhk", x, p["qkv"]["kernel"]) + p["qkv"]["bias"]
    h = h.reshape(8, 32)[:, :16]
    h, _ = jax.lax.scan(lambda c, w: (jnp.tanh(0.05 * (c @ w @ w.T)), None), 0.1 * h,
                        p["stack"]["kernel"])
    return h

  factored = lj.wrap(fn, CONFIG)
  loss = lambda lp, x: jnp.sum(factored(lp, x) ** 2)  # noqa: E731
  out = jax.jit(factored)(lp, x)
  grads = jax.jit(jax.grad(loss))(lp, x)
  assert grads.adapters["qkv"]["kernel"]["b"].shape == (4, 4, 8)
  host = jax.device_get(lp)
  merged = lj.wrap(fn, CONFIG, mode="merge")
  np.testing.assert_allclose(out, merged(host, np.ones((8, 16), np.float32)),
                             rtol=1e-5, atol=1e-5)
  ref = jax.grad(lambda lp: jnp.sum(merged(lp, np.ones((8, 16), np.float32)) ** 2))(host)
  # Sums reduced across 8 devices in another order than on the host: looser float32 bound.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-3, atol=2e-4 * np.abs(b).max()), grads.adapters, ref.adapters)


def test_factored_mlp_on_explicit_mesh_recomputes_and_matches(mesh):
  """Megatron-style MLP (column- then row-parallel) with GELU between the adapted kernels.

  Enough rows that the training forward pass takes the one-product form, and a
  GELU input that the backward pass recomputes, both under explicit sharding.
  """
  # Explicit axes stated: jax.make_mesh's default axis type changed from Auto to Explicit in 0.8.
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
  params = {"up": {"kernel": put(jax.random.normal(k1, (16, 32)) / 4, P(None, "model")),
                   "bias": put(jnp.full(32, 0.1), P("model"))},
            "down": {"kernel": put(jax.random.normal(k2, (32, 16)) / 6, P("model", None))}}
  config = lj.LoraConfig(rank=4, targets=r"kernel$", trainable=r"bias$")
  lp = lj.lift(params, config, key=jax.random.key(1))
  lp = lj.LoraParams(lp.base, jax.tree.map(lambda x: x + 0.05, lp.adapters))
  x = jax.random.normal(k3, (64, 16))

  def fn(p, x):
    h = jax.nn.gelu(x @ p["up"]["kernel"] + p["up"]["bias"])
    rows = NamedSharding(mesh, P("data", None)) if jax.typeof(h).sharding.mesh.shape else None
    return jnp.matmul(h, p["down"]["kernel"], out_sharding=rows)  # row-parallel: reduce

  factored = lj.wrap(fn, config)
  loss = lambda lp, x: jnp.sum(jnp.sin(factored(lp, x)))  # noqa: E731
  xs = put(x, P("data", None))
  out = jax.jit(factored)(lp, xs)
  grads = jax.jit(jax.grad(loss))(lp, xs)
  host = jax.device_get(lp)
  merged = lj.wrap(fn, config, mode="merge")
  np.testing.assert_allclose(out, merged(host, np.asarray(x)), rtol=1e-5, atol=1e-5)
  ref = jax.grad(lambda lp: jnp.sum(jnp.sin(merged(lp, np.asarray(x)))))(host)
  assert float(jnp.abs(ref.base["up"]["bias"]).max()) > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-3, atol=2e-4 * np.abs(b).max()), (grads.adapters, grads.base["up"]["bias"]),
      (ref.adapters, ref.base["up"]["bias"]))


def test_bf16_base_on_explicit_mesh_accumulates_in_float32():
  """bf16 kernels sharded column- then row-parallel, float32 adapters: the mixed-dtype
  products keep their shardings, outputs stay bf16, adapter gradients float32."""
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
  params = {"up": {"kernel": put((jax.random.normal(k1, (16, 32)) / 4).astype(jnp.bfloat16),
                                 P(None, "model"))},
            "down": {"kernel": put((jax.random.normal(k2, (32, 16)) / 6).astype(jnp.bfloat16),
                                   P("model", None))}}
  config = lj.LoraConfig(rank=4, targets=r"kernel$")
  lp = lj.lift(params, config, key=jax.random.key(1))
  lp = lj.LoraParams(lp.base, jax.tree.map(lambda x: x + 0.05, lp.adapters))
  x = jax.random.normal(k3, (64, 16)).astype(jnp.bfloat16)

  def fn(p, x):
    h = jax.nn.gelu(x @ p["up"]["kernel"])
    rows = NamedSharding(mesh, P("data", None)) if jax.typeof(h).sharding.mesh.shape else None
    return jnp.matmul(h, p["down"]["kernel"], out_sharding=rows)

  factored = lj.wrap(fn, config)
  loss = lambda lp, x: jnp.sum(jnp.sin(factored(lp, x).astype(jnp.float32)))  # noqa: E731
  xs = put(x, P("data", None))
  out = jax.jit(factored)(lp, xs)
  grads = jax.jit(jax.grad(loss))(lp, xs)
  assert out.dtype == jnp.bfloat16
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads.adapters))
  # Reference: the same bf16 values in float32, W + s·A·B formed in float32.
  host32 = jax.tree.map(lambda v: np.asarray(v, np.float32), jax.device_get(lp))
  merged = lj.wrap(fn, config, mode="merge")
  ref_out = merged(host32, np.asarray(x, np.float32))
  np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, rtol=2e-2, atol=2e-2)
  ref = jax.grad(lambda lp: jnp.sum(jnp.sin(merged(lp, np.asarray(x, np.float32)))))(host32)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=3e-2, atol=3e-2 * np.abs(b).max()), grads.adapters, ref.adapters)
