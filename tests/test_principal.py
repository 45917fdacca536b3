"""PiSSA and OLoRA: adapters from the weight itself, base = W - s·A·B, model unchanged at init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj

INITS = [("pissa", 0), ("pissa", 4), ("olora", 0)]


def _weight(shape, decay=True, seed=0):
  """A weight with a decaying spectrum (over its last two axes), like trained kernels."""
  w = np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float64)
  if decay:
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    s = s * np.exp(-np.arange(s.shape[-1]) / 3.0)
    w = (u * s[..., None, :]) @ vt
  return jnp.asarray(w, jnp.float32)


LAYOUTS = {  # weight, config extras, function of (params, x)
    "dense": (lambda: _weight((32, 24)), {}, lambda p, x: x @ p["w"]),
    "gemma-q": (lambda: jnp.transpose(_weight((4, 12, 32)), (0, 2, 1)),  # (heads, embed, dh)
                {"in_axes": {"w$": (1,)}},
                lambda p, x: jnp.einsum("BD,NDH->BNH", x, p["w"])),
    "stacked": (lambda: _weight((3, 32, 24)), {"stack_axes": {"w$": 1}},  # per layer
                lambda p, x: jnp.einsum("LBD,LDF->LBF", jnp.broadcast_to(x, (3, *x.shape)),
                                        p["w"])),
}


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lifted_model_equals_the_base_at_init(init, layout):
  make, extra, fn = LAYOUTS[layout]
  params = {"w": make()}
  init, niter = init
  config = lj.LoraConfig(rank=4, alpha=8.0, targets=r"w$", init=init, pissa_niter=niter,
                         **extra)
  lp = lj.lift(params, config, key=jax.random.key(1))
  assert not np.allclose(lp.base["w"], params["w"])  # the base is the residual
  np.testing.assert_allclose(lj.merge(lp, config)["w"], params["w"], atol=2e-5)
  x = jax.random.normal(jax.random.key(2), (5, 32))
  np.testing.assert_allclose(jax.jit(lj.wrap(fn, config))(lp, x), fn(params, x),
                             rtol=1e-4, atol=1e-4)
  a, b = lp.adapters["w"]["a"], lp.adapters["w"]["b"]
  assert a.dtype == b.dtype == jnp.float32 and np.abs(np.asarray(b)).max() > 0


def _as_matrices(w, layout):
  w = np.asarray(w, np.float64)
  if layout == "gemma-q":
    return np.transpose(w, (1, 0, 2)).reshape(32, -1)[None]  # (embed, heads * dh)
  return w if layout == "stacked" else w[None]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pissa_is_the_best_rank_r_approximation(layout):
  make, extra, _ = LAYOUTS[layout]
  params = {"w": make()}
  config = lj.LoraConfig(rank=4, alpha=8.0, targets=r"w$", init="pissa", **extra)
  lp = lj.lift(params, config, key=jax.random.key(1))
  delta = _as_matrices(params["w"], layout) - _as_matrices(lp.base["w"], layout)  # s·A·B
  for m, d in zip(_as_matrices(params["w"], layout), delta):
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    best = (u[:, :4] * s[:4]) @ vt[:4]
    np.testing.assert_allclose(d, best, atol=2e-4 * np.abs(best).max())


def test_randomized_pissa_is_close_to_exact_and_olora_is_orthonormal():
  params = {"w": _weight((64, 48))}
  def lift(init, niter=0):
    return lj.lift(params, lj.LoraConfig(rank=4, alpha=8.0, targets=r"w$", init=init,
                                         pissa_niter=niter), key=jax.random.key(1))

  exact = lift("pissa")
  fast = lift("pissa", 2)
  d_exact = np.asarray(params["w"] - exact.base["w"])
  d_fast = np.asarray(params["w"] - fast.base["w"])
  assert np.abs(d_fast - d_exact).max() < 1e-3 * np.abs(d_exact).max()
  olora = lift("olora")
  b = np.asarray(olora.adapters["w"]["b"])
  np.testing.assert_allclose(b @ b.T, np.eye(4), atol=1e-5)  # Q's first columns, as rows


def test_sharded_base_keeps_its_sharding():
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  w = jax.device_put(_weight((32, 24)), NamedSharding(mesh, P("data", "model")))
  config = lj.LoraConfig(rank=4, alpha=8.0, targets=r"w$", init="pissa")
  lp = lj.lift({"w": w}, config, key=jax.random.key(1))
  assert lp.base["w"].sharding.spec == w.sharding.spec
  assert lp.adapters["w"]["a"].sharding.spec == P("data", None)
  assert lp.adapters["w"]["b"].sharding.spec == P(None, "model")
  np.testing.assert_allclose(lj.merge(lp, config)["w"], w, atol=2e-5)


def test_bf16_base_stays_bf16():
  params = {"w": _weight((32, 24)).astype(jnp.bfloat16)}
  config = lj.LoraConfig(rank=4, alpha=8.0, targets=r"w$", init="pissa")
  lp = lj.lift(params, config, key=jax.random.key(1))
  assert lp.base["w"].dtype == jnp.bfloat16
  merged = lj.merge(lp, config)["w"]
  np.testing.assert_allclose(np.asarray(merged, np.float32), np.asarray(params["w"], np.float32),
                             atol=2e-2 * float(jnp.abs(params["w"].astype(jnp.float32)).max()))


def test_abstract_leaves_and_bad_names_are_refused():
  config = lj.LoraConfig(rank=2, targets=r"w$", init="olora")
  with pytest.raises(ValueError, match=r"takes the adapters of w from the weight's values"):
    lj.lift({"w": jax.ShapeDtypeStruct((8, 8), jnp.float32)}, config, key=jax.random.key(0))
  for bad in ("pissa_niter_0", "svd", "PiSSA"):
    with pytest.raises(ValueError, match=r"LoraConfig.init must be one of"):
      lj.LoraConfig(init=bad)
  config = lj.LoraConfig(init="pissa", pissa_niter=4)
  assert lj.LoraConfig.from_dict(config.to_dict()) == config
  # PEFT's spelling, and records written before pissa_niter, still read as that config.
  with pytest.warns(DeprecationWarning, match="use init='pissa', pissa_niter=4"):
    assert lj.LoraConfig(init="pissa_niter_4") == config
  old = {k: v for k, v in config.to_dict().items() if k != "pissa_niter"}
  assert lj.LoraConfig.from_dict({**old, "init": "pissa_niter_4"}) == config
  for bad, match in ((dict(pissa_niter=2), "applies to init='pissa' only"),
                     (dict(init="pissa", pissa_niter=-1), "integer >= 0"),
                     (dict(init="pissa", pissa_niter=True), "integer >= 0")):
    with pytest.raises(ValueError, match=match):
      lj.LoraConfig(**bad)


def test_peft_export_of_principal_adapters_is_refused(tmp_path):
  params = {"w": _weight((32, 24))}
  config = lj.LoraConfig(rank=4, alpha=8.0, targets=r"w$", init="pissa", in_axes={"w$": 1})
  lp = lj.lift(params, config, key=jax.random.key(1))
  with pytest.raises(ValueError, match=r"apply to the residual base"):
    lj.save_peft(tmp_path / "peft", lp, config)
  assert not (tmp_path / "peft").exists()


def test_principal_adapters_remember_the_residual_base(tmp_path):
  """Saved adapters refer to the residual base: merging them into the original is refused."""
  params = {"w": _weight((32, 24))}
  config = lj.LoraConfig(rank=4, alpha=8.0, targets=r"w$", init="olora")
  lp = lj.lift(params, config, key=jax.random.key(1))
  lj.save_adapters(tmp_path / "adapters", lp, config)
  lj.load_adapters(tmp_path / "adapters", base=lp.base)
  with pytest.raises(lj.BaseMismatch, match=r"w: other values"):
    lj.load_adapters(tmp_path / "adapters", base=params)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("layout", ["dense", "stacked"])
@pytest.mark.parametrize("rslora", [False, True])
def test_trained_principal_adapters_convert_to_standard_lora(init, layout, rslora, tmp_path):
  """W - s·A0·B0 + s·A·B == W + s·[A, A0]·[B; -B0]: the converted adapters apply to W."""
  make, extra, fn = LAYOUTS[layout]
  params = {"w": make()}
  config = lj.LoraConfig(rank=4, alpha=8.0, targets=r"w$", init=init, use_rslora=rslora,
                         rank_pattern={"w$": 3}, alpha_pattern={"w$": 6.0}, **extra)
  lp = lj.lift(params, config, key=jax.random.key(1))
  initial = lp.adapters
  trained = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(jax.random.key(3), v.shape),
                         lp.adapters)  # stands for training
  tuned = lj.merge(lj.LoraParams(lp.base, trained), config)["w"]
  adapters, standard = lj.principal_to_lora(trained, initial, config)
  assert standard.init == "default" and standard.rank == 8 and standard.rank_for("w") == 6
  assert standard.scale_for("w") == pytest.approx(config.scale_for("w"))
  on_original = lj.LoraParams(params, adapters)
  np.testing.assert_allclose(lj.merge(on_original, standard)["w"], tuned, atol=5e-5)
  x = jax.random.normal(jax.random.key(2), (5, 32))
  np.testing.assert_allclose(lj.wrap(fn, standard)(on_original, x),
                             lj.wrap(fn, config)(lj.LoraParams(lp.base, trained), x),
                             rtol=1e-4, atol=1e-4)
  # Saved with the original base, they are checked against (and merge into) the original.
  lj.save_adapters(tmp_path / "std", on_original, standard)
  lj.load_adapters(tmp_path / "std", base=params)


def test_conversion_refuses_standard_or_mismatched_adapters():
  params = {"w": _weight((32, 24))}
  config = lj.LoraConfig(rank=4, alpha=8.0, targets=r"w$", init="pissa")
  lp = lj.lift(params, config, key=jax.random.key(1))
  with pytest.raises(ValueError, match=r"already apply to the original base"):
    lj.principal_to_lora(lp.adapters, lp.adapters, lj.LoraConfig(rank=4, targets=r"w$"))
  other = lj.lift(params, lj.LoraConfig(rank=2, targets=r"w$", init="pissa"),
                  key=jax.random.key(1))
  with pytest.raises(ValueError, match=r"differ at \['w'\]"):
    lj.principal_to_lora(lp.adapters, other.adapters, config)
