"""lora-jax merge / inspect: streaming merge of checkpoints, formats, safety, errors."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from reference import reference_merge

import lora_jax as lj
from lora_jax._src.cli.main import main as cli


@pytest.fixture
def setup(tmp_path):
  k = jax.random.split(jax.random.key(0), 4)
  params = {"params": {
      "attn": {"query": {"kernel": jax.random.normal(k[0], (16, 2, 8)), "bias": jnp.zeros((2, 8))},
               "out": {"kernel": jax.random.normal(k[1], (2, 8, 16)), "bias": jnp.zeros(16)}},
      "mlp": {"kernel": jax.random.normal(k[2], (16, 32)).astype(jnp.bfloat16)},
      "embed": {"embedding": jax.random.normal(k[3], (50, 16))},
      "step": jnp.asarray(7, jnp.int32)}}
  config = lj.LoraConfig(rank=4, targets=(r"kernel$", r"embedding$"))
  lp = lj.lift(params, config, key=jax.random.key(1))
  lp = lj.LoraParams(lp.base, jax.tree.map(lambda x: x + 0.1, lp.adapters))
  base_dir = tmp_path / "base"
  ocp.StandardCheckpointer().save(base_dir, params)
  ocp.StandardCheckpointer().wait_until_finished()
  lj.save_adapters(tmp_path / "adapters", lp.adapters, config)
  return params, lp, config, base_dir, tmp_path


def _check(merged, params, lp, config):
  expected = reference_merge(params, lp.adapters, config)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  for m, e, p in zip(jax.tree.leaves(merged), jax.tree.leaves(expected), jax.tree.leaves(params)):
    assert m.dtype == p.dtype and m.shape == p.shape
    tol = 1e-2 if p.dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(m, np.float32), np.asarray(e, np.float32),
                               rtol=tol, atol=tol)


def test_merge_orbax_matches_in_memory_merge(setup, capsys):
  params, lp, config, base_dir, tmp = setup
  assert cli(["merge", "--base", str(base_dir), "--adapters", str(tmp / "adapters"),
              "--out", str(tmp / "merged"), "--group-mb", "0"]) == 0
  assert "merged 4 of 7 leaves" in capsys.readouterr().out
  merged = ocp.StandardCheckpointer().restore(tmp / "merged")
  _check(merged, params, lp, config)
  assert not list(tmp.glob("merged.partial-*"))


def test_merge_from_manager_step_and_to_safetensors_and_back(setup):
  params, lp, config, _, tmp = setup
  with ocp.CheckpointManager(tmp / "run") as manager:
    manager.save(100, args=ocp.args.StandardSave(params))
    manager.wait_until_finished()
  lj.merge_checkpoint(tmp / "run" / "100", tmp / "adapters", tmp / "m.safetensors",
                      output_format="safetensors")
  from safetensors.flax import load_file

  loaded = load_file(str(tmp / "m.safetensors"))
  assert "params/attn/query/kernel" in loaded
  _check(lj._src.core.tree.nest(loaded), params, lp, config)
  # A safetensors base works too; cast to bfloat16 on the way.
  lj.merge_checkpoint(tmp / "m.safetensors", tmp / "adapters", tmp / "again",
                      dtype="bfloat16")
  again = ocp.StandardCheckpointer().restore(tmp / "again")
  assert again["params"]["embed"]["embedding"].dtype == jnp.bfloat16
  assert again["params"]["step"].dtype == jnp.int32  # integers are not cast


def test_safe_refuses_nan_and_writes_nothing(setup, capsys):
  params, lp, config, base_dir, tmp = setup
  bad = jax.tree.map(lambda x: x, lp.adapters)
  bad["params"]["mlp"]["kernel"]["b"] = bad["params"]["mlp"]["kernel"]["b"].at[0, 0].set(jnp.nan)
  lj.save_adapters(tmp / "bad", bad, config)
  code = cli(["merge", "--base", str(base_dir), "--adapters", str(tmp / "bad"),
              "--out", str(tmp / "merged"), "--safe"])
  assert code == 2
  err = capsys.readouterr().err
  assert "merged leaf params/mlp/kernel (shape (16, 32)) has 16 NaN/Inf values" in err
  assert not (tmp / "merged").exists() and not list(tmp.glob("merged.partial-*"))


def test_mismatched_adapters_and_missing_inputs(setup, capsys):
  params, lp, config, base_dir, tmp = setup
  other = lj.lift({"params": {"mlp": {"kernel": jnp.ones((16, 32))}}},
                  lj.LoraConfig(rank=4), key=jax.random.key(0))
  lj.save_adapters(tmp / "other", {"params": {"mlp2": other.adapters["params"]["mlp"]}}, config)
  assert cli(["merge", "--base", str(base_dir), "--adapters", str(tmp / "other"),
              "--out", str(tmp / "x")]) == 2
  err = capsys.readouterr().err
  assert "params/mlp2/kernel: unexpected adapter" in err
  assert "params/attn/query/kernel: missing adapter" in err
  assert cli(["merge", "--base", str(tmp / "nope"), "--adapters", str(tmp / "adapters"),
              "--out", str(tmp / "x")]) == 2
  assert "No base checkpoint at" in capsys.readouterr().err
  (tmp / "trunc.safetensors").write_bytes(b"\x10\x00\x00")
  assert cli(["merge", "--base", str(tmp / "trunc.safetensors"), "--adapters",
              str(tmp / "adapters"), "--out", str(tmp / "x")]) == 2
  assert "is not a valid safetensors file" in capsys.readouterr().err
  assert not (tmp / "x").exists()


@pytest.mark.slow
def test_inspect_console_script(setup):
  *_, tmp = setup
  result = subprocess.run([sys.executable, "-m", "lora_jax._src.cli.main", "inspect",
                           str(tmp / "adapters")], capture_output=True, text=True, check=True)
  assert '"rank": 4' in result.stdout
  assert "params/attn/out/kernel" in result.stdout and "(2, 8, 4)" in result.stdout
  assert "4 adapted leaves" in result.stdout
