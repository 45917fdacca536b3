"""Every adapter kind of the kinds table, through every path: lift, merge, factored execution
and its gradient, the optimizer, checkpoints, the merge CLI, inspect and summary.

Each kind's update is checked against an explicit reference written here from the kind's
paper/PEFT formula, not from ``kinds.py``: a new kind adds its formula to ``REFERENCE`` and
gets every test. PEFT interop for each kind is in ``test_kinds_peft.py``.
"""

import warnings

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import lora_jax as lj
from lora_jax._src.cli.main import main as cli
from lora_jax._src.core import kinds


def _lora(e, shared):
  return e["a"] @ e["b"]


def _loha(e, shared):
  return (e["a1"] @ e["b1"]) * (e["a2"] @ e["b2"])


def _lokr(e, shared):
  return jnp.kron(e["w1"], e["a2"] @ e["b2"])


def _vera(e, shared):
  """PEFT's (λ_b ⊙ B[:out]) @ (λ_d ⊙ A[:, :in]) with A = projection_a.T, B = projection_b.T,
  transposed to (in, out); the shared projections are frozen."""
  a_t = jax.lax.stop_gradient(shared["projection_a"]).T  # PEFT's vera_A (r, max_in)
  b_t = jax.lax.stop_gradient(shared["projection_b"]).T  # PEFT's vera_B (max_out, r)
  n_out = e["lambda_b"].shape[0]
  delta_t = (e["lambda_b"][:, None] * b_t[:n_out]) @ (e["lambda_d"][:, None] * a_t)
  return delta_t.T  # (max_in, out): the caller cuts the rows to the weight's input size


# ΔW / scale in the weight's (in, out) layout for one unstacked 2-D entry (rows beyond the
# weight's input size, which VeRA's shared projection has, are cut by the caller).
REFERENCE = {"lora": _lora, "loha": _loha, "lokr": _lokr, "vera": _vera}
KEYS = {"lora": {"a", "b"}, "loha": {"a1", "b1", "a2", "b2"}, "lokr": {"w1", "a2", "b2"},
        "vera": {"lambda_d", "lambda_b"}}
KINDS = sorted(REFERENCE)


def test_every_kind_of_the_table_has_a_reference():
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
  adapters = {p: jax.tree.map(lambda a: 0.4 * jax.random.normal(next(keys), a.shape, a.dtype), e)
              for p, e in lp.adapters.items() if p != SHARED}
  if SHARED in lp.adapters:  # a kind's shared arrays stay as lift drew them
    adapters[SHARED] = lp.adapters[SHARED]
  return params, config, lj.LoraParams(lp.base, adapters)


SHARED = "~shared"


def _shared(adapters, kind):
  return adapters.get(SHARED, {}).get(kind)


def _reference_weight(w, entry, shared, kind, scale):
  """``W + scale · ΔW`` per layer of a stacked weight, by the explicit formula."""
  if w.ndim == 3:
    return jnp.stack([_reference_weight(w[i], jax.tree.map(lambda x, i=i: x[i], entry), shared,
                                        kind, scale) for i in range(w.shape[0])])
  return w + scale * REFERENCE[kind](entry, shared)[:w.shape[0]]


def _reference_params(params, lp, config):
  out = jax.tree.map(lambda x: x, params)
  for path in ("dense", "out"):
    out[path]["kernel"] = _reference_weight(params[path]["kernel"], lp.adapters[path]["kernel"],
                                            _shared(lp.adapters, config.kind), config.kind,
                                            config.scale_for(f"{path}/kernel"))
  return out


@pytest.mark.parametrize("kind", KINDS)
def test_lift_starts_at_the_base_and_names_the_kinds_arrays(kind):
  params, config = _params(), _config(kind)
  lp = lj.lift(params, config, key=jax.random.key(1))
  entry = lp.adapters["dense"]["kernel"]
  assert set(entry) == KEYS[kind]
  np.testing.assert_array_equal(REFERENCE[kind](entry, _shared(lp.adapters, kind))[:12],
                                np.zeros((12, 10), np.float32))
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
  lifted = lj.lift(params, config, key=jax.random.key(1)).adapters
  # A kind's shared arrays stay frozen too, and hold no optimizer state.
  jax.tree.map(np.testing.assert_array_equal, _shared(lp.adapters, kind),
               _shared(lifted, kind))
  trained = sum(x.size for p, e in lp.adapters.items() if p != SHARED
                for x in jax.tree.leaves(e))
  assert 2 * trained <= sum(x.size for x in jax.tree.leaves(state)) <= 2 * trained + 4


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


def test_vera_shares_one_projection_pair_stored_once():
  params, config = _params(), _config("vera")
  lp = lj.lift(params, config, key=jax.random.key(1))
  shared = lp.adapters[SHARED]["vera"]
  # One pair for both kernels, as large as the largest input (12) and output (10) sizes.
  assert shared["projection_a"].shape == (12, 3) and shared["projection_b"].shape == (3, 10)
  # PEFT's kaiming init of its (r, max_in) and (max_out, r) layouts: ±sqrt(6 / fan_in).
  assert float(jnp.abs(shared["projection_a"]).max()) <= np.sqrt(6 / 12)
  assert float(jnp.abs(shared["projection_b"]).max()) <= np.sqrt(6 / 3)
  np.testing.assert_array_equal(lp.adapters["out"]["kernel"]["lambda_d"],
                                np.full(3, 0.1, np.float32))
  report = lj.summary(lp, config)
  assert report.shared_params == 3 * (12 + 10) and "shared (frozen):" in str(report)
  assert report.trainable_params == 2 * 3 + 10 + 6  # lambda_d and lambda_b per kernel
  # An abstract tree gives abstract shared arrays; the sharded lift replicates them.
  abstract = lj.lift(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params),
                     config, key=jax.random.key(1))
  assert isinstance(abstract.adapters[SHARED]["vera"]["projection_a"], jax.ShapeDtypeStruct)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("model",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model"))
  sharded = lj.lift(jax.tree.map(lambda x: jax.device_put(x, spec) if x.ndim == 2 else x,
                                 params), config, key=jax.random.key(1))
  placed = sharded.adapters[SHARED]["vera"]["projection_b"]
  assert placed.sharding.is_fully_replicated and len(placed.sharding.device_set) == 2
  np.testing.assert_array_equal(placed, shared["projection_b"])


def test_vera_refuses_what_its_shared_projections_cannot_serve(tmp_path):
  params, config, lp = _lifted("vera")
  with pytest.raises(ValueError, match="share one pair of projections.*ranks \\[2, 3\\]"):
    lj.lift(params, lj.LoraConfig(rank=3, kind="vera", targets="kernel$",
                                  rank_pattern={"out": 2}), key=jax.random.key(0))
  dropped = {p: e for p, e in lp.adapters.items() if p != SHARED}
  with pytest.raises(ValueError, match="needs its shared arrays .*keep the whole adapter tree"):
    lj.merge(lj.LoraParams(lp.base, dropped), config)
  small = dict(lp.adapters, **{SHARED: {"vera": {
      "projection_a": lp.adapters[SHARED]["vera"]["projection_a"][:10],
      "projection_b": lp.adapters[SHARED]["vera"]["projection_b"]}}})
  with pytest.raises(ValueError, match="dense/kernel: the shared vera array 'projection_a' has "
                     "shape \\(10, 3\\), expected \\(12, 3\\) or more"):
    jax.jit(lj.wrap(_apply, config))(lj.LoraParams(lp.base, small), jnp.ones((2, 12)))
  wrong_rank = dict(lp.adapters, **{SHARED: {"vera": {
      "projection_a": jnp.ones((12, 2)), "projection_b": jnp.ones((2, 10))}}})
  with pytest.raises(ValueError, match="'projection_a' has shape \\(12, 2\\), expected"):
    lj.save_adapters(tmp_path / "bad", lj.LoraParams(lp.base, wrong_rank), config)
  assert not (tmp_path / "bad").exists()
  with pytest.raises(ValueError, match="works on LoRA's A and B"):
    lj.stack_adapters({"x": (lp, config), "y": (lp, config)})
  # The shared arrays get no gradient (they are frozen), the per-layer vectors do.
  grads = jax.grad(lambda a: jnp.sum(lj.wrap(_apply, config)(lj.LoraParams(lp.base, a),
                                                            jnp.ones((2, 12))) ** 2))(lp.adapters)
  assert not any(jnp.any(g != 0) for g in jax.tree.leaves(grads[SHARED]))
  assert jnp.any(grads["out"]["kernel"]["lambda_b"] != 0)


# (This module runs with the oldest releases too: numpy 1.26 and the newest draw the same.)
def test_vera_projections_are_drawn_from_the_configs_seed_the_same_everywhere():
  drawn = kinds.draw_shared(kinds.of("vera"), {"projection_a": (4, 2), "projection_b": (2, 3)},
                            0, np.float32)
  # Pinned: numpy 1.26 and 2.4 give these bits; a change here would strand every checkpoint
  # that holds its projections as a seed (its load refuses them, see the test below).
  np.testing.assert_array_equal(drawn["projection_a"], np.array(
      [[0.3354862630367279, -0.5639050602912903], [-1.1243805885314941, -1.184260606765747],
       [0.7673522233963013, 1.0110405683517456], [0.26120322942733765, 0.5621494650840759]],
      np.float32))
  np.testing.assert_array_equal(drawn["projection_b"], np.array(
      [[1.3500947952270508, 0.19793200492858887, 1.042376160621643],
       [1.58141028881073, -1.5290019512176514, -0.913134753704071]], np.float32))
  # lift draws them from config.shared_seed, whatever its key; another seed draws others.
  params = _params()
  one = lj.lift(params, _config("vera"), key=jax.random.key(1)).adapters[SHARED]["vera"]
  two = lj.lift(params, _config("vera"), key=jax.random.key(2)).adapters[SHARED]["vera"]
  jax.tree.map(np.testing.assert_array_equal, one, two)
  other = lj.lift(params, lj.LoraConfig(rank=3, alpha=5.0, kind="vera", targets=r"kernel$",
                                        shared_seed=7), key=jax.random.key(1))
  assert not np.array_equal(other.adapters[SHARED]["vera"]["projection_a"], one["projection_a"])
  with pytest.raises(ValueError, match="shared_seed=7 seeds the shared arrays of kinds that "
                     "have them \\(\\['vera'\\]\\), not kind='lora'"):
    lj.LoraConfig(shared_seed=7)
  with pytest.raises(ValueError, match="shared_seed must be an integer >= 0, got -1"):
    lj.LoraConfig(kind="vera", shared_seed=-1)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(rows=st.integers(1, 40), cols=st.integers(1, 40),
                  seed=st.integers(0, 2**63), dtype=st.sampled_from(["float32", "bfloat16"]))
def test_drawn_projections_keep_peft_bounds_and_depend_on_seed_and_shape_alone(rows, cols, seed,
                                                                                dtype):
  vera = kinds.of("vera")
  shapes = {"projection_a": (rows, cols), "projection_b": (cols, rows)}
  drawn = kinds.draw_shared(vera, shapes, seed, dtype)
  again = kinds.draw_shared(vera, shapes, seed, dtype)
  for name, shape in shapes.items():
    value = drawn[name]
    assert value.shape == shape and value.dtype == jnp.dtype(dtype)
    assert value.tobytes() == again[name].tobytes()
    bound = np.float32(np.sqrt(6.0 / shape[0])).astype(jnp.dtype(dtype))
    assert np.all(np.abs(value.astype(np.float32)) <= np.float32(bound))


def test_vera_checkpoint_holds_the_seed_not_the_projections(tmp_path, monkeypatch, capsys):
  params, config, lp = _lifted("vera")
  lj.save_adapters(tmp_path / "seeded", lp, config)
  saved = ocp.PyTreeCheckpointHandler().metadata(tmp_path / "seeded" / "adapters")
  assert SHARED not in getattr(saved, "tree", saved)  # no projection is written
  loaded, _ = lj.load_adapters(tmp_path / "seeded")
  jax.tree.map(np.testing.assert_array_equal, loaded, lp.adapters)
  # Restored onto a target's shardings, the drawn ones too.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("model",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        lp.adapters)
  onto, _ = lj.load_adapters(tmp_path / "seeded", target=target)
  assert onto[SHARED]["vera"]["projection_b"].sharding == replicated
  wrong = dict(target, **{SHARED: {"vera": dict(target[SHARED]["vera"], projection_a=
                                                jax.ShapeDtypeStruct((12, 4), jnp.float32))}})
  with pytest.raises(ValueError, match="projection_a: shape \\(12, 3\\) in the checkpoint, "
                     "expected \\(12, 4\\)"):
    lj.load_adapters(tmp_path / "seeded", target=wrong)
  without = {p: e for p, e in target.items() if p != SHARED}
  with pytest.raises(ValueError, match="unexpected vera/projection_a"):
    lj.load_adapters(tmp_path / "seeded", target=without)
  # bfloat16 projections too (the record names the dtype the draw is rounded to).
  half = lj.LoraConfig(rank=3, alpha=5.0, kind="vera", targets=r"kernel$", dtype="bfloat16")
  lifted = lj.lift(params, half, key=jax.random.key(1)).adapters
  lj.save_adapters(tmp_path / "half", lifted, half)
  assert (tmp_path / "half" / "shared_drawn").is_dir()
  jax.tree.map(np.testing.assert_array_equal, lj.load_adapters(tmp_path / "half")[0], lifted)
  # Projections the seed does not draw (changed, or made by PEFT) are written as arrays.
  changed = dict(lp.adapters, **{SHARED: {"vera": dict(
      lp.adapters[SHARED]["vera"], projection_a=lp.adapters[SHARED]["vera"]["projection_a"] * 2)}})
  lj.save_adapters(tmp_path / "stored", lj.LoraParams(lp.base, changed), config)
  assert not (tmp_path / "stored" / "shared_drawn").exists()
  jax.tree.map(np.testing.assert_array_equal, lj.load_adapters(tmp_path / "stored")[0], changed)
  capsys.readouterr()
  assert cli(["inspect", str(tmp_path / "seeded")]) == 0
  assert "(drawn from shared_seed=0: the checkpoint holds the seed)" in capsys.readouterr().out
  assert cli(["inspect", str(tmp_path / "stored")]) == 0
  assert "parameters (stored in the checkpoint)" in capsys.readouterr().out
  # A draw that comes out different where it is loaded is refused, never used.
  real = kinds.draw_shared
  monkeypatch.setattr(kinds, "draw_shared", lambda *a: {
      n: v + np.float32(1e-3) for n, v in real(*a).items()})
  with pytest.raises(lj.ChecksumError, match="drawn here with numpy .* come out different"):
    lj.load_adapters(tmp_path / "seeded")
