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
  # A new adapter (rank 2 < 4, its own alpha and rsLoRA) put into a slot: same shapes, no
  # retrace, neither for one adapter at a time nor for mixed batches over the stack.
  fresh_config = lj.LoraConfig(rank=2, alpha=7.0, use_rslora=True, targets=r"kernel$",
                               in_axes=dict(named["r2"][1].in_axes))
  fresh = zoo.randomize(lj.lift(params, fresh_config, key=jax.random.key(9)), seed=9).adapters
  swapped = stack.put("r4rs", fresh, fresh_config)
  assert swapped.names == stack.names
  want_fresh = lj.wrap(model.apply, fresh_config)(lj.LoraParams(params, fresh), x)
  np.testing.assert_allclose(serve(swapped.select("r4rs"), x), want_fresh, **F32)
  assert len(traces) == 1
  mixed_traces = []

  @jax.jit
  def serve_mixed(stack, x, ids):
    mixed_traces.append(1)
    return lj.wrap(model.apply, config)(lj.LoraParams(params, stack), x, adapter_ids=ids)

  ids = jnp.full((x.shape[0],), 1, jnp.int32)
  np.testing.assert_allclose(serve_mixed(stack, x, ids), outs[1], **F32)
  np.testing.assert_allclose(serve_mixed(swapped, x, ids), want_fresh, **F32)
  assert len(mixed_traces) == 1
  renamed = stack.put(1, fresh, fresh_config, name="fresh")
  assert renamed.names == ("r2", "fresh", "mixed")
  big = lj.LoraConfig(rank=8, targets=r"kernel$", in_axes=dict(fresh_config.in_axes))
  with pytest.raises(ValueError, match=r"rank 8 is above the stack's 4"):
    stack.put(0, lj.lift(params, big, key=jax.random.key(0)).adapters, big)
  with pytest.raises(ValueError, match=r"the name 'r2' is taken by another slot"):
    stack.put(1, fresh, fresh_config, name="r2")
  with pytest.raises(KeyError, match=r"no adapter 'nope'"):
    stack.put("nope", fresh, fresh_config)
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
      # float32 sums over the examples in another order: error relative to the largest entry
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(w).max())))


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
  # Inside jit the ids are not known: an id out of range gives NaN for its example, never
  # another adapter's output.
  jitted = jax.jit(lambda ids: apply(lj.LoraParams(params, stack), x, adapter_ids=ids))
  out = jitted(jnp.array([3, 0, -2, -1, 1, 2], jnp.int32))
  assert np.isnan(out[0]).all() and np.isnan(out[2]).all()
  fine = jitted(jnp.array([1, 0, 2, -1, 1, 2], jnp.int32))
  np.testing.assert_allclose(out[1:2], fine[1:2], **F32)
  np.testing.assert_allclose(out[3:], fine[3:], **F32)
  with pytest.raises(IndexError, match=r"select: 3 is not an index 0..2"):
    stack.select(3)
  with pytest.raises(IndexError, match=r"select: -1 is not an index"):
    stack.select(-1)
  nan = jax.jit(stack.select)(jnp.int32(3))
  assert all(np.isnan(v).all() for v in jax.tree.leaves(nan))
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

  from lora_jax._src.cli.main import main as cli

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


from architectures import architectures  # noqa: E402

ARCHS = {a.name: a for a in architectures()}
# Adapted weights each architecture uses in a way mixed batches have no rule for.
REFUSED = {"moe_ragged_dot": "ragged_dot_general", "resnet_depthwise": "conv_general_dilated",
           "vit": "conv_general_dilated"}
SERVED = {"moe_ragged_dot": r"router/kernel$", "resnet_depthwise": r"head/kernel$",
          "vit": r"(query|key|value|out|fc1_\d|fc2_\d)/kernel$"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_zoo_mixed_batches_match_each_adapter_and_cost_one_adapter(name):
  """Every zoo model: a mixed batch equals each example run with its selected adapter, and the
  compiled forward's FLOPs and temporary memory do not grow with the number of adapters (no
  N-fold adapter work, no per-adapter copy); models whose adapted weights mixed batches cannot
  serve are refused by name."""
  arch = ARCHS[name]

  def stacked(targets):
    configs = [lj.infer_axes(arch.apply, arch.params, arch.x, config=lj.LoraConfig(
        rank=max(1, arch.rank - i), alpha=2.0 + i, targets=targets)) for i in range(3)]
    named = {f"t{i}": (zoo.randomize(lj.lift(arch.params, c, key=jax.random.key(i)), seed=i)
                       .adapters, c) for i, c in enumerate(configs)}
    return named, *lj.stack_adapters(named)

  named, stack, config = stacked(arch.targets)
  x = arch.x if arch.x.shape[0] >= 4 else jnp.concatenate([arch.x, arch.x[::-1]])
  ids = jnp.array([(i % 4) - 1 for i in range(x.shape[0])], jnp.int32)  # -1, 0, 1, 2, ...
  if name in REFUSED:
    with pytest.raises(ValueError, match=rf"is used by `{REFUSED[name]}`, which has no "
                       "mixed-batch rule"):
      lj.wrap(arch.apply, config)(lj.LoraParams(arch.params, stack), x, adapter_ids=ids)
    named, stack, config = stacked(SERVED[name])  # the weights it can serve
  apply = lj.wrap(arch.apply, config)
  mixed = jax.jit(lambda st, x, ids: apply(lj.LoraParams(arch.params, st), x, adapter_ids=ids))
  got = mixed(stack, x, ids)
  for i, k in enumerate(ids.tolist()):
    adapters = stack.select(k) if k >= 0 else None
    want = apply(lj.LoraParams(arch.params, adapters), x[i:i + 1]) if k >= 0 else \
        arch.apply(arch.params, x[i:i + 1])
    np.testing.assert_allclose(np.asarray(got[i:i + 1], np.float32),
                               np.asarray(want, np.float32), rtol=arch.tol,
                               atol=arch.tol * float(jnp.max(jnp.abs(want.astype(jnp.float32)))))

  def cost(n):
    big, _ = lj.stack_adapters({f"c{j}": named[f"t{j % 3}"] for j in range(n)})
    compiled = mixed.lower(big, x, ids).compile()
    return compiled.cost_analysis()["flops"], compiled.memory_analysis().temp_size_in_bytes

  (flops_3, temp_3), (flops_24, temp_24) = cost(3), cost(24)
  assert flops_24 <= 1.01 * flops_3, (flops_3, flops_24)
  assert temp_24 <= 1.05 * temp_3 + 4096, (temp_3, temp_24)


def test_training_several_adapters_in_one_batch_with_the_optimizer():
  """lj.optimizer over LoraParams(base, stack): one step on a mixed batch updates each adapter
  as a step on its own examples alone would (SGD), and leaves unused adapters unchanged."""
  import optax

  model, x, params, named = _adapters()
  stack, config = lj.stack_adapters(named)
  apply = lj.wrap(model.apply, config)
  ids = jnp.array([0, 2, 0, -1, 2, 0], jnp.int32)       # adapter 1 unused
  tx = lj.optimizer(optax.sgd(0.1), config)
  lp = lj.LoraParams(params, stack)

  def loss(lp, x, ids):
    return jnp.sum(apply(lp, x, adapter_ids=ids) ** 2)

  @jax.jit
  def step(lp, state):
    grads = jax.grad(loss)(lp, x, ids)
    updates, state = tx.update(grads, state, lp)
    return optax.apply_updates(lp, updates), state

  new, _ = step(lp, tx.init(lp))
  assert isinstance(new.adapters, lj.AdapterStack)
  jax.tree.map(np.testing.assert_array_equal, new.base, params)
  one_tx = lj.optimizer(optax.sgd(0.1), config)
  for k, name in enumerate(stack.names):
    rows = np.array([i for i, j in enumerate(ids.tolist()) if j == k], int)
    alone = lj.LoraParams(params, stack.select(name))
    if rows.size:
      grads = jax.grad(lambda lp, rows=rows: jnp.sum(lj.wrap(model.apply, config)(
          lp, x[rows]) ** 2))(alone)
      updates, _ = one_tx.update(grads, one_tx.init(alone), alone)
      alone = optax.apply_updates(alone, updates)
    for g, w in zip(jax.tree.leaves(new.adapters.select(name)),
                    jax.tree.leaves(alone.adapters)):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_mixed_batches_on_transposed_weights_and_a_quantized_base():
  """A weight used transposed with its output axes reordered (the low-rank part must follow the
  product's axis order), and an NF4 base (decoded inside each product): a mixed batch equals
  each example with its selected adapter."""
  params = {"w": {"kernel": jax.random.normal(jax.random.key(0), (2, 6, 64))},
            "v": {"kernel": jax.random.normal(jax.random.key(1), (12, 64))}}

  def f(p, x):
    h = jnp.tensordot(x, p["w"]["kernel"].transpose(1, 0, 2), axes=[[1], [2]])  # (b, 6, 2)
    return jnp.tanh(h.reshape(x.shape[0], 12)) @ p["v"]["kernel"]

  x = jax.random.normal(jax.random.key(2), (5, 64))
  config = lj.LoraConfig(rank=2, targets=r"w/kernel$", in_axes={"w": (2,)})
  named = {f"t{i}": (zoo.randomize(lj.lift(params, config, key=jax.random.key(i)), seed=i)
                     .adapters, config) for i in range(3)}
  stack, stack_config = lj.stack_adapters(named)
  ids = jnp.array([2, 0, -1, 1, 2], jnp.int32)
  for base in (params, lj.quantize(params, targets=r"w/kernel$")):
    apply = lj.wrap(f, stack_config)
    got = jax.jit(lambda st, x, ids, base=base, apply=apply: apply(
        lj.LoraParams(base, st), x, adapter_ids=ids))(stack, x, ids)
    for i, k in enumerate(ids.tolist()):
      adapters = stack.select(k) if k >= 0 else None
      want = apply(lj.LoraParams(base, adapters), x[i:i + 1])
      np.testing.assert_allclose(got[i:i + 1], want, rtol=1e-4, atol=1e-4)


def test_a_stack_where_one_adapter_is_expected_is_refused_by_name(tmp_path):
  """merge, unmerge, save_peft, summary, combine and stack_adapters take one adapter: a stack
  passed there is refused with the way out, never read as an empty or odd adapter tree."""
  model, x, params, named = _adapters()
  stack, config = lj.stack_adapters(named)
  lp = lj.LoraParams(params, stack)
  calls = {"merge": lambda: lj.merge(lp, config),
           "unmerge": lambda: lj.unmerge(params, stack, config),
           "save_peft": lambda: lj.save_peft(tmp_path / "peft", lp, config),
           "summary": lambda: lj.summary(lp, config),
           "combine": lambda: lj.combine({"s": (stack, config), "t": named["r2"]},
                                         {"s": 1.0, "t": 1.0}),
           "stack_adapters": lambda: lj.stack_adapters({"s": (stack, config)})}
  for call in calls.values():
    with pytest.raises(ValueError, match=r"got a stack of 3 adapters \['r2', 'r4rs', 'mixed'\], "
                       r"but this takes one adapter; select it: stack.select\(name\)"):
      call()
  assert not (tmp_path / "peft").exists()
