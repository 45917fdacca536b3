"""DoRA: factored outputs and gradients equal a plain reference that forms the weight.

The reference forms ``V = W + s·A·B`` with plain reshapes and a matmul, takes the norm of
each output unit over the input axes (held constant, as in the DoRA paper §4.3 and PEFT),
and applies ``m ⊙ V / ‖V‖`` with the model's own code.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import zoo
from architectures import architectures

import lora_jax as lj

F32 = dict(rtol=2e-4, atol=2e-5)


def dora_config(config: lj.LoraConfig, **changes) -> lj.LoraConfig:
  return lj.LoraConfig(**{**config.to_dict(), "use_dora": True, **changes})


def dora_weight(w, entry, target):
  """``m ⊙ V / stop_gradient(‖V‖)`` with V formed, norm over the target's input axes."""
  stack, ins, outs = target.axes
  perm = stack + ins + outs
  moved = jnp.transpose(w, perm).astype(jnp.float32)
  s_size = int(np.prod([w.shape[p] for p in stack]))
  i_size = int(np.prod([w.shape[p] for p in ins]))
  o_size = int(np.prod([w.shape[p] for p in outs]))
  r = entry["a"].shape[-1]
  a = entry["a"].reshape(s_size, i_size, r).astype(jnp.float32)
  b = entry["b"].reshape(s_size, r, o_size).astype(jnp.float32)
  v = moved.reshape(s_size, i_size, o_size) + target.scale * jnp.einsum(
      "sir,sro->sio", a, b, precision=jax.lax.Precision.HIGHEST)
  norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(v * v, axis=1, keepdims=True)))
  out = entry["m"].reshape(s_size, 1, o_size).astype(jnp.float32) * v / norm
  return jnp.transpose(out.reshape(moved.shape), np.argsort(perm)).astype(w.dtype)


def reference_params(params, adapters, config):
  targets = {t.path: t for t in lj.plan(params, config)}

  def entry(path):
    node = adapters
    for part in path.split("/"):
      node = node[part]
    return node

  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [
      dora_weight(w, entry(p), targets[p]) if p in targets else w
      for p, w in zip(lj.paths(params), leaves)])


def _randomized(lp, scale=0.1):
  """B non-zero and m away from ‖W‖, so that both the direction and the magnitude matter."""
  lp = zoo.randomize(lp, scale=scale)
  return lj.LoraParams(lp.base, jax.tree.map(lambda v: v, lp.adapters))


def _loss(apply):
  return lambda adapters, base, x: jnp.mean(jnp.sin(apply(lj.LoraParams(base, adapters), x)
                                                    .astype(jnp.float32)))


CASES = {c.name: c for c in zoo.cases()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_factored_and_merge_equal_the_reference(key, name):
  """Dense, attention (DenseGeneral), conv, embedding lookup and x @ E.T, scan, remat, NNX."""
  case = CASES[name]
  config = dora_config(case.config)
  lp = _randomized(lj.lift(case.params, config, key=key))
  assert all("m" in e for e in jax.tree.leaves(
      lp.adapters, is_leaf=lambda n: isinstance(n, dict) and "a" in n))

  def reference(adapters, base, x):
    return case.apply(reference_params(base, adapters, config), x)

  want = jax.jit(reference)(lp.adapters, lp.base, case.x)
  want_grads = jax.jit(jax.grad(lambda *a: jnp.mean(jnp.sin(reference(*a)))))(
      lp.adapters, lp.base, case.x)
  for mode in ("factored", "merge"):
    apply = lj.wrap(case.apply, config, mode=mode)
    with warnings.catch_warnings():
      warnings.simplefilter("error", lj.FallbackWarning)
      out = jax.jit(apply)(lp, case.x)
      grads = jax.jit(jax.grad(_loss(apply)))(lp.adapters, lp.base, case.x)
    np.testing.assert_allclose(out, want, **F32, err_msg=mode)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(g, r, **F32, err_msg=mode)
  merged = lj.merge(lp, config)
  np.testing.assert_allclose(case.apply(merged, case.x), want, **F32)


class _Einsum(nn.Module):
  """Gemma-style einsum kernels, with explicit axes: q (heads, embed, head_dim) and an output
  projection used as x @ W.T."""

  @nn.compact
  def __call__(self, x):
    q = self.param("q", nn.initializers.normal(0.3), (4, 12, 6))
    o = self.param("o", nn.initializers.normal(0.3), (12, 24))  # stored (out, in)
    h = jnp.einsum("btd,ndh->btnh", x, q).reshape(*x.shape[:2], 24)
    return jnp.tanh(h) @ o.T


def test_explicit_axes_and_transposed_use(key):
  x = jax.random.normal(jax.random.key(1), (2, 5, 12))
  params = _Einsum().init(jax.random.key(2), x)
  config = lj.LoraConfig(rank=3, targets=r"/(q|o)$", use_dora=True,
                         in_axes={r"/q$": (1,), r"/o$": (1,)})
  lp = _randomized(lj.lift(params, config, key=key))
  assert lp.adapters["params"]["q"]["m"].shape == (4, 6)    # per head and head_dim
  assert lp.adapters["params"]["o"]["m"].shape == (12,)
  apply = lj.wrap(_Einsum().apply, config)
  want = _Einsum().apply(reference_params(lp.base, lp.adapters, config), x)
  np.testing.assert_allclose(jax.jit(apply)(lp, x), want, **F32)
  grads = jax.grad(_loss(apply))(lp.adapters, lp.base, x)
  want_grads = jax.grad(lambda ad: jnp.mean(jnp.sin(_Einsum().apply(
      reference_params(lp.base, ad, config), x))))(lp.adapters)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, **F32), grads, want_grads)


ARCHS = {a.name: a for a in architectures()}
# The models whose rules the other DoRA tests do not reach: bf16 einsums with a tied embedding
# (lookup and x @ E.T), ragged_dot experts, depthwise convolutions. (Llama's and ViT's Dense
# and convolution kernels are the cases above.)
ZOO = ("gemma_nnx_bf16", "moe_ragged_dot", "resnet_depthwise")


@pytest.mark.parametrize("name", ZOO)
def test_zoo_models_stay_factored_and_exact(name):
  """Gemma (bf16 einsums, tied embedding), MoE (ragged_dot experts), ResNet (depthwise): no
  fallback, factored equal to merged, gradients too."""
  arch = ARCHS[name]
  config = lj.infer_axes(arch.apply, arch.params, arch.x, config=lj.LoraConfig(
      rank=arch.rank, targets=arch.targets, use_dora=True))
  lp = _randomized(lj.lift(arch.params, config, key=jax.random.key(0)))
  factored = lj.wrap(arch.apply, config)
  merged = lj.wrap(arch.apply, config, mode="merge")
  with warnings.catch_warnings():
    warnings.simplefilter("error", lj.FallbackWarning)
    out = jax.jit(factored)(lp, arch.x)
    grads = jax.jit(jax.grad(_loss(factored)))(lp.adapters, lp.base, arch.x)
  want = jax.jit(merged)(lp, arch.x)
  scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
  np.testing.assert_allclose(np.asarray(out, np.float32) / scale,
                             np.asarray(want, np.float32) / scale, atol=arch.tol)
  reference = jax.jit(jax.grad(_loss(merged)))(lp.adapters, lp.base, arch.x)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)):
    g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
    top = float(np.max(np.abs(r))) + 1e-12
    np.testing.assert_allclose(g / top, r / top, atol=max(arch.tol, 1e-4) * 10)


def test_bf16_base_is_within_a_bf16_step(key):
  """A bf16 base: the factored output is within one bf16 step (plus the hidden layer's own
  rounding) of the float32 reference."""
  case = CASES["dense"]
  params = jax.tree.map(lambda v: v.astype(jnp.bfloat16), case.params)
  config = dora_config(case.config)
  lp = _randomized(lj.lift(params, config, key=key))
  x = case.x.astype(jnp.bfloat16)
  out = np.asarray(jax.jit(lj.wrap(case.apply, config))(lp, x), np.float32)
  up = lambda v: v.astype(jnp.float32)  # noqa: E731
  want = np.asarray(case.apply(reference_params(jax.tree.map(up, params), lp.adapters, config),
                               up(x)))
  step = np.abs(want) * 2.0 ** -7 + 1e-2  # the MLP's hidden layer is rounded to bf16 too
  assert np.all(np.abs(out - want) <= step)


def test_lift_starts_at_the_base_with_m_the_weight_norm(key):
  case = CASES["conv"]
  config = dora_config(case.config)
  lp = lj.lift(case.params, config, key=key)
  for target in lj.plan(case.params, config):
    node = lp.adapters
    for part in target.path.split("/"):
      node = node[part]
    w = np.asarray(lp.base["params"][target.path.split("/")[1]]["kernel"])
    np.testing.assert_allclose(node["m"], np.sqrt((w ** 2).sum(axis=(0, 1, 2))), rtol=1e-6)
  np.testing.assert_allclose(lj.wrap(case.apply, config)(lp, case.x),
                             case.apply(case.params, case.x), rtol=1e-5, atol=1e-6)
  abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), case.params)
  shapes = lj.lift(abstract, config, key=key).adapters["params"]["Conv_0"]["kernel"]
  assert shapes["m"].shape == (8,) and isinstance(shapes["m"], jax.ShapeDtypeStruct)


def test_dora_pattern_and_summary(key):
  case = CASES["dense"]
  config = lj.LoraConfig(rank=4, dora_pattern={r"Dense_1": True})
  lp = lj.lift(case.params, config, key=key)
  assert "m" in lp.adapters["params"]["Dense_1"]["kernel"]
  assert "m" not in lp.adapters["params"]["Dense_0"]["kernel"]
  text = str(lj.summary(lp, config))
  assert "DoRA m shape" in text and "(8,)" in text
  assert lj.summary(lp, config).adapter_params == 16 * 4 + 4 * 32 + 32 * 4 + 4 * 8 + 8
  with pytest.raises(ValueError, match=r"dora_pattern pattern 'nowhere' matches none of the "
                     "adapted paths"):
    lj.lift(case.params, lj.LoraConfig(dora_pattern={"nowhere": True}), key=key)
  with pytest.raises(TypeError, match=r"dora_pattern\['x'\] must be True or False, got 1"):
    lj.LoraConfig(dora_pattern={"x": 1})
  with pytest.raises(TypeError, match=r"use_dora must be True or False"):
    lj.LoraConfig(use_dora="yes")


def test_adapters_of_the_other_kind_are_refused(key, tmp_path):
  case = CASES["dense"]
  config = dora_config(case.config)
  lp = lj.lift(case.params, config, key=key)
  plain = lj.LoraConfig(**{**config.to_dict(), "use_dora": False})
  with pytest.raises(ValueError, match=r"params/Dense_0/kernel: the adapter has a DoRA magnitude "
                     r"'m', but the config says use_dora=False"):
    lj.wrap(case.apply, plain)(lp, case.x)
  with pytest.raises(ValueError, match=r"unmerge cannot undo a DoRA merge"):
    lj.unmerge(lj.merge(lp, config), lp.adapters, config)
  lj.save_adapters(tmp_path / "ckpt", lp, config)
  loaded, loaded_config = lj.load_adapters(tmp_path / "ckpt")
  assert loaded_config.use_dora
  jax.tree.map(np.testing.assert_array_equal, loaded.adapters, lp.adapters)
  with pytest.raises(ValueError, match=r"has a DoRA magnitude 'm', but the config says "
                     r"use_dora=False here"):
    lj.save_adapters(tmp_path / "other", lp, plain)


def test_streaming_merge_and_inspect(key, tmp_path, capsys):
  import orbax.checkpoint as ocp

  from lora_jax._src.cli.main import main as cli

  case = CASES["attention"]
  config = dora_config(case.config)
  lp = _randomized(lj.lift(case.params, config, key=key))
  ocp.StandardCheckpointer().save(tmp_path / "base", case.params)
  ocp.StandardCheckpointer().wait_until_finished()
  lj.save_adapters(tmp_path / "adapters", lp, config)
  assert cli(["merge", "--base", str(tmp_path / "base"), "--adapters", str(tmp_path / "adapters"),
              "--out", str(tmp_path / "merged")]) == 0
  merged = ocp.StandardCheckpointer().restore(tmp_path / "merged")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               merged, lj.merge(lp, config))
  assert cli(["inspect", str(tmp_path / "adapters")]) == 0
  out = capsys.readouterr().out
  assert "DoRA m shape" in out and f"{lj.summary(lp, config).adapter_params:,} adapter" in out


def test_optimizer_trains_m_with_no_state_for_the_base(key):
  case = CASES["dense"]
  config = dora_config(case.config)
  lp = _randomized(lj.lift(case.params, config, key=key))
  tx = lj.optimizer(optax.adam(1e-2), config, freeze_a=True)
  state = tx.init(lp)
  with jax.numpy_dtype_promotion("standard"):
    grads = jax.grad(lambda p: _loss(lj.wrap(case.apply, config))(p.adapters, p.base, case.x))(lp)
    updates, _ = tx.update(grads, state, lp)
  new = optax.apply_updates(lp, updates)
  kernel = lambda p: p.adapters["params"]["Dense_0"]["kernel"]  # noqa: E731
  assert not np.allclose(kernel(new)["m"], kernel(lp)["m"])
  np.testing.assert_array_equal(kernel(new)["a"], kernel(lp)["a"])  # LoRA-FA: A frozen


def test_principal_init_with_dora_starts_at_the_base(key):
  case = CASES["dense"]
  config = dora_config(case.config, init="pissa")
  lp = lj.lift(case.params, config, key=key)
  np.testing.assert_allclose(lj.wrap(case.apply, config)(lp, case.x),
                             case.apply(case.params, case.x), rtol=1e-4, atol=1e-5)
  trained = _randomized(lp)
  adapters, standard = lj.principal_to_lora(trained, lp, config)
  np.testing.assert_allclose(
      lj.wrap(case.apply, standard)(lj.LoraParams(case.params, adapters), case.x),
      lj.wrap(case.apply, config)(trained, case.x), rtol=1e-4, atol=1e-5)


def test_dropout_reaches_the_adapter_branch_only(key):
  case = CASES["dense"]
  config = dora_config(case.config, dropout=0.5)
  lp = _randomized(lj.lift(case.params, config, key=key))
  apply = lj.wrap(case.apply, config)
  a = apply(lp, case.x, lora_rng=jax.random.key(1))
  b = apply(lp, case.x, lora_rng=jax.random.key(2))
  assert not np.allclose(a, b)
  # Without adapters' contribution (B = 0) dropout changes nothing: c·(x·W + 0) for any mask.
  zero_b = jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.zeros_like(v) if p[-1].key == "b" else v, lp.adapters)
  lp0 = lj.LoraParams(lp.base, zero_b)
  np.testing.assert_allclose(apply(lp0, case.x, lora_rng=jax.random.key(1)), apply(lp0, case.x),
                             rtol=1e-6)


def _cost(fn, *args):
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost["flops"], compiled.memory_analysis().temp_size_in_bytes


class _Tower(nn.Module):
  @nn.compact
  def __call__(self, x):
    for _ in range(3):
      x = x + nn.Dense(256)(nn.gelu(nn.Dense(512)(x)))
    return x


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_training_step_cost_is_near_lora(dtype):
  """Factored DoRA adds an r×out product and a pass over W per weight, and keeps the
  product's output for m's gradient: FLOPs within 5 % of LoRA's, far below forming W
  (measured: FLOPs 1.014× LoRA, memory 1.06× in float32)."""
  x = jax.random.normal(jax.random.key(0), (512, 256), dtype)
  params = jax.tree.map(lambda v: v.astype(dtype),
                        _Tower().init(jax.random.key(1), x.astype(jnp.float32)))
  costs = {}
  for name, use_dora, mode in (("lora", False, "factored"), ("dora", True, "factored"),
                               ("dora_merge", True, "merge")):
    config = lj.LoraConfig(rank=8, use_dora=use_dora)
    lp = lj.lift(params, config, key=jax.random.key(2))
    costs[name] = _cost(jax.grad(_loss(lj.wrap(_Tower().apply, config, mode=mode))),
                        lp.adapters, lp.base, x)
  # Bounds per dtype: (FLOPs over LoRA's, memory over LoRA's, memory over forming W').
  # Memory: the float32 case keeps each product's output beside LoRA's residuals (1.06x with
  # jaxlib 0.10.2, 1.22x with the oldest supported 0.7.1). XLA:CPU computes bf16 arithmetic
  # from float32 copies of the operands and forms the copy of that output as soon as it
  # exists, so a bf16 base keeps it at float32 width; jaxlib 0.7.1 also counts 7% more FLOPs
  # there and keeps as much for LoRA as for DoRA formed per step.
  flops, memory, vs_merge = (1.05, 1.25, 0.7) if dtype == jnp.float32 else (1.1, 1.7, 1.0)
  assert costs["dora"][0] <= flops * costs["lora"][0], costs
  assert costs["dora"][0] <= 0.8 * costs["dora_merge"][0], costs
  assert costs["dora"][1] <= memory * costs["lora"][1], costs
  assert costs["dora"][1] <= vs_merge * costs["dora_merge"][1], costs
