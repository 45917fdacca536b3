"""Factored execution: equal to merged outputs and gradients, fallbacks, no weight gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj

CASES = {c.name: c for c in zoo.cases()}
F32 = dict(rtol=1e-4, atol=1e-5)


def _loss(apply):
  return lambda lp, x: jnp.mean(jnp.sin(apply(lp, x)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_factored_equals_merged_outputs_and_grads(key, name):
  case = CASES[name]
  lp = zoo.randomize(lj.lift(case.params, case.config, key=key))
  factored = lj.wrap(case.apply, case.config)
  merged = lj.wrap(case.apply, case.config, mode="merge")
  np.testing.assert_allclose(jax.jit(factored)(lp, case.x), jax.jit(merged)(lp, case.x), **F32)
  g_f = jax.jit(jax.grad(_loss(factored)))(lp, case.x)
  g_m = jax.jit(jax.grad(_loss(merged)))(lp, case.x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F32), g_f, g_m)


def _plain(params, x):
  """Plain jnp code exercising nested calls: jit, custom_jvp, custom_vjp, cond, while, scan."""

  @jax.custom_jvp
  def twice(w):
    return 2.0 * w

  twice.defjvp(lambda primals, tangents: (twice(primals[0]), 2.0 * tangents[0]))

  @jax.custom_vjp
  def project(x, w):
    return x @ w

  project.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))

  w1, w2, stack = params["w1"], params["w2"], params["stack"]
  h = jax.jit(lambda x, w: jnp.tanh(x @ w))(x, w1)                     # pjit
  h = project(h, w2)                                                  # custom_vjp
  h = jax.lax.cond(h.sum() > 0, lambda h: h @ w2.T, lambda h: -(h @ w2.T), h)  # cond, x @ W.T
  h = jax.lax.fori_loop(0, 2, lambda i, h: jnp.tanh(h @ w1), h)        # while
  h, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), h, stack)  # scan over stacked W
  return h @ twice(w1)[:, :4]                                          # custom_jvp, slice


def _plain_params():
  k = jax.random.split(jax.random.key(5), 3)
  return {"w1": jax.random.normal(k[0], (8, 8)) / 3, "w2": jax.random.normal(k[1], (8, 6)) / 3,
          "stack": jax.random.normal(k[2], (3, 8, 8)) / 3}


def test_nested_calls_in_plain_jnp(key):
  config = lj.LoraConfig(rank=2, targets=r"^(w1|w2|stack)$", stack_axes={"stack": 1})
  params = _plain_params()
  lp = zoo.randomize(lj.lift(params, config, key=key))
  x = jax.random.normal(key, (4, 8))
  factored, merged = lj.wrap(_plain, config), lj.wrap(_plain, config, mode="merge")
  # Only the custom_jvp function's elementwise use of w1 and the slice fall back.
  with pytest.warns(lj.FallbackWarning) as record:
    out = jax.jit(factored)(lp, x)
  fallen = {str(w.message).split(" is used by ")[1].split("`")[1] for w in record}
  assert fallen <= {"mul", "slice"}, fallen
  np.testing.assert_allclose(out, merged(lp, x), **F32)
  g_f = jax.grad(lambda lp: factored(lp, x).sum())(lp)  # already warned: silent
  g_m = jax.grad(lambda lp: merged(lp, x).sum())(lp)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F32), g_f, g_m)


def test_fallback_warns_once_per_primitive_and_path_and_stays_exact(key):
  config = lj.LoraConfig(rank=2, targets=r"kernel$")
  params = {"kernel": jax.random.normal(key, (6, 6))}
  lp = zoo.randomize(lj.lift(params, config, key=key))
  fn = lambda p, x: x @ p["kernel"] + jnp.sum(p["kernel"] ** 2)  # noqa: E731
  apply = lj.wrap(fn, config)
  x = jnp.ones((2, 6))
  with pytest.warns(lj.FallbackWarning, match=r"kernel is used by `integer_pow`.*exact") as rec:
    out = apply(lp, x)
    apply(lp, x)
  assert len(rec) == 1
  np.testing.assert_allclose(out, fn(lj.merge(lp, config), x), **F32)


def test_vmap(key):
  case = CASES["attention"]
  lp = zoo.randomize(lj.lift(case.params, case.config, key=key))
  apply = lj.wrap(case.apply, case.config)
  batched = jax.vmap(apply, in_axes=(None, 0))(lp, case.x[:, None])
  np.testing.assert_allclose(batched[:, 0], apply(lp, case.x), **F32)


def test_sharded_inputs_on_mesh(key):
  mesh = jax.make_mesh((8,), ("data",))
  case = CASES["dense"]
  lp = zoo.randomize(lj.lift(case.params, case.config, key=key))
  x = jnp.tile(case.x, (2, 1))
  xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
  apply = jax.jit(lj.wrap(case.apply, case.config))
  out = apply(lp, xs)
  assert out.sharding.spec[0] == "data"
  np.testing.assert_allclose(out, lj.wrap(case.apply, case.config, mode="merge")(lp, x), **F32)


def test_dropout_uses_rng_and_is_off_without_it(key):
  case = CASES["dense"]
  config = lj.LoraConfig(rank=4, dropout=0.5)
  lp = zoo.randomize(lj.lift(case.params, config, key=key))
  apply = jax.jit(lj.wrap(case.apply, config))
  merged_out = case.apply(lj.merge(lp, config), case.x)
  np.testing.assert_allclose(apply(lp, case.x), merged_out, **F32)  # no rng: no dropout
  a = apply(lp, case.x, lora_rng=jax.random.key(1))
  b = apply(lp, case.x, lora_rng=jax.random.key(1))
  c = apply(lp, case.x, lora_rng=jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c) and not np.allclose(a, merged_out)
  # Dropout touches only the adapter branch: with B = 0 the output is the base's.
  fresh = lj.lift(case.params, config, key=key)
  np.testing.assert_allclose(apply(fresh, case.x, lora_rng=jax.random.key(1)),
                             case.apply(case.params, case.x), **F32)
  with pytest.raises(ValueError, match=r"LoRA dropout needs mode='factored'"):
    lj.wrap(case.apply, config, mode="merge")(lp, case.x, lora_rng=jax.random.key(1))


def test_dropout_in_scan_differs_per_layer(key):
  """Each scanned layer draws its own dropout mask."""
  config = lj.LoraConfig(rank=2, targets="stack", stack_axes={"stack": 1}, dropout=0.5)
  stack = jnp.stack([jnp.eye(8)] * 2)
  lp = lj.lift({"stack": stack}, config, key=key)
  lp = lj.LoraParams(lp.base, {"stack": {"a": jnp.ones((2, 8, 2)), "b": jnp.ones((2, 2, 8))}})
  def fn(p, x):
    def body(c, w):
      y = c @ w
      return c, y
    return jax.lax.scan(body, x, p["stack"])[1]

  x = jax.random.normal(key, (1, 8))
  out = lj.wrap(fn, config)(lp, x, lora_rng=jax.random.key(3))
  assert not np.allclose(out[0], out[1])


def _compiled(fn, *args):
  return jax.jit(fn).lower(*args).compile()


def _cost(fn, *args):
  analysis = _compiled(fn, *args).cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return analysis["flops"]


def _temp_bytes(fn, *args):
  return _compiled(fn, *args).memory_analysis().temp_size_in_bytes


def _mean_square(out):
  return jnp.mean(out ** 2)


def _lifted(model, x_shape):
  """``(x, params, config, lp)``: the model initialized and lifted with r=8 on every kernel."""
  x = jax.random.normal(jax.random.key(0), x_shape)
  params = jax.jit(model.init)(jax.random.key(1), x)
  config = lj.LoraConfig(rank=8, targets=r"kernel$")
  return x, params, config, lj.lift(params, config, key=jax.random.key(2))


def _floor(model, params, x):
  """``(grad_fn, train, frozen)``: the gradient for every leaf but the kernels (biases,
  LayerNorm parameters), i.e. a forward plus an input-gradient backward."""
  flat = dict(zip(lj.paths(params), jax.tree.leaves(params)))
  train = {p: v for p, v in flat.items() if not p.endswith("kernel")}
  frozen = {p: v for p, v in flat.items() if p.endswith("kernel")}

  def loss(train, frozen):
    joined = {**frozen, **train}
    tree = jax.tree.unflatten(jax.tree.structure(params), [joined[p] for p in lj.paths(params)])
    return _mean_square(model.apply(tree, x))

  return jax.grad(loss), train, frozen


class _Wide(nn.Module):
  @nn.compact
  def __call__(self, x):
    for _ in range(3):
      x = nn.gelu(nn.Dense(512)(x))
    return x


def test_factored_gradient_computes_no_weight_gradient():
  """Structural: a factored LoRA gradient costs the frozen-weight floor, not full fine-tuning."""
  model = _Wide()
  x, params, config, lp = _lifted(model, (64, 512))
  floor_flops = _cost(*_floor(model, params, x))
  full_flops = _cost(jax.grad(lambda p: _mean_square(model.apply(p, x))), params)
  lora = lambda mode: jax.grad(  # noqa: E731
      lambda lp: _mean_square(lj.wrap(model.apply, config, mode=mode)(lp, x)))
  factored_flops = _cost(lora("factored"), lp)
  merged_flops = _cost(lora("merge"), lp)
  assert factored_flops <= 1.06 * floor_flops, (factored_flops, floor_flops)
  assert merged_flops >= 1.3 * floor_flops, (merged_flops, floor_flops)
  assert full_flops >= 1.3 * floor_flops, (full_flops, floor_flops)


class _Mlp(nn.Module):
  """Pre-norm residual MLP blocks: the adapted kernels' inputs are LayerNorm and GELU outputs."""

  @nn.compact
  def __call__(self, x):
    for _ in range(2):
      h = nn.gelu(nn.Dense(1024)(nn.LayerNorm()(x)))
      x = x + nn.Dense(256)(h)
    return x


def test_backward_keeps_no_extra_activation_for_elementwise_adapter_inputs():
  """Structural: LoRA's dA needs each adapted product's input; when that input is an
  elementwise function (GELU, LayerNorm's affine part) of values the backward pass keeps
  anyway, it is recomputed. Keeping the inputs instead costs 1.5x the frozen floor's
  temporary memory on this model; recomputing them 1.16x (XLA:CPU, buffer packing)."""
  model = _Mlp()
  x, params, config, lp = _lifted(model, (512, 256))
  floor_bytes = _temp_bytes(*_floor(model, params, x))
  apply = lj.wrap(model.apply, config)
  factored_bytes = _temp_bytes(
      jax.grad(lambda ad, base: _mean_square(apply(lj.LoraParams(base, ad), x))),
      lp.adapters, lp.base)
  assert factored_bytes <= 1.25 * floor_bytes, (factored_bytes, floor_bytes)


def test_recomputed_inputs_give_exact_gradients(key):
  """The recomputed cone feeds several adapted products, has integer leaves, a custom_jvp
  (relu) and a trainable leaf (the bias), and its value is also used outside the products."""
  config = lj.LoraConfig(rank=2, targets=r"^w\d$", trainable=r"^bias$")
  k = jax.random.split(key, 3)
  params = {"w1": jax.random.normal(k[0], (6, 5)), "w2": jax.random.normal(k[1], (5, 6)),
            "bias": jnp.linspace(-1.0, 1.0, 6)}
  lp = zoo.randomize(lj.lift(params, config, key=key))

  def fn(p, x):
    keep = jnp.arange(6) % 3 != 0                       # integer leaf of the cone
    h = jnp.where(keep, jax.nn.relu(x + p["bias"]), 0.5 * x) * 1.5
    return jnp.tanh(h @ p["w1"]) @ p["w2"] + jnp.sum(h, axis=-1, keepdims=True)

  x = jax.random.normal(k[2], (16, 6))
  factored, merged = lj.wrap(fn, config), lj.wrap(fn, config, mode="merge")
  np.testing.assert_allclose(jax.jit(factored)(lp, x), merged(lp, x), **F32)
  grad = lambda apply: jax.grad(lambda lp, x: jnp.sum(jnp.sin(apply(lp, x))), (0, 1))  # noqa: E731
  g_f = jax.jit(grad(factored))(lp, x)
  g_m = grad(merged)(lp, x)
  assert float(jnp.abs(g_m[0].base["bias"]).max()) > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F32), g_f, g_m)


def test_wrapped_step_does_not_retrace(key):
  case = CASES["attention"]
  traces = []
  apply = lj.wrap(case.apply, case.config)

  @jax.jit
  def step(lp, x):
    traces.append(1)
    return jax.grad(_loss(apply))(lp, x)

  lp = lj.lift(case.params, case.config, key=key)
  step(lp, case.x)
  step(zoo.randomize(lp), case.x + 1.0)
  assert len(traces) == 1


def test_unknown_mode():
  with pytest.raises(ValueError, match=r"mode must be one of \('factored', 'merge'\)"):
    lj.wrap(lambda p, x: x, lj.LoraConfig(), mode="fast")
