"""Every adapter kind of the kinds table, through every path: lift, merge, factored execution
and its gradient, the optimizer, checkpoints, the merge CLI, inspect and summary.

Each kind's update is checked against an explicit reference written here from the kind's
paper/PEFT formula, not from ``kinds.py``: a new kind adds its formula to ``REFERENCE`` and
gets every test. PEFT interop for each kind is in ``test_kinds_peft.py``.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import lora_jax as lj
from lora_jax._src.cli.main import main as cli


def _lora(e):
  return e["a"] @ e["b"]


def _loha(e):
  return (e["a1"] @ e["b1"]) * (e["a2"] @ e["b2"])


def _lokr(e):
  return jnp.kron(e["w1"], e["a2"] @ e["b2"])


# ΔW / scale in the weight's (in, out) layout for one unstacked 2-D entry.
REFERENCE = {"lora": _lora, "loha": _loha, "lokr": _lokr}
KEYS = {"lora": {"a", "b"}, "loha": {"a1", "b1", "a2", "b2"}, "lokr": {"w1", "a2", "b2"}}
KINDS = sorted(REFERENCE)


def test_every_kind_of_the_table_has_a_reference():
  from lora_jax._src.core import kinds  # noqa: PLC0415

  assert sorted(kinds.KINDS) == KINDS


def _params(stacked=False):
  k = jax.random.split(jax.random.key(0), 3)
  lead = (3,) if stacked else ()
  return {"dense": {"kernel": jax.random.normal(k[0], (*lead, 12, 10)),
                    "bias": 0.1 * jax.random.normal(k[1], (*lead, 10))},
          "out": {"kernel": jax.random.normal(k[2], (*lead, 10, 6))}}


def _apply(params, x):
  """Two dense layers; a stacked tree is 3 such blocks in a scan (each back to width 12)."""
  def block(h, p):
    out = jnp.tanh(h @ p["dense"]["kernel"] + p["dense"]["bias"]) @ p["out"]["kernel"]
    return out, None

  if params["dense"]["kernel"].ndim == 3:
    back = jnp.ones((6, 12)) / 6.0
    h, _ = jax.lax.scan(lambda h, p: (block(h, p)[0] @ back, None), x, params)
    return h
  return block(x, params)[0]


def _config(kind, stacked=False):
  return lj.LoraConfig(rank=3, alpha=5.0, kind=kind, targets=r"kernel$",
                       stack_axes={"kernel": 1} if stacked else {})


def _lifted(kind, stacked=False, seed=1):
  """Lifted with every array random (fresh adapters start with a zero update)."""
  params, config = _params(stacked), _config(kind, stacked)
  lp = lj.lift(params, config, key=jax.random.key(seed))
  keys = iter(jax.random.split(jax.random.key(seed + 10), 64))
  adapters = jax.tree.map(lambda a: 0.4 * jax.random.normal(next(keys), a.shape, a.dtype),
                          lp.adapters)
  return params, config, lj.LoraParams(lp.base, adapters)


def _reference_weight(w, entry, kind, scale):
  """``W + scale · ΔW`` per layer of a stacked weight, by the explicit formula."""
  if w.ndim == 3:
    return jnp.stack([_reference_weight(w[i], jax.tree.map(lambda x, i=i: x[i], entry), kind,
                                        scale) for i in range(w.shape[0])])
  return w + scale * REFERENCE[kind](entry)


def _reference_params(params, lp, config):
  out = jax.tree.map(lambda x: x, params)
  for path in ("dense", "out"):
    out[path]["kernel"] = _reference_weight(params[path]["kernel"], lp.adapters[path]["kernel"],
                                            config.kind, config.scale_for(f"{path}/kernel"))
  return out


@pytest.mark.parametrize("kind", KINDS)
def test_lift_starts_at_the_base_and_names_the_kinds_arrays(kind):
  params, config = _params(), _config(kind)
  lp = lj.lift(params, config, key=jax.random.key(1))
  entry = lp.adapters["dense"]["kernel"]
  assert set(entry) == KEYS[kind]
  np.testing.assert_array_equal(REFERENCE[kind](entry), np.zeros((12, 10), np.float32))
  np.testing.assert_array_equal(lj.merge(lp, config)["dense"]["kernel"],
                                params["dense"]["kernel"])
  # Not everything is zero: training has somewhere to start.
  assert sum(float(jnp.abs(x).sum()) > 0 for x in entry.values()) >= len(entry) - 1
  again = lj.lift(params, config, key=jax.random.key(1))
  jax.tree.map(np.testing.assert_array_equal, lp.adapters, again.adapters)


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_merge_factored_and_gradient_equal_the_reference(kind, stacked):
  params, config, lp = _lifted(kind, stacked)
  ref = _reference_params(params, lp, config)
  merged = lj.merge(lp, config)
  for path in ("dense", "out"):
    np.testing.assert_allclose(merged[path]["kernel"], ref[path]["kernel"], rtol=1e-5,
                               atol=1e-5)
  x = jax.random.normal(jax.random.key(5), (4, 12))
  with warnings.catch_warnings():
    warnings.simplefilter("error", lj.FallbackWarning)
    got = jax.jit(lj.wrap(_apply, config))(lp, x)
  np.testing.assert_allclose(got, _apply(ref, x), rtol=2e-5, atol=2e-5)

  def loss(adapters):
    return jnp.sum(lj.wrap(_apply, config)(lj.LoraParams(lp.base, adapters), x) ** 2)

  def reference_loss(adapters):
    return jnp.sum(_apply(_reference_params(params, lj.LoraParams(lp.base, adapters), config),
                          x) ** 2)

  grads, expected = jax.grad(loss)(lp.adapters), jax.grad(reference_loss)(lp.adapters)
  jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4), grads,
               expected)


@pytest.mark.parametrize("kind", KINDS)
def test_trains_through_the_optimizer(kind):
  params, config = _params(), _config(kind)
  lp = lj.lift(params, config, key=jax.random.key(1))
  x = jax.random.normal(jax.random.key(5), (16, 12))
  y = _apply(_reference_params(params, _lifted(kind)[2], config), x)  # reachable target
  tx = lj.optimizer(optax.adam(3e-2), config)
  state = tx.init(lp)

  @jax.jit
  def step(lp, state):
    loss, grads = jax.value_and_grad(
        lambda lp: jnp.mean((lj.wrap(_apply, config)(lp, x) - y) ** 2))(lp)
    updates, state = tx.update(grads, state, lp)
    return optax.apply_updates(lp, updates), state, loss

  losses = []
  with jax.numpy_dtype_promotion("standard"):  # optax's Adam: a Python float ** int32 count
    for _ in range(60):
      lp, state, loss = step(lp, state)
      losses.append(float(loss))
  assert losses[-1] < 0.3 * losses[0]
  jax.tree.map(np.testing.assert_array_equal, lp.base, params)  # the base stays frozen


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_merge_cli_inspect_and_summary(kind, tmp_path, capsys):
  params, config, lp = _lifted(kind)
  lj.save_adapters(tmp_path / "adapters", lp, config)
  loaded, loaded_config = lj.load_adapters(tmp_path / "adapters")
  assert loaded_config == config
  loaded = loaded.adapters if isinstance(loaded, lj.LoraParams) else loaded
  jax.tree.map(np.testing.assert_array_equal, loaded, lp.adapters)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "base", params)
  checkpointer.wait_until_finished()
  assert cli(["merge", "--base", str(tmp_path / "base"), "--adapters",
              str(tmp_path / "adapters"), "--out", str(tmp_path / "merged")]) == 0
  merged = ocp.StandardCheckpointer().restore(tmp_path / "merged")
  ref = _reference_params(params, lp, config)
  np.testing.assert_allclose(merged["out"]["kernel"], ref["out"]["kernel"], rtol=1e-5,
                             atol=1e-5)
  capsys.readouterr()
  assert cli(["inspect", str(tmp_path / "adapters")]) == 0
  out = capsys.readouterr().out
  entry = lp.adapters["out"]["kernel"]
  assert f'"kind": "{kind}"' in out
  assert all(str(tuple(x.shape)) in out for x in entry.values())
  table = str(lj.summary(lp, config))
  assert ("kind" in table) == (kind != "lora")
  assert lj.summary(lp, config).adapter_params == sum(
      x.size for e in (lp.adapters["dense"]["kernel"], entry) for x in e.values())


def test_a_kind_is_checked_against_the_config():
  params, config, lp = _lifted("loha")
  with pytest.raises(ValueError, match="a loha adapter .* config says kind='lora'"):
    lj.merge(lp, _config("lora"))
  with pytest.raises(ValueError, match="kind must be one of"):
    lj.LoraConfig(kind="lokr-typo")
  with pytest.raises(ValueError, match="does not apply to kind='loha'"):
    lj.LoraConfig(kind="loha", init="pissa")
  with pytest.raises(ValueError, match="DoRA's magnitude applies to LoRA"):
    lj.LoraConfig(kind="loha", use_dora=True)
  with pytest.raises(ValueError, match="works on LoRA's A and B"):
    lj.stack_adapters({"x": (lp, config), "y": (lp, config)})
