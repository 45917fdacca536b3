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

pytestmark = pytest.mark.slow  # the real peft and torch


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


def _perturbed(lp):
  """Non-zero B (and, for DoRA, magnitudes away from ‖W‖) so the adapters change outputs."""
  keys = iter(jax.random.split(jax.random.key(3), 64))
  return lj.LoraParams(lp.base, jax.tree.map(
      lambda a: a + 0.3 * jax.random.normal(next(keys), a.shape), lp.adapters))


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("conv", [False, True])
def test_export_loads_in_peft_with_equal_outputs(tmp_path, conv, dora):
  model, params, x, torch_model, x_torch = _conv() if conv else _text()
  last = "Conv_1" if conv else "Dense_1"
  config = lj.LoraConfig(rank=4, alpha=8.0, targets=r"kernel$" if conv else (r"kernel$", "emb"),
                         rank_pattern={last: 2}, alpha_pattern={last: 3.0}, use_rslora=True,
                         in_axes={"Conv_1": 3} if conv else {},  # Conv_1 has no bias to tell
                         head_tied={"Embed_0": False},  # its own head (Dense_1), as in PyTorch
                         use_dora=dora)
  lp = _perturbed(lj.lift(params, config, key=jax.random.key(2)))
  expected = np.asarray(lj.wrap(model.apply, config)(lp, x))
  lj.save_peft(tmp_path / "peft", lp, config)
  written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert written["r"] == 4 and written["use_rslora"] is True and written["use_dora"] is dora
  peft_model = peft.PeftModel.from_pretrained(torch_model, str(tmp_path / "peft")).eval()
  with torch.no_grad():
    got = _to_flax_layout(peft_model(x_torch), conv)
    with peft_model.disable_adapter():
      base = _to_flax_layout(peft_model(x_torch), conv)
    merged = _to_flax_layout(peft_model.merge_and_unload()(x_torch), conv)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(merged, expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(base, model.apply(params, x), rtol=1e-4, atol=1e-4)
  assert not np.allclose(got, base, atol=1e-2)  # the adapters did change the output


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("conv", [False, True])
def test_import_peft_made_adapter_gives_peft_outputs(tmp_path, conv, dora):
  model, params, x, torch_model, x_torch = _conv() if conv else _text()
  targets = ["Conv_0", "Conv_1"] if conv else ["Embed_0", "Dense_0", "Dense_1"]
  torch.manual_seed(0)
  peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                init_lora_weights=False, rank_pattern={targets[-1]: 2},
                                alpha_pattern={targets[0]: 5}, use_dora=dora)
  peft_model = peft.get_peft_model(torch_model, peft_config).eval()
  if dora:  # magnitudes away from ‖W‖, so that a lost or misplaced m shows
    with torch.no_grad():
      for name, value in peft_model.named_parameters():
        if "lora_magnitude_vector" in name:
          value.mul_(torch.linspace(0.5, 1.5, value.numel()).reshape(value.shape))
  with torch.no_grad():
    expected = _to_flax_layout(peft_model(x_torch), conv)
  peft_model.save_pretrained(str(tmp_path / "made_by_peft"))
  # Which tables are also the output head: read from the model (here: none, Dense_1 is).
  tied = None if conv else lj.infer_axes(model.apply, params, x, config=lj.LoraConfig(
      targets=(r"kernel$", "emb"))).head_tied
  adapters, config = lj.load_peft(tmp_path / "made_by_peft", params=params,
                                  in_axes={"Conv_1": 3} if conv else None, head_tied=tied)
  assert config.rank == 4 and config.alpha == 8.0 and config.use_dora is dora
  for mode in ("factored", "merge"):
    out = lj.wrap(model.apply, config, mode=mode)(lj.LoraParams(params, adapters), x)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)


def test_bad_peft_files(tmp_path):
  (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "r": 4}))
  (tmp_path / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
  with pytest.raises(ValueError, match=r"peft_type is 'IA3'; only \[.*'LORA'"):
    lj.load_peft(tmp_path, params={})
  (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                                  "lora_alpha": 8}))
  (tmp_path / "adapter_model.safetensors").write_bytes(b"\xff\xff")
  with pytest.raises(ValueError, match=r"is not a valid safetensors file"):
    lj.load_peft(tmp_path, params={})


def test_stacked_adapters_without_a_stacked_rule_are_refused(tmp_path):
  """Default names cannot say which layer is which module: refused, with the recipe."""
  config = lj.LoraConfig(rank=2, stack_axes={"layers": 1})
  lp = lj.lift({"layers": {"kernel": jnp.ones((3, 4, 4))}}, config, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"layers/kernel: stacked \(scanned\) adapters, one layer "
                     r"per index.*stacked=True"):
    lj.save_peft(tmp_path, lp, config)


# --- kernels stored (out, in), as Hugging Face's Flax GPT-2 stores them -------------------


def _gpt2_style():
  """Kernels stored (out, in) and used as x @ W.T: one square (with a bias), one not."""
  k = jax.random.split(jax.random.key(5), 4)
  params = {"attn": {"c_proj": {"kernel": jax.random.normal(k[0], (8, 8)) / 3,
                                "bias": jnp.full(8, 0.1)}},
            "mlp": {"c_fc": {"kernel": jax.random.normal(k[1], (12, 8)) / 3,
                             "bias": jnp.zeros(12)}}}

  def apply(p, x):
    h = x @ p["attn"]["c_proj"]["kernel"].T + p["attn"]["c_proj"]["bias"]
    return h @ p["mlp"]["c_fc"]["kernel"].T + p["mlp"]["c_fc"]["bias"]

  return params, apply, jax.random.normal(k[2], (5, 8))


class TorchGpt2Style(torch.nn.Module):
  def __init__(self, params, conv1d):
    super().__init__()
    from transformers.pytorch_utils import Conv1D

    def layer(p):
      w = torch.from_numpy(np.array(p["kernel"]))
      if conv1d:  # Hugging Face Conv1D stores (in, out) and computes x @ W + b
        module = Conv1D(w.shape[0], w.shape[1])
        module.weight.data, module.bias.data = w.T.contiguous(), torch.from_numpy(
            np.array(p["bias"]))
      else:
        module = torch.nn.Linear(w.shape[1], w.shape[0])
        module.weight.data, module.bias.data = w, torch.from_numpy(np.array(p["bias"]))
      return module

    self.attn = torch.nn.Module()
    self.attn.c_proj = layer(params["attn"]["c_proj"])
    self.mlp = torch.nn.Module()
    self.mlp.c_fc = layer(params["mlp"]["c_fc"])

  def forward(self, x):
    return self.mlp.c_fc(self.attn.c_proj(x))


def test_out_in_kernels_are_refused_until_their_layout_is_stated(tmp_path):
  """Before: A went over the output axis and the square kernel's export was silently wrong."""
  params, apply, x = _gpt2_style()
  config = lj.LoraConfig(rank=2, targets=r"kernel$")
  lp = lj.lift(params, config, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"stored \(out, in\)[^$]*attn/c_proj/kernel: shape "
                     r"\(8, 8\); the axis rule took axes \(0,\) as input, but the function "
                     r"contracts axes \(1,\) with its input \(x @ W.T\). Set "
                     r"in_axes=\{'attn/c_proj/kernel\$': \(1,\)\}"):
    lj.wrap(apply, config)(lp, x)
  with pytest.raises(ValueError, match=r"attn/c_proj/kernel: cannot tell which axes"):
    lj.save_peft(tmp_path / "peft", lp, config)


@pytest.mark.parametrize("conv1d, dora", [(False, False), (True, False), (False, True),
                                          (True, True)])
def test_out_in_kernels_round_trip_through_real_peft(tmp_path, conv1d, dora):
  """DoRA here runs the x @ W.T rule: the norm is over W's axis 1, c scales x."""
  params, apply, x = _gpt2_style()
  in_axes = {r"kernel$": (1,)}
  config = lj.LoraConfig(rank=2, alpha=4.0, targets=r"kernel$", in_axes=in_axes, use_dora=dora)
  lp = lj.lift(params, config, key=jax.random.key(0))
  assert lp.adapters["mlp"]["c_fc"]["kernel"]["a"].shape == (8, 2)   # A over the input axis
  assert lp.adapters["mlp"]["c_fc"]["kernel"]["b"].shape == (2, 12)
  lp = _perturbed(lp)
  expected = np.asarray(lj.wrap(apply, config)(lp, x))
  np.testing.assert_allclose(expected, apply(lj.merge(lp, config), x), rtol=1e-5, atol=1e-5)
  lj.save_peft(tmp_path / "peft", lp, config, fan_in_fan_out=conv1d)
  x_torch = torch.from_numpy(np.array(x))
  peft_model = peft.PeftModel.from_pretrained(TorchGpt2Style(params, conv1d),
                                              str(tmp_path / "peft")).eval()
  with torch.no_grad():
    np.testing.assert_allclose(peft_model(x_torch).numpy(), expected, rtol=1e-4, atol=1e-5)
    merged = peft_model.merge_and_unload()
    np.testing.assert_allclose(merged(x_torch).numpy(), expected, rtol=1e-4, atol=1e-5)
  adapters, imported = lj.load_peft(tmp_path / "peft", params=params, in_axes=in_axes)
  np.testing.assert_allclose(lj.wrap(apply, imported)(lj.LoraParams(params, adapters), x),
                             expected, rtol=1e-5, atol=1e-5)


# --- leaves trained in full: PEFT's modules_to_save and bias ---------------------------


class FlaxHeaded(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(12, name="Dense_0")(x))
    h = nn.relu(nn.Dense(10, name="Dense_1")(h))
    return nn.Dense(3, name="head")(h)


class TorchHeaded(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.Dense_0, self.Dense_1, self.head = (torch.nn.Linear(6, 12), torch.nn.Linear(12, 10),
                                             torch.nn.Linear(10, 3))

  def forward(self, x):
    return self.head(torch.relu(self.Dense_1(torch.relu(self.Dense_0(x)))))


@pytest.mark.parametrize("biases", ["all", "lora_only"])
def test_trained_leaves_export_to_peft_and_back(tmp_path, biases):
  """Before: export kept only A and B, and the head and biases a run trained were lost."""
  x = jax.random.normal(jax.random.key(0), (4, 6))
  variables = FlaxHeaded().init(jax.random.key(1), x)
  params = variables["params"]  # lifted without the "params" level, as Flax users often do
  # "all": Dense_1 is not adapted but its bias trains; "lora_only": the adapted layers' biases.
  targets = r"Dense_0/kernel$" if biases == "all" else r"Dense_\d/kernel$"
  trainable = (r"bias$", r"head/") if biases == "all" else (r"Dense_\d/bias$", r"head/")
  config = lj.LoraConfig(rank=2, targets=targets, trainable=trainable)
  lp = lj.lift(params, config, key=jax.random.key(2))
  bump = lambda path, v: v + 0.2 if config.is_trainable(path) else v  # noqa: E731
  from lora_jax._src.core.tree import map_with_paths
  lp = lj.LoraParams(map_with_paths(bump, lp.base),
                     jax.tree.map(lambda a: a + 0.3, lp.adapters))
  apply = lambda p, x: FlaxHeaded().apply({"params": p}, x)  # noqa: E731
  expected = np.asarray(lj.wrap(apply, config)(lp, x))
  lj.save_peft(tmp_path / "peft", lp, config)
  written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert written["modules_to_save"] == ["head"] and written["bias"] == biases
  torch_model = _copy_into_torch({"params": params}, TorchHeaded())  # the untrained base
  peft_model = peft.PeftModel.from_pretrained(torch_model, str(tmp_path / "peft")).eval()
  with torch.no_grad():
    got = peft_model(torch.from_numpy(np.array(x))).numpy()
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
  loaded, imported = lj.load_peft(tmp_path / "peft", params=params)
  assert isinstance(loaded, lj.LoraParams)
  assert sorted(lj.paths(loaded.base)) == ["Dense_0/bias", "Dense_1/bias", "head/bias",
                                           "head/kernel"]
  np.testing.assert_allclose(lj.wrap(apply, imported)(lj.overlay(params, loaded), x), expected,
                             rtol=1e-5, atol=1e-5)


def test_trained_leaves_peft_cannot_express_are_refused(tmp_path):
  x = jnp.ones((1, 6))
  params = FlaxHeaded().init(jax.random.key(1), x)["params"]
  config = lj.LoraConfig(rank=2, targets=r"Dense_\d/kernel$", trainable=(r"head/kernel$",))
  lp = lj.lift(params, config, key=jax.random.key(2))
  with pytest.raises(ValueError, match=r"head/kernel: trained in full, but PEFT keeps "
                     r"full-trained weights only as whole modules"):
    lj.save_peft(tmp_path / "peft", lp, config)
  with pytest.raises(ValueError, match=r"trained in full"):
    lj.save_adapters(tmp_path / "ckpt", lp.adapters, config)


def test_import_checks_exact_peft_shapes(tmp_path):
  """A lora_B stored (r, out) instead of (out, r) was reshaped silently before."""
  from safetensors.numpy import load_file, save_file
  x = jnp.ones((1, 6))
  params = FlaxHeaded().init(jax.random.key(1), x)["params"]
  config = lj.LoraConfig(rank=2, targets=r"Dense_\d/kernel$")
  lp = lj.lift(params, config, key=jax.random.key(2))
  lj.save_peft(tmp_path / "peft", lp, config)
  file = tmp_path / "peft" / "adapter_model.safetensors"
  tensors = load_file(str(file))
  key = "base_model.model.Dense_0.lora_B.weight"
  good = tensors[key]
  tensors[key] = np.ascontiguousarray(good.reshape(2, 12))
  save_file(tensors, str(file))
  with pytest.raises(ValueError, match=r"Dense_0: lora_A.weight \(2, 6\) and lora_B.weight "
                     r"\(2, 12\) are not a PEFT pair \(Linear: \(r, in\) and \(out, r\)"):
    lj.load_peft(tmp_path / "peft", params=params)
  tensors[key] = np.concatenate([good, good[:1]])  # (13, 2): a pair, but not this kernel's
  save_file(tensors, str(file))
  with pytest.raises(ValueError, match=r"Dense_0/kernel: PEFT's lora_B has shape \(13, 2\), "
                     r"expected \(12, 2\)"):
    lj.load_peft(tmp_path / "peft", params=params)


def _same_dare_masks(monkeypatch, peft_model, n_adapters):
  """Records the masks lj.combine draws and hands PEFT the same ones, so dare_* compare
  exactly: each PEFT module asks for its A masks (one per adapter, (r, in)), then its B masks
  ((out, r)); ours are (N, 1, in, r) and (N, 1, r, out) per path, in adapter_paths order."""
  ours, state = [], {}
  real = jax.random.bernoulli
  monkeypatch.setattr(jax.random, "bernoulli",
                      lambda *a, **k: ours.append(real(*a, **k)) or ours[-1])
  names = {id(m): name for name, m in peft_model.named_modules()}
  merge_one = peft_model.base_model._generalized_task_arithmetic_weighted_adapter

  def per_module(combination_type, adapters, weights, target, *rest):
    state["module"], state["calls"] = names[id(target)], 0
    return merge_one(combination_type, adapters, weights, target, *rest)

  def bernoulli(probabilities):
    from lora_jax._src.core.tree import adapter_paths
    from lora_jax._src.io.peft_format import default_module_name
    paths = adapter_paths(state["tree"])
    path = next(p for p in paths if state["module"].endswith("." + default_module_name(p)))
    factor, n = divmod(state["calls"], n_adapters)
    state["calls"] += 1
    mask = np.asarray(ours[2 * paths.index(path) + factor][n, 0]).T
    assert mask.shape == tuple(probabilities.shape), (path, mask.shape, probabilities.shape)
    return torch.from_numpy(mask.astype(np.float32))

  monkeypatch.setattr(peft_model.base_model, "_generalized_task_arithmetic_weighted_adapter",
                      per_module)
  monkeypatch.setattr(torch, "bernoulli", bernoulli)
  return state


@pytest.mark.parametrize("method,options", [
    ("cat", {}), ("svd", {"rank": 3}), ("linear", {}), ("ties", {"density": 0.5}),
    ("ties", {"density": 0.6, "majority_sign": "frequency"}), ("dare_linear", {"density": 0.5}),
    ("dare_ties", {"density": 0.7})])
def test_combine_agrees_with_peft_add_weighted_adapter(tmp_path, monkeypatch, method, options):
  """Two adapters combined by lj.combine give the outputs of PEFT's add_weighted_adapter on the
  same adapters (exported through save_peft): ranks 4 and 2 with different alphas for cat and
  svd, equal ranks (one rsLoRA) for PEFT's factor merges; dare_* with the same random masks."""
  model, params, x, torch_model, x_torch = _text()
  factor = method not in ("cat", "svd")
  untied = {"Embed_0": False}  # the model has its own head (Dense_1)
  configs = {"x": lj.LoraConfig(rank=4, alpha=8.0, targets=(r"kernel$", "emb"),
                                head_tied=untied),
             "y": lj.LoraConfig(rank=4 if factor else 2, alpha=3.0, use_rslora=factor,
                                targets=(r"kernel$", "emb"), head_tied=untied)}
  adapters = {n: _perturbed(lj.lift(params, c, key=jax.random.key(i))).adapters
              for i, (n, c) in enumerate(configs.items())}
  for n in configs:
    lj.save_peft(tmp_path / n, lj.LoraParams(params, adapters[n]), configs[n])
  weights = {"x": 0.7, "y": -0.4}
  peft_model = peft.PeftModel.from_pretrained(torch_model, str(tmp_path / "x"), adapter_name="x")
  peft_model.load_adapter(str(tmp_path / "y"), adapter_name="y")
  if method.startswith("dare"):
    state = _same_dare_masks(monkeypatch, peft_model, 2)
    options = {**options, "key": jax.random.key(5)}
  combined, config = lj.combine({n: (adapters[n], configs[n]) for n in configs}, weights,
                                method=method, **options)
  if method.startswith("dare"):
    state["tree"] = combined
  ours = np.asarray(lj.wrap(model.apply, config)(lj.LoraParams(params, combined), x))
  theirs_options = {"svd_rank": options.get("rank"), "density": options.get("density"),
                    "majority_sign_method": options.get("majority_sign", "total")}
  peft_model.add_weighted_adapter(["x", "y"], [weights["x"], weights["y"]], "c",
                                  combination_type=method, **theirs_options)
  peft_model.set_adapter("c")
  with torch.no_grad():
    theirs = peft_model.eval()(x_torch).numpy()
    with peft_model.disable_adapter():
      base = peft_model(x_torch).numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
  assert not np.allclose(ours, base, atol=1e-3)  # the combination does change the output


def test_several_peft_adapters_stack_into_mixed_batches_like_peft(tmp_path):
  """Two adapters written by PEFT itself (ranks 4 and 2, one rsLoRA) imported into one stack:
  a mixed batch equals PEFT's own mixed-batch inference (adapter_names=, "__base__")."""
  model, params, x, torch_model, x_torch = _text()
  targets = ["Dense_0", "Dense_1"]
  peft_model = peft.get_peft_model(torch_model, peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False), adapter_name="math")
  peft_model.add_adapter("code", peft.LoraConfig(r=2, lora_alpha=3, use_rslora=True,
                                              target_modules=targets, init_lora_weights=False))
  peft_model.save_pretrained(str(tmp_path))
  folders = {n: tmp_path / n for n in ("math", "code")}
  stack, config = lj.stack_adapters({n: lj.load_peft(d, params=params)
                                     for n, d in folders.items()})
  ids = jnp.array([1, -1, 0], jnp.int32)
  ours = np.asarray(lj.wrap(model.apply, config)(lj.LoraParams(params, stack), x,
                                                 adapter_ids=ids))
  with torch.no_grad():
    theirs = peft_model.eval()(x_torch, adapter_names=["code", "__base__", "math"]).numpy()
    with peft_model.disable_adapter():
      base = peft_model(x_torch).numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
  assert not np.allclose(ours[0], base[0], atol=1e-3)  # the adapters change their rows
