"""LoraConfig: presets, serialization, YAML files, hashability."""

import json
import pathlib

import jax
import jax.numpy as jnp
import pytest

import lora_jax as lj

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset, rank, alpha", [
    ("low_rank", 4, 8.0), ("medium_rank", 16, 32.0), ("high_rank", 64, 128.0)])
def test_presets_and_yaml_files(preset, rank, alpha):
  config = getattr(lj.LoraConfig, preset)()
  assert (config.rank, config.alpha) == (rank, alpha)
  from_file = lj.LoraConfig.from_yaml(ROOT / "configs" / f"{preset}.yaml")
  assert (from_file.rank, from_file.alpha) == (rank, alpha)
  assert getattr(lj.LoraConfig, preset)(targets=r"q$").targets == ("q$",)


def test_json_round_trip():
  config = lj.LoraConfig(rank=4, alpha=3.0, targets=("a", "b"), exclude="c", dropout=0.1,
                         rank_pattern={"a": 2}, alpha_pattern={"b": 1.5}, use_rslora=True,
                         trainable=("bias$",), init="gaussian", in_axes={"x": 2},
                         stack_axes={"y": 1}, dtype="bfloat16")
  data = json.loads(json.dumps(config.to_dict()))
  assert lj.LoraConfig.from_dict(data) == config
  assert lj.LoraConfig.from_json(config.to_json()) == config
  assert hash(lj.LoraConfig.from_dict(data)) == hash(config)


def test_unknown_key_names_allowed_keys(tmp_path):
  with pytest.raises(ValueError, match=r"Unknown LoraConfig key\(s\) \['lora_rank'\]; allowed "
                     r"keys are \['rank', 'alpha'"):
    lj.LoraConfig.from_dict({"lora_rank": 4})
  path = tmp_path / "bad.yaml"
  path.write_text("rank: -3\n")
  with pytest.raises(ValueError, match=r"bad.yaml: LoraConfig.rank must be a positive integer"):
    lj.LoraConfig.from_yaml(path)


def test_static_jit_argument():
  calls = []

  def f(x, config):
    calls.append(1)
    return x * config.scale_for("k")

  jitted = jax.jit(f, static_argnums=1)
  jitted(jnp.ones(2), lj.LoraConfig(rank=4))
  jitted(jnp.ones(2), lj.LoraConfig(rank=4))
  assert len(calls) == 1


def test_axis_positions_survive_json_and_yaml_lists():
  config = lj.LoraConfig(in_axes={r"c_attn/kernel$": (1,)}, stack_axes={r"kv/w$": [0]})
  assert config.in_axes == ((r"c_attn/kernel$", (1,)),)
  assert config.stack_axes == ((r"kv/w$", (0,)),)  # a YAML/JSON list becomes a tuple
  assert lj.LoraConfig.from_json(config.to_json()) == config
  assert hash(config) == hash(lj.LoraConfig.from_dict(config.to_dict()))


def test_stack_axes_hold_positions_only():
  """A count of stacked axes is stored as the leading positions: one meaning per field, so
  every reader takes positions (and an older record with a count reads as the same config)."""
  config = lj.LoraConfig(stack_axes={r"layers/.*kernel$": 2, r"scan/w$": 0})
  assert config.stack_axes == ((r"layers/.*kernel$", (0, 1)), (r"scan/w$", ()))
  assert config == lj.LoraConfig(stack_axes={r"layers/.*kernel$": (0, 1), r"scan/w$": ()})
  assert config.stack_axes_for("layers/0/kernel") == (0, 1)
  assert config.stack_axes_for("scan/w") == () and config.stack_axes_for("other") == ()
  record = {**config.to_dict(), "stack_axes": {r"layers/.*kernel$": 2, r"scan/w$": 0}}
  assert lj.LoraConfig.from_dict(record) == config
  with pytest.raises(ValueError, match=r"stack_axes gives axis positions \(0, 1, 2\), but the "
                     r"leaf of shape \(2, 3\) has axes 0 to 1"):
    lj.lift({"k": jnp.ones((2, 3))}, lj.LoraConfig(targets="k", stack_axes={"k": 3}),
            key=jax.random.key(0))
