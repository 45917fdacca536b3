"""combine: cat and svd equal Σ wᵢ·ΔWᵢ (svd: its truncated SVD), from the factors alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._src.adapters.combine import _svd

PARAMS = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (16, 24)),
                    "bias": jnp.zeros(24)},
          "blocks": {"kernel": jax.random.normal(jax.random.key(1), (3, 12, 2, 6))}}


def _adapters(seed, **config):
  config = lj.LoraConfig(**{"rank": 4, "targets": r"kernel$", "stack_axes": {"blocks": 1},
                            "in_axes": {"blocks": 1}, **config})
  lp = lj.lift(PARAMS, config, key=jax.random.key(seed))
  keys = iter(jax.random.split(jax.random.key(seed + 100), 8))
  return jax.tree.map(lambda v: v + jax.random.normal(next(keys), v.shape), lp.adapters), config


def _delta(adapters, config):
  merged = lj.merge(lj.LoraParams(PARAMS, adapters), config)
  return jax.tree.map(lambda m, w: np.asarray(m, np.float64) - np.asarray(w, np.float64),
                      merged, PARAMS)


INPUTS = {"x": _adapters(1), "y": _adapters(2, rank=2, alpha=5.0, use_rslora=True),
          "z": _adapters(3, rank_pattern={"dense": 3}, alpha_pattern={"blocks": 7.0})}
WEIGHTS = {"x": 0.7, "y": -0.4, "z": 1.3}


def _weighted_sum():
  deltas = {n: _delta(*INPUTS[n]) for n in INPUTS}
  return jax.tree.map(lambda *d: sum(WEIGHTS[n] * x for n, x in zip(INPUTS, d)),
                      *deltas.values())


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_cat_and_full_rank_svd_are_the_weighted_sum(method):
  # Combined ranks: dense 4 + 2 + 3 = 9, blocks 4 + 2 + 4 = 10; svd at rank 10 is exact.
  adapters, config = lj.combine(INPUTS, WEIGHTS, method=method,
                                rank=10 if method == "svd" else None)
  assert config.scale_for("dense/kernel") == 1.0 and config.scale_for("blocks/kernel") == 1.0
  dense_rank = 9 if method == "cat" else 10
  assert adapters["dense"]["kernel"]["a"].shape == (16, dense_rank)
  assert adapters["blocks"]["kernel"]["b"].shape == (3, 10, 2, 6)
  got = _delta(adapters, config)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4), got,
               _weighted_sum())


def test_truncated_svd_is_the_best_low_rank_approximation():
  adapters, config = lj.combine(INPUTS, WEIGHTS, method="svd", rank=3)
  got = _delta(adapters, config)
  want = _weighted_sum()
  u, s, vt = np.linalg.svd(want["dense"]["kernel"])
  np.testing.assert_allclose(got["dense"]["kernel"], (u[:, :3] * s[:3]) @ vt[:3], atol=1e-4)
  for i in range(3):  # each stacked layer on its own: (in 12, out 2 x 6)
    u, s, vt = np.linalg.svd(want["blocks"]["kernel"][i].reshape(12, 12))
    best = ((u[:, :3] * s[:3]) @ vt[:3]).reshape(12, 2, 6)
    np.testing.assert_allclose(got["blocks"]["kernel"][i], best, atol=1e-4)


def test_svd_never_forms_the_weight():
  a, b = jnp.ones((512, 24)), jnp.ones((24, 768))
  jaxpr = jax.make_jaxpr(lambda a, b: _svd(a, b, 8))(a, b)
  shapes = [v.aval.shape for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars]
  assert max(np.prod(s) for s in shapes) == 768 * 24  # the QR of Bᵀ, never 512 x 768


def test_linear_is_peft_weighted_sum_of_factors():
  one, config = INPUTS["x"]
  two, _ = _adapters(5)
  out, combined = lj.combine({"p": (one, config), "q": (two, config)}, {"p": 0.5, "q": -2.0},
                             method="linear")
  s = config.scale_for("dense/kernel")
  ws = [0.5 * s, -2.0 * s]
  entries = [one["dense"]["kernel"], two["dense"]["kernel"]]
  a = sum(np.sign(w) * np.sqrt(abs(w)) * e["a"] for w, e in zip(ws, entries))
  b = sum(np.sqrt(abs(w)) * e["b"] for w, e in zip(ws, entries))
  np.testing.assert_allclose(out["dense"]["kernel"]["a"], a, rtol=1e-5)
  np.testing.assert_allclose(out["dense"]["kernel"]["b"], b, rtol=1e-5)
  assert combined.scale_for("dense/kernel") == 1.0


def test_ties_prunes_each_factor_of_each_layer_by_magnitude():
  """Agreement with PEFT is checked in test_peft.py; here, per stacked layer: at density 1 ties
  of one adapter is linear, and a lone adapter's pruned factors keep exactly int(d·size)."""
  one, config = INPUTS["x"]
  alone, _ = lj.combine({"x": (one, config)}, {"x": 1.0}, method="ties", density=0.25)
  s = config.scale_for("blocks/kernel")
  for factor, sign in (("a", 1.0), ("b", 1.0)):
    got = np.asarray(alone["blocks"]["kernel"][factor])
    full = np.sqrt(s) * sign * np.asarray(one["blocks"]["kernel"][factor])
    for layer in range(3):  # each layer keeps its own top quarter
      kept = got[layer] != 0
      assert kept.sum() == int(0.25 * kept.size)
      np.testing.assert_allclose(got[layer][kept], full[layer][kept], rtol=1e-6)
      assert np.abs(full[layer][~kept]).max() <= np.abs(full[layer][kept]).min()
  lin, _ = lj.combine({"x": (one, config)}, {"x": 1.0}, method="linear")
  whole, _ = lj.combine({"x": (one, config)}, {"x": 1.0}, method="ties", density=1.0)
  jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-6), whole, lin)


def test_dare_is_reproducible_from_its_key_and_rescales_what_it_keeps():
  one, config = INPUTS["x"]
  run = lambda key: lj.combine({"x": (one, config)}, {"x": 1.0}, method="dare_linear",  # noqa: E731
                               density=0.5, key=key)[0]
  first, again, other = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
  jax.tree.map(np.testing.assert_array_equal, first, again)
  assert not np.array_equal(first["dense"]["kernel"]["a"], other["dense"]["kernel"]["a"])
  s = config.scale_for("dense/kernel")
  got = np.asarray(first["dense"]["kernel"]["a"])
  full = np.sqrt(s) * np.asarray(one["dense"]["kernel"]["a"])
  kept = got != 0
  assert 0.3 < kept.mean() < 0.7
  np.testing.assert_allclose(got[kept], full[kept] / 0.5, rtol=1e-6)


def test_refusals_name_the_problem():
  with pytest.raises(ValueError, match=r"method must be one of \('cat', 'svd', 'linear', "
                     r"'ties', 'dare_linear', 'dare_ties'\)"):
    lj.combine(INPUTS, WEIGHTS, method="task_arithmetic")
  same = {"x": INPUTS["x"], "w": _adapters(5)}
  for options, message in [
      ({"method": "ties"}, r"'ties', 'dare_linear' and 'dare_ties' take a density"),
      ({"method": "cat", "density": 0.5}, r"other methods take none"),
      ({"method": "ties", "density": 0.0}, r"density=0.0: must be a number in \(0, 1\]"),
      ({"method": "ties", "density": 1.5}, r"density=1.5: must be a number in \(0, 1\]"),
      ({"method": "dare_ties", "density": 0.5}, r"need key=jax.random.key"),
      ({"method": "ties", "density": 0.5, "key": jax.random.key(0)}, r"takes no key"),
      ({"method": "ties", "density": 0.5, "majority_sign": "mean"}, r"majority_sign='mean'"),
      ({"method": "cat", "majority_sign": "frequency"}, r"other methods leave it 'total'")]:
    with pytest.raises(ValueError, match=message):
      lj.combine(same, {"x": 1.0, "w": 1.0}, **options)
  with pytest.raises(ValueError, match=r"dense/kernel: ranks \[4, 2, 3\] differ; 'ties'"):
    lj.combine(INPUTS, WEIGHTS, method="ties", density=0.5)
  with pytest.raises(ValueError, match=r"weights must name exactly the adapters"):
    lj.combine(INPUTS, {"x": 1.0})
  with pytest.raises(ValueError, match=r"dense/kernel: ranks \[4, 2, 3\] differ; 'linear'"):
    lj.combine(INPUTS, WEIGHTS, method="linear")
  with pytest.raises(ValueError, match=r"only method='svd' takes a rank"):
    lj.combine(INPUTS, WEIGHTS, rank=3)
  dora, dora_config = _adapters(6, use_dora=True)
  with pytest.raises(ValueError, match=r"adapter 'd' is DoRA at blocks/kernel"):
    lj.combine({"d": (dora, dora_config), "x": INPUTS["x"]}, {"d": 1.0, "x": 1.0})
  other, other_config = _adapters(7, targets=r"dense/kernel$")
  with pytest.raises(ValueError, match=r"'o' adapts other paths than 'x': extra \[\], missing "
                     r"\['blocks/kernel'\]"):
    lj.combine({"x": INPUTS["x"], "o": (other, other_config)}, {"x": 1.0, "o": 1.0})
  many = {f"a{i}": INPUTS["x"] for i in range(4)}  # 4 x rank 4 > the stacked kernel's 12
  with pytest.raises(ValueError, match=r"blocks/kernel: the combined rank 16 exceeds the "
                     r"weight's input size 12 or output size 12; use method='svd'"):
    lj.combine(many, dict.fromkeys(many, 1.0))
