"""LoRA+ (B's learning rate λ times A's) and LoRA-FA (A frozen) as optax recipes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj


@pytest.fixture(autouse=True)
def standard_promotion():
  """optax's Adam mixes a Python float with an int32 count, which strict promotion rejects."""
  with jax.numpy_dtype_promotion("standard"):
    yield


CONFIG = lj.LoraConfig(rank=2, targets=r"kernel$", trainable=r"bias$")


def _setup(config=CONFIG):
  k = jax.random.split(jax.random.key(0), 3)
  params = {"dense": {"kernel": jax.random.normal(k[0], (8, 6)), "bias": jnp.zeros(6)},
            "out": {"kernel": jax.random.normal(k[1], (6, 3))}}
  lp = lj.lift(params, config, key=k[2])
  # B starts at zero; give it values so that A's gradient is not zero either.
  lp = lj.LoraParams(lp.base, jax.tree.map(lambda v: v + 0.1, lp.adapters))
  x = jax.random.normal(jax.random.key(5), (16, 8))

  def fn(p, x):
    return jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"]) @ p["out"]["kernel"]

  apply = lj.wrap(fn, config)
  return lp, jax.jit(jax.grad(lambda lp: jnp.sum(apply(lp, x) ** 2)))


def _factor(tree, name):
  return [v for p, v in zip(lj.paths(tree), jax.tree.leaves(tree)) if p.endswith("/" + name)]


def _run(tx, lp, grad_fn, steps=3):
  state = tx.init(lp)
  for _ in range(steps):
    updates, state = tx.update(grad_fn(lp), state, lp)
    lp = optax.apply_updates(lp, updates)
  return lp, state


@pytest.mark.parametrize("make", [optax.sgd, lambda lr: optax.adamw(lr, weight_decay=0.1)],
                         ids=["sgd", "adamw"])
def test_lora_plus_gives_b_ratio_times_the_learning_rate(make):
  config = lj.LoraConfig(rank=2, targets=r"kernel$")  # nothing else trains
  lp, grad_fn = _setup(config)
  ratio, lr = 16.0, 1e-2
  got, _ = _run(lj.optimizer(make(lr), config, lora_plus_ratio=ratio), lp, grad_fn)
  # Reference: one optimizer for the A factors at lr, another for the B factors at ratio * lr.
  names = lj.paths(lp.adapters)
  parts = {f: {p: v for p, v in zip(names, jax.tree.leaves(lp.adapters)) if p.endswith("/" + f)}
           for f in "ab"}
  txs = {"a": make(lr), "b": make(ratio * lr)}
  states = {f: txs[f].init(parts[f]) for f in "ab"}
  current = lp
  for _ in range(3):
    flat = dict(zip(names, jax.tree.leaves(grad_fn(current).adapters)))
    for f in "ab":
      updates, states[f] = txs[f].update({p: flat[p] for p in parts[f]}, states[f], parts[f])
      parts[f] = optax.apply_updates(parts[f], updates)
    values = {**parts["a"], **parts["b"]}
    current = lj.LoraParams(lp.base, jax.tree.unflatten(jax.tree.structure(lp.adapters),
                                                        [values[p] for p in names]))
  for p, v in zip(names, jax.tree.leaves(got.adapters)):
    np.testing.assert_allclose(v, values[p], rtol=1e-5, atol=1e-6)
  # Not vacuous: plain LoRA (ratio 1) ends elsewhere.
  plain, _ = _run(lj.optimizer(make(lr), config), lp, grad_fn)
  assert not np.allclose(_factor(plain.adapters, "b")[0], _factor(got.adapters, "b")[0])


def test_lora_fa_freezes_a_and_keeps_no_state_for_it():
  lp, grad_fn = _setup()
  tx = lj.optimizer(optax.adam(1e-2), CONFIG, freeze_a=True)
  got, state = _run(tx, lp, grad_fn)
  for before, after in zip(_factor(lp.adapters, "a"), _factor(got.adapters, "a")):
    np.testing.assert_array_equal(before, after)
  assert all(not np.allclose(b, a) for b, a in zip(_factor(lp.adapters, "b"),
                                                 _factor(got.adapters, "b")))
  assert not np.allclose(got.base["dense"]["bias"], lp.base["dense"]["bias"])  # still trained
  # Adam's two moments for B and the bias only (plus step counts), none for A or the base.
  n_b = sum(v.size for v in _factor(lp.adapters, "b"))
  floats = sum(v.size for v in jax.tree.leaves(state) if jnp.issubdtype(v.dtype, jnp.floating))
  assert floats == 2 * (n_b + lp.base["dense"]["bias"].size)


@pytest.mark.parametrize("ratio", [0, -1.0, float("nan"), float("inf"), True, "16"])
def test_bad_lora_plus_ratio_is_refused(ratio):
  with pytest.raises(ValueError, match="lora_plus_ratio must be a finite number > 0"):
    lj.optimizer(optax.adam(1e-3), CONFIG, lora_plus_ratio=ratio)


def test_gradient_accumulation_inside_lj_optimizer():
  """lj.optimizer(optax.MultiSteps(tx, k), config): accumulators for trained leaves only, and
  k micro-steps equal one step on the mean gradient."""
  base = {"l1": {"kernel": jax.random.normal(jax.random.key(0), (6, 5)), "bias": jnp.zeros(5)},
          "l2": {"kernel": jax.random.normal(jax.random.key(1), (5, 3))}}
  config = lj.LoraConfig(rank=2, targets=r"kernel$", trainable=r"bias$")
  lp = lj.lift(base, config, key=jax.random.key(2))
  lp = lj.LoraParams(lp.base, jax.tree.map(lambda x: x + 0.1, lp.adapters))
  apply = lj.wrap(lambda p, x: jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
                  @ p["l2"]["kernel"], config)
  loss = lambda lp, x: jnp.sum(apply(lp, x) ** 2)
  xs = jax.random.normal(jax.random.key(3), (4, 2, 6))
  with jax.numpy_dtype_promotion("standard"):
    tx = lj.optimizer(optax.MultiSteps(optax.sgd(0.1), every_k_schedule=4), config)
    state = tx.init(lp)
    # No accumulator the size of a frozen kernel: only adapters and the trained bias.
    sizes = sorted(x.size for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) > 0)
    assert 6 * 5 not in sizes and 5 * 3 not in sizes, sizes
    accumulated = lp
    for x in xs:
      grads = jax.grad(loss)(accumulated, x)
      updates, state = tx.update(grads, state, accumulated)
      accumulated = optax.apply_updates(accumulated, updates)
    mean = jax.tree.map(lambda *g: sum(g) / len(g), *[jax.grad(loss)(lp, x) for x in xs])
    once, _ = lj.optimizer(optax.sgd(0.1), config).update(
        mean, lj.optimizer(optax.sgd(0.1), config).init(lp), lp)
  want = optax.apply_updates(lp, once)
  for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
