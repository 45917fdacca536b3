"""The public API's conventions, checked: writers take the directory first, every ``save_`` has
its ``load_``, and the previous release's names still work, with a ``DeprecationWarning``."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj

WRITERS = [n for n in lj.__all__ if n.startswith("save_")]


def test_every_writer_takes_the_directory_first_and_has_a_reader():
  assert sorted(WRITERS) == ["save_adapters", "save_peft", "save_quantized", "save_train_state"]
  for name in WRITERS:
    first = next(iter(inspect.signature(getattr(lj, name)).parameters))
    assert first == "directory", name
    reader = getattr(lj, "load_" + name.removeprefix("save_"))
    assert next(iter(inspect.signature(reader).parameters)) == "directory", reader


def _lifted():
  params = {"dense": {"kernel": jnp.arange(12.0).reshape(4, 3) / 10, "bias": jnp.zeros(3)}}
  config = lj.LoraConfig(rank=2, targets=r"kernel$")
  lp = lj.lift(params, config, key=jax.random.key(0))
  adapters = jax.tree.map(lambda x: x + 0.5, lp.adapters)
  return params, config, lj.LoraParams(params, adapters)


def test_previous_names_warn_and_do_the_same(tmp_path):
  params, config, lp = _lifted()
  with pytest.warns(DeprecationWarning, match=r"save_peft\(directory, adapters, config\)"):
    lj.export_peft(lp, config, tmp_path / "old")
  lj.save_peft(tmp_path / "new", lp, config)
  assert ((tmp_path / "old" / "adapter_model.safetensors").read_bytes()
          == (tmp_path / "new" / "adapter_model.safetensors").read_bytes())
  with pytest.warns(DeprecationWarning, match="use lora_jax.load_peft"):
    old, _ = lj.import_peft(tmp_path / "old", params=params)
  new, _ = lj.load_peft(tmp_path / "new", params=params)
  for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
    np.testing.assert_array_equal(a, b)

  state = {"adapters": lp.adapters, "opt": optax.adam(1e-3).init(lp.adapters)}
  lj.save_train_state(tmp_path / "state", 3, state, config)
  with pytest.warns(DeprecationWarning, match="use lora_jax.load_train_state"):
    step, _ = lj.restore_train_state(tmp_path / "state", state, config=config)
  assert step == 3


def test_dtype_means_an_array_dtype():
  params = {"k": jnp.ones((4, 64))}
  with pytest.warns(DeprecationWarning, match="use kind="):
    old = lj.quantize(params, targets="k", dtype="int8")
  new = lj.quantize(params, targets="k", kind="int8")
  assert repr(old["k"]) == repr(new["k"])
  with pytest.raises(ValueError, match="disagree"), pytest.warns(DeprecationWarning):
    lj.quantize(params, targets="k", kind="int8", dtype="nf4")
  for fn in (lj.merge, lj.dequantize):
    assert "dtype" in inspect.signature(fn).parameters
