"""PEFT interop against the real peft package: export to PEFT, import from PEFT."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


class FlaxText(nn.Module):
  @nn.compact
  def __call__(self, ids):
    h = nn.gelu(nn.Dense(32)(nn.Embed(50, 16)(ids)))
    return nn.Dense(8)(h)


class TorchText(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.Embed_0 = torch.nn.Embedding(50, 16)
    self.Dense_0 = torch.nn.Linear(16, 32)
    self.Dense_1 = torch.nn.Linear(32, 8)

  def forward(self, ids):
    h = torch.nn.functional.gelu(self.Dense_0(self.Embed_0(ids)), approximate="tanh")
    return self.Dense_1(h)


class FlaxConv(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    return nn.Conv(6, (3, 3), padding="VALID", use_bias=False)(x)


class TorchConv(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.Conv_0 = torch.nn.Conv2d(3, 8, 3, padding=1)
    self.Conv_1 = torch.nn.Conv2d(8, 6, 3, bias=False)

  def forward(self, x):
    return self.Conv_1(torch.relu(self.Conv_0(x)))


def _copy_into_torch(params, module):
  """Gives the PyTorch model the Flax model's weights."""
  state = {}
  for path, value in zip(lj.paths(params), jax.tree.leaves(params)):
    name, leaf = path.split("/")[1], path.split("/")[2]
    value = np.asarray(value)
    if leaf == "embedding":
      state[f"{name}.weight"] = value
    elif leaf == "bias":
      state[f"{name}.bias"] = value
    elif value.ndim == 4:
      state[f"{name}.weight"] = value.transpose(3, 2, 0, 1)
    else:
      state[f"{name}.weight"] = value.T
  module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
  return module.eval()


def _text():
  ids = jax.random.randint(jax.random.key(0), (3, 7), 0, 50)
  params = jax.jit(FlaxText().init)(jax.random.key(1), ids)
  return FlaxText(), params, ids, _copy_into_torch(params, TorchText()), torch.from_numpy(
      np.asarray(ids, np.int64))


def _conv():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  params = jax.jit(FlaxConv().init)(jax.random.key(1), x)
  x_torch = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
  return FlaxConv(), params, x, _copy_into_torch(params, TorchConv()), x_torch


def _to_flax_layout(out, conv):
  out = out.detach().numpy()
  return out.transpose(0, 2, 3, 1) if conv else out


@pytest.mark.parametrize("conv", [False, True])
def test_export_loads_in_peft_with_equal_outputs(tmp_path, conv):
  model, params, x, torch_model, x_torch = _conv() if conv else _text()
  last = "Conv_1" if conv else "Dense_1"
  config = lj.LoraConfig(rank=4, alpha=8.0, targets=r"kernel$" if conv else (r"kernel$", "emb"),
                         rank_pattern={last: 2}, alpha_pattern={last: 3.0}, use_rslora=True)
  lp = lj.lift(params, config, key=jax.random.key(2))
  lp = lj.LoraParams(lp.base, jax.tree.map(
      lambda a: a + 0.3 * jax.random.normal(jax.random.key(3), a.shape), lp.adapters))
  expected = np.asarray(lj.wrap(model.apply, config)(lp, x))
  lj.export_peft(lp.adapters, config, tmp_path / "peft")
  written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert written["r"] == 4 and written["use_rslora"] is True
  peft_model = peft.PeftModel.from_pretrained(torch_model, str(tmp_path / "peft")).eval()
  with torch.no_grad():
    got = _to_flax_layout(peft_model(x_torch), conv)
    with peft_model.disable_adapter():
      base = _to_flax_layout(peft_model(x_torch), conv)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(base, model.apply(params, x), rtol=1e-4, atol=1e-4)
  assert not np.allclose(got, base, atol=1e-2)  # the adapters did change the output


@pytest.mark.parametrize("conv", [False, True])
def test_import_peft_made_adapter_gives_peft_outputs(tmp_path, conv):
  model, params, x, torch_model, x_torch = _conv() if conv else _text()
  targets = ["Conv_0", "Conv_1"] if conv else ["Embed_0", "Dense_0", "Dense_1"]
  torch.manual_seed(0)
  peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                init_lora_weights=False, rank_pattern={targets[-1]: 2},
                                alpha_pattern={targets[0]: 5})
  peft_model = peft.get_peft_model(torch_model, peft_config).eval()
  with torch.no_grad():
    expected = _to_flax_layout(peft_model(x_torch), conv)
  peft_model.save_pretrained(str(tmp_path / "made_by_peft"))
  adapters, config = lj.import_peft(tmp_path / "made_by_peft", params=params)
  assert config.rank == 4 and config.alpha == 8.0
  out = lj.wrap(model.apply, config)(lj.LoraParams(params, adapters), x)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)


def test_bad_peft_files(tmp_path):
  (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "r": 4}))
  (tmp_path / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
  with pytest.raises(ValueError, match=r"peft_type is 'IA3', only LORA"):
    lj.import_peft(tmp_path)
  (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
  (tmp_path / "adapter_model.safetensors").write_bytes(b"\xff\xff")
  with pytest.raises(ValueError, match=r"Cannot read the PEFT adapter in"):
    lj.import_peft(tmp_path)


def test_stacked_adapters_are_refused(tmp_path):
  config = lj.LoraConfig(rank=2, stack_axes={"layers": 1})
  lp = lj.lift({"layers": {"kernel": jnp.ones((3, 4, 4))}}, config, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"layers/kernel: stacked \(scanned\) adapters have no "
                     r"PEFT equivalent"):
    lj.export_peft(lp.adapters, config, tmp_path)
