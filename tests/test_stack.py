"""Many adapters: stacks (padding, scales as data), selection and hot swap without
retracing, and mixed batches (each example its own adapter) against running each alone."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo

import lora_jax as lj

F32 = {"rtol": 2e-5, "atol": 2e-5}


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(32, name="up")(x))
    q = nn.DenseGeneral((2, 8), name="q")(h)           # (batch, seq, 2, 8)
    return nn.DenseGeneral(16, axis=(-2, -1), name="o")(q)


def _adapters():
  model = _Net()
  x = jax.random.normal(jax.random.key(0), (6, 5, 16))
  params = model.init(jax.random.key(1), x)
  configs = {"r2": lj.LoraConfig(rank=2, targets=r"kernel$"),
             "r4rs": lj.LoraConfig(rank=4, alpha=3.0, use_rslora=True, targets=r"kernel$"),
             "mixed": lj.LoraConfig(rank=3, alpha=6.0, targets=r"kernel$",
                                    rank_pattern={"up": 1}, alpha_pattern={"up": 5.0})}
  configs = {n: lj.infer_axes(model.apply, params, x, config=c) for n, c in configs.items()}
  named = {n: (zoo.randomize(lj.lift(params, c, key=jax.random.key(i))).adapters, c)
           for i, (n, c) in enumerate(configs.items())}
  return model, x, params, named


def test_stack_pads_folds_scales_and_selects_exactly():
  model, x, params, named = _adapters()
  stack, config = lj.stack_adapters(named)
  assert stack.names == ("r2", "r4rs", "mixed") and config.rank == 4
  assert all(config.scale_for(p) == 1.0 for p in lj.paths(stack.adapters))
  for name, (adapters, c) in named.items():
    got = lj.merge(lj.LoraParams(params, stack.select(name)), config)
    want = lj.merge(lj.LoraParams(params, adapters), c)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, **F32)


def test_hot_swap_does_not_retrace():
  model, x, params, named = _adapters()
  stack, config = lj.stack_adapters(named)
  traces = []

  @jax.jit
  def serve(adapters, x):
    traces.append(1)
    return lj.wrap(model.apply, config)(lj.LoraParams(params, adapters), x)

  outs = [serve(stack.select(n), x) for n in stack.names]
  assert len(traces) == 1
  by_index = jax.jit(lambda i, x: serve(stack.select(i), x))
  for i, n in enumerate(stack.names):
    np.testing.assert_allclose(by_index(jnp.int32(i), x), outs[i], **F32)
    np.testing.assert_allclose(outs[i], lj.wrap(model.apply, named[n][1])(
        lj.LoraParams(params, named[n][0]), x), **F32)


def test_mixed_batch_equals_each_example_alone_values_and_gradients():
  model, x, params, named = _adapters()
  stack, config = lj.stack_adapters(named)
  ids = jnp.array([0, 2, -1, 1, 2, 0], jnp.int32)
  apply = lj.wrap(model.apply, config)
  got = jax.jit(lambda st, x, ids: apply(lj.LoraParams(params, st), x, adapter_ids=ids))(
      stack, x, ids)
  base_out = jax.jit(model.apply)(params, x)
  for i, k in enumerate(ids.tolist()):
    if k < 0:  # -1: the base exactly (its low-rank branch adds exact zeros)
      np.testing.assert_array_equal(got[i], base_out[i])
    else:
      want = apply(lj.LoraParams(params, stack.select(k)), x[i:i + 1])
      np.testing.assert_allclose(got[i:i + 1], want, **F32)
  # Gradients: each adapter only from its own examples.
  loss = lambda st: jnp.sum(jnp.sin(apply(lj.LoraParams(params, st), x, adapter_ids=ids)))  # noqa: E731
  grads = jax.jit(jax.grad(loss))(stack)
  for k, name in enumerate(stack.names):
    rows = [i for i, j in enumerate(ids.tolist()) if j == k]

    def alone(adapters, k=k, rows=rows):
      return jnp.sum(jnp.sin(apply(lj.LoraParams(params, adapters), x[np.array(rows)])))

    want = jax.grad(alone)(stack.select(name))
    got_k = jax.tree.map(lambda g, k=k: g[k], grads.adapters)
    for g, w in zip(jax.tree.leaves(got_k), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_mixed_batch_under_vmap_and_errors():
  model, x, params, named = _adapters()
  stack, config = lj.stack_adapters(named)
  apply = lj.wrap(model.apply, config)
  ids = jnp.array([1, 0, 2, -1, 1, 0], jnp.int32)
  per_example = jax.vmap(lambda xi, i: apply(lj.LoraParams(params, stack), xi, adapter_ids=i))
  batched = apply(lj.LoraParams(params, stack), x, adapter_ids=ids)
  np.testing.assert_allclose(per_example(x, ids), batched, **F32)
  with pytest.raises(ValueError, match=r"pass adapter_ids="):
    apply(lj.LoraParams(params, stack), x)
  with pytest.raises(ValueError, match=r"must be -1 \(the base\) or 0..2"):
    apply(lj.LoraParams(params, stack), x, adapter_ids=jnp.array([3, 0, 0, 0, 0, 0]))
  with pytest.raises(ValueError, match="batch as its first free axis"):
    apply(lj.LoraParams(params, stack), x, adapter_ids=jnp.array([0, 1]))
  with pytest.raises(ValueError, match="not adapters of the same weight"):
    other = lj.lift(jax.tree.map(lambda v: jnp.concatenate([v, v], -1) if v.ndim == 2 and
                                 v.shape[-1] == 32 else v, params),
                    named["r2"][1], key=jax.random.key(0))
    lj.stack_adapters({"a": named["r2"], "b": (other.adapters, named["r2"][1])})
  headed = lj.LoraConfig(rank=2, targets=r"kernel$", trainable=(r"bias$",))
  with pytest.raises(ValueError, match=r"adapter 'h' trains base leaves in full"):
    lj.stack_adapters({"h": (lj.lift(params, headed, key=jax.random.key(0)), headed)})


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_mixed_batch_on_a_mesh(axis_type):
  """The batch (and its ids) sharded over 8 devices: the same outputs as on one device."""
  model, x, params, named = _adapters()
  stack, config = lj.stack_adapters(named)
  apply = jax.jit(lambda st, x, ids: lj.wrap(model.apply, config)(lj.LoraParams(params, st),
                                                                    x, adapter_ids=ids))
  x8 = jnp.concatenate([x, x[:2]], 0)
  ids = jnp.array([0, 2, -1, 1, 2, 0, 1, -1], jnp.int32)
  want = apply(stack, x8, ids)
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(getattr(jax.sharding.AxisType, axis_type),))
  put = lambda v: jax.device_put(v, jax.sharding.NamedSharding(  # noqa: E731
      mesh, jax.sharding.PartitionSpec("data")))
  got = apply(stack, put(x8), put(ids))
  np.testing.assert_allclose(got, want, **F32)


def test_stack_checkpoint_round_trip_and_merge_of_one(tmp_path, capsys):
  """A stack saves as one checkpoint (with its names and the base's fingerprint), loads back as
  a stack (onto a target's shardings, too), and `lora-jax merge --adapter NAME` merges one."""
  import orbax.checkpoint as ocp

  from lora_jax._src.cli import main as cli

  model, x, params, named = _adapters()
  stack, config = lj.stack_adapters(named)
  lj.save_adapters(tmp_path / "stack", lj.LoraParams(params, stack), config)
  loaded, loaded_config = lj.load_adapters(tmp_path / "stack", base=params)
  assert isinstance(loaded, lj.AdapterStack) and loaded.names == stack.names
  assert loaded_config == config
  jax.tree.map(np.testing.assert_array_equal, loaded.adapters, stack.adapters)
  again, _ = lj.load_adapters(tmp_path / "stack", target=stack)
  jax.tree.map(np.testing.assert_array_equal, again.adapters, stack.adapters)
  with pytest.raises(ValueError, match=r"holds a stack of adapters, but the target is one "
                     r"adapter"):
    lj.load_adapters(tmp_path / "stack", target=stack.select(0))
  lj.save_adapters(tmp_path / "one", *named["r2"])
  with pytest.raises(ValueError, match=r"holds one adapter, but the target is a stack"):
    lj.load_adapters(tmp_path / "one", target=stack)
  with pytest.raises(ValueError, match=r"stack of 3 adapters \['r2', 'r4rs', 'mixed'\], but "
                     r"params/up/kernel/a: leading axis \(2,\)"):
    lj.save_adapters(tmp_path / "bad", lj.AdapterStack(
        {**stack.adapters, "params": {**stack.adapters["params"], "up": {"kernel": {
            k: v[:2] for k, v in stack.adapters["params"]["up"]["kernel"].items()}}}},
        stack.names), config)

  base_dir = tmp_path / "base"
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(base_dir, params)
  with pytest.raises(ValueError, match=r"holds a stack of adapters \['r2', 'r4rs', 'mixed'\]; "
                     r"name the one to merge"):
    lj.merge_checkpoint(base_dir, tmp_path / "stack", tmp_path / "merged")
  assert cli(["merge", "--base", str(base_dir), "--adapters", str(tmp_path / "stack"),
              "--out", str(tmp_path / "merged"), "--adapter", "r4rs"]) == 0
  merged = ocp.StandardCheckpointer().restore(tmp_path / "merged")
  want = lj.merge(lj.LoraParams(params, named["r4rs"][0]), named["r4rs"][1])
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, **F32), merged, want)
  assert cli(["inspect", str(tmp_path / "stack")]) == 0
  assert "a stack of 3 adapters (leading axis of every A and B): r2, r4rs, mixed" in (
      capsys.readouterr().out)
