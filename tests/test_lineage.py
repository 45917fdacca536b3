"""Adapters remember the base they were trained on; another base is refused, not merged."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from lora_jax._src.cli.main import main as cli
from lora_jax._src.io import lineage

CONFIG = lj.LoraConfig(rank=2, targets=r"kernel$")


def _params(seed=0, dtype=jnp.float32):
  k = jax.random.split(jax.random.key(seed), 2)
  return {"dense": {"kernel": jax.random.normal(k[0], (16, 12)).astype(dtype),
                    "bias": jnp.zeros(12)},
          "out": {"kernel": jax.random.normal(k[1], (12, 4)).astype(dtype)}}


@pytest.fixture
def saved(tmp_path):
  params = _params()
  lp = lj.lift(params, CONFIG, key=jax.random.key(1))
  lp = lj.LoraParams(lp.base, jax.tree.map(lambda x: x + 0.1, lp.adapters))
  lj.save_adapters(tmp_path / "adapters", lp, CONFIG)
  return params, lp, tmp_path


def test_load_onto_the_training_base_passes(saved):
  params, lp, tmp = saved
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    loaded, _ = lj.load_adapters(tmp / "adapters", base=params)
    lj.load_adapters(tmp / "adapters", base=lp)  # a LoraParams works as well
  jax.tree.map(np.testing.assert_array_equal, loaded, lp.adapters)


@pytest.mark.parametrize("change, match", [
    (lambda p: {**p, "out": {"kernel": p["out"]["kernel"] * 1.01}},
     r"out/kernel: other values \(float32 here, trained on float32"),
    (lambda p: {**p, "out": {"kernel": p["out"]["kernel"][:, :2]}},
     r"out/kernel: shape \(12, 2\) float32 here, trained on \(12, 4\) float32"),
    (lambda p: {"dense": p["dense"]}, r"out/kernel: absent from this base"),
    (lambda p: _params(seed=5), r"in 2 of 2 adapted leaves"),
], ids=["values", "shape", "missing", "another-model"])
def test_another_base_is_refused_naming_the_leaf(saved, change, match):
  params, _, tmp = saved
  with pytest.raises(lj.BaseMismatch, match=match):
    lj.load_adapters(tmp / "adapters", base=change(params))
  with pytest.warns(UserWarning, match=match):
    lj.load_adapters(tmp / "adapters", base=change(params), force=True)


def test_same_weights_in_another_floating_dtype_match(saved):
  params, _, tmp = saved
  for dtype in (jnp.bfloat16, jnp.float16):
    other = jax.tree.map(lambda v, dtype=dtype: v.astype(dtype), params)
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      lj.load_adapters(tmp / "adapters", base=other)


def test_adapters_saved_alone_carry_no_fingerprint_and_say_so(tmp_path):
  params = _params()
  lp = lj.lift(params, CONFIG, key=jax.random.key(1))
  lj.save_adapters(tmp_path / "alone", lp.adapters, CONFIG)
  with pytest.warns(UserWarning, match="records no base fingerprint"):
    lj.load_adapters(tmp_path / "alone", base=params)


def test_fingerprint_is_the_same_on_host_device_and_mesh():
  value = jax.random.normal(jax.random.key(2), (64, 48)).astype(jnp.bfloat16)
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  sharded = jax.device_put(value, NamedSharding(mesh, P("data", "model")))
  host = lineage.leaf_fingerprint(np.asarray(value))
  assert host == lineage.leaf_fingerprint(value) == lineage.leaf_fingerprint(sharded)
  assert host["values"] is not None
  assert lineage.leaf_fingerprint(jax.ShapeDtypeStruct((64, 48), jnp.bfloat16))["values"] is None


def _base_checkpoint(params, path):
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, params)
  checkpointer.wait_until_finished()
  return path


def test_merge_cli_refuses_another_base_and_writes_nothing(saved, capsys):
  params, _, tmp = saved
  good = _base_checkpoint(params, tmp / "base")
  other = _base_checkpoint(_params(seed=5), tmp / "other")
  assert cli(["merge", "--base", str(good), "--adapters", str(tmp / "adapters"),
              "--out", str(tmp / "merged")]) == 0
  assert "adapters: 2 adapted base leaves match the fingerprint" in capsys.readouterr().out
  with pytest.raises(lj.BaseMismatch, match=r"nothing was written"):
    lj.merge_checkpoint(other, tmp / "adapters", tmp / "wrong")
  assert not (tmp / "wrong").exists() and not list(tmp.glob("wrong*"))
  # Forced: merged with a warning, and the report counts the leaves that matched.
  with pytest.warns(UserWarning, match=r"in 2 of 2 adapted leaves"):
    report = lj.merge_checkpoint(other, tmp / "adapters", tmp / "forced", force=True)
  assert report["lineage"] == 0 and (tmp / "forced").is_dir()
  assert cli(["inspect", str(tmp / "adapters")]) == 0
  out = capsys.readouterr().out
  assert "trained on base leaf" in out and "out/kernel" in out and "(12, 4)" in out
