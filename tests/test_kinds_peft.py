"""Each adapter kind against the real peft package: exported adapters load in PEFT with equal
outputs (applied and after merge_and_unload), and PEFT-made adapters load here with PEFT's
outputs (factored and merged)."""

import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.slow  # the real peft and torch

# kind -> (PEFT config class, its alpha field or None), for PEFT-made adapters.
PEFT_CONFIGS = {"lora": (peft.LoraConfig, "lora_alpha"), "loha": (peft.LoHaConfig, "alpha"),
                "lokr": (peft.LoKrConfig, "alpha"), "vera": (peft.VeraConfig, None)}
PEFT_RANDOM_INIT = {"lora": {"init_lora_weights": False}, "loha": {"init_weights": False},
                    "lokr": {"init_weights": False}, "vera": {"init_weights": False}}
# (rank, Dense_1's rank): LoKr's ranks stay below half its second Kronecker factor, where
# PEFT stores lokr_w2 as two factors; VeRA's projections have one rank for all modules.
RANKS = {"lora": (4, 2), "loha": (4, 2), "lokr": (2, 1), "vera": (4, 4)}


class FlaxMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(24)(x))
    return nn.Dense(6)(h)


class TorchMLP(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.Dense_0 = torch.nn.Linear(10, 24)
    self.Dense_1 = torch.nn.Linear(24, 6)

  def forward(self, x):
    return self.Dense_1(torch.nn.functional.gelu(self.Dense_0(x), approximate="tanh"))


def _models():
  x = jax.random.normal(jax.random.key(0), (5, 10))
  params = jax.jit(FlaxMLP().init)(jax.random.key(1), x)
  torch_model = TorchMLP()
  state = {}
  for path, value in zip(lj.paths(params), jax.tree.leaves(params)):
    name, leaf = path.split("/")[1:3]
    value = np.asarray(value)
    state[f"{name}.{'bias' if leaf == 'bias' else 'weight'}"] = value if leaf == "bias" \
        else value.T
  torch_model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
  return params, x, torch_model.eval(), torch.from_numpy(np.array(x))


@pytest.mark.parametrize("kind", sorted(PEFT_CONFIGS))
def test_export_loads_in_peft_with_equal_outputs(tmp_path, kind):
  params, x, torch_model, x_torch = _models()
  rank, last = RANKS[kind]
  config = lj.LoraConfig(rank=rank, alpha=5.0, kind=kind, rank_pattern={"Dense_1": last},
                         alpha_pattern={"Dense_1": 4.0})
  lp = lj.lift(params, config, key=jax.random.key(2))
  keys = iter(jax.random.split(jax.random.key(3), 64))
  lp = lj.LoraParams(lp.base, jax.tree.map(
      lambda a: a + 0.3 * jax.random.normal(next(keys), a.shape), lp.adapters))
  expected = np.asarray(lj.wrap(FlaxMLP().apply, config)(lp, x))
  lj.save_peft(tmp_path / "peft", lp, config)
  written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert written["peft_type"] == kind.upper() and written["r"] == rank
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)  # PEFT warns on config fields it does not know
    peft_model = peft.PeftModel.from_pretrained(torch_model, str(tmp_path / "peft")).eval()
  with torch.no_grad():
    got = peft_model(x_torch).numpy()
    with peft_model.disable_adapter():
      base = peft_model(x_torch).numpy()
    merged = peft_model.merge_and_unload()(x_torch).numpy()
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(merged, expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(base, FlaxMLP().apply(params, x), rtol=1e-4, atol=1e-4)
  assert not np.allclose(got, base, atol=1e-2)  # the adapters did change the output


@pytest.mark.parametrize("kind", sorted(PEFT_CONFIGS))
def test_import_peft_made_adapter_gives_peft_outputs(tmp_path, kind):
  params, x, torch_model, x_torch = _models()
  make, alpha_field = PEFT_CONFIGS[kind]
  torch.manual_seed(0)
  rank, last = RANKS[kind]
  # VeRA has no alpha (its scale is in lambda_b) and one rank (its projections are shared).
  patterns = {} if alpha_field is None else {
      alpha_field: 8, "rank_pattern": {"Dense_1": last}, "alpha_pattern": {"Dense_0": 5}}
  peft_config = make(r=rank, target_modules=["Dense_0", "Dense_1"], **patterns,
                     **PEFT_RANDOM_INIT[kind])
  peft_model = peft.get_peft_model(torch_model, peft_config).eval()
  with torch.no_grad():
    expected = peft_model(x_torch).numpy()
  peft_model.save_pretrained(str(tmp_path / "made_by_peft"))
  adapters, config = lj.load_peft(tmp_path / "made_by_peft", params=params)
  assert config.kind == kind and config.rank == rank
  assert config.alpha == (8.0 if alpha_field else rank)  # VeRA: scale 1
  lp = lj.LoraParams(params, adapters)
  for mode in ("factored", "merge"):
    got = lj.wrap(FlaxMLP().apply, config, mode=mode)(lp, x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  with torch.no_grad():
    merged = peft_model.merge_and_unload()(x_torch).numpy()
  np.testing.assert_allclose(FlaxMLP().apply(lj.merge(lp, config), x), merged, rtol=1e-4,
                             atol=1e-4)
  # Saved and loaded: PEFT's torch-drawn projections are not what config.shared_seed draws,
  # so the checkpoint keeps them as arrays.
  lj.save_adapters(tmp_path / "ckpt", adapters, config)
  assert not (tmp_path / "ckpt" / "shared_drawn").exists()
  jax.tree.map(np.testing.assert_array_equal, lj.load_adapters(tmp_path / "ckpt")[0], adapters)
  # Exported again, PEFT reads back the same adapter.
  lj.save_peft(tmp_path / "again", lp, config)
  again = peft.PeftModel.from_pretrained(_models()[2], str(tmp_path / "again")).eval()
  with torch.no_grad():
    np.testing.assert_allclose(again(x_torch).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_other_kinds_refuse_what_peft_cannot_hold(tmp_path):
  ids = jnp.zeros((2, 3), jnp.int32)
  params = {"Embed_0": {"embedding": jnp.ones((20, 8))}}
  config = lj.LoraConfig(rank=2, kind="loha", targets="embedding")
  lp = lj.lift(params, config, key=jax.random.key(0))
  with pytest.raises(ValueError, match="an embedding table with a loha adapter"):
    lj.save_peft(tmp_path / "p", lp, config)
  del ids
  with pytest.raises(ValueError, match="no rank-stabilized scale"):
    params, *_ = _models()
    rs = lj.LoraConfig(rank=2, kind="loha", use_rslora=True)
    lj.save_peft(tmp_path / "q", lj.lift(params, rs, key=jax.random.key(0)), rs)
  with pytest.raises(ValueError, match="PEFT stores a full lokr_w2"):
    params, *_ = _models()
    big = lj.LoraConfig(rank=3, kind="lokr")
    lj.save_peft(tmp_path / "r", lj.lift(params, big, key=jax.random.key(0)), big)
  assert not any((tmp_path / n).exists() for n in "pqr")


def test_vera_saved_without_projections_is_refused(tmp_path):
  params, _, torch_model, _ = _models()
  with pytest.warns(UserWarning, match="not save vera_A and vera_B"):
    peft_model = peft.get_peft_model(torch_model, peft.VeraConfig(
        r=4, target_modules=["Dense_0", "Dense_1"], save_projection=False, init_weights=False))
    peft_model.save_pretrained(str(tmp_path / "p"))
  with pytest.raises(ValueError, match="base_model.vera_A is missing: .*save_projection=False.*"
                     "torch's generator"):
    lj.load_peft(tmp_path / "p", params=params)
