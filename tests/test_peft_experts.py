"""MoE experts parameters <-> PEFT's target_parameters, checked against the real peft package.

GPT-OSS holds its experts as bare 3-D parameters (``mlp.experts.gate_up_proj``
``(experts, hidden, 2·inner)``, ``down_proj`` ``(experts, inner, hidden)``), which PEFT adapts
through ``target_parameters``. A tiny random GPT-OSS built by transformers is the truth here:
our export, loaded by PEFT and merged by ``merge_and_unload``, must give our merged weights,
and PEFT's own adapter, imported, must merge to PEFT's merged weights. Each case also runs
with the experts module marked ``is_transposed`` (PEFT's other layout of the factors) and with
the kernels used as ``x @ W[e]`` (input axis 1) or ``x @ W[e].T`` (input axis 2).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # the real peft and transformers

EXPERTS = r"model/layers/\d+/mlp/experts/(gate_up_proj|down_proj)"
BOTH = ("gate_up_proj", "down_proj")
CASES = [(axis, transposed, which) for axis in (1, 2) for transposed in (False, True)
         for which in (BOTH, ("down_proj",))]


def _ids(case):
  axis, transposed, which = case
  return f"in{axis}-{'transposed' if transposed else 'plain'}-{'+'.join(which)}"


def _torch_model(transposed: bool):
  config = transformers.GptOssConfig(
      vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
      num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
      num_experts_per_tok=2, layer_types=["full_attention"] * 2)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  if transposed:  # what PEFT reads from an experts class that stores (experts, out, in)
    for layer in model.model.layers:
      layer.mlp.experts.is_transposed = True
  return model


def _name_map(transposed: bool) -> lj.NameMap:
  # The module registers gate_up_proj before down_proj: the rules say so by their order.
  return lj.NameMap("gpt-oss experts", tuple(
      lj.NameRule(rf"model/layers/(\d+)/mlp/experts/{p}", (r"model.layers.\1.mlp.experts",),
                  param=p, experts=True, transposed=transposed) for p in BOTH))


def _experts(model) -> dict[str, np.ndarray]:
  return {name.replace(".", "/"): p.detach().numpy().copy()
          for name, p in model.named_parameters() if name.endswith(BOTH)}


def _nest(flat: dict) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    *head, last = path.split("/")
    for k in head:
      node = node.setdefault(k, {})
    node[last] = jnp.asarray(value)
  return out


def _config(in_axis: int, which=BOTH) -> lj.LoraConfig:
  return lj.LoraConfig(rank=2, alpha=4.0,
                       targets=rf"model/layers/\d+/mlp/experts/({'|'.join(which)})$",
                       stack_axes={EXPERTS: (0,)}, in_axes={EXPERTS: (in_axis,)})


def _merged(lp, config) -> dict[str, np.ndarray]:
  return {p: np.asarray(x) for p, x in zip(lj.paths(lp.base),
                                           jax.tree.leaves(lj.merge(lp, config)))}


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_export_merges_in_peft_to_our_weights(case, tmp_path):
  in_axis, transposed, which = case
  model = _torch_model(transposed)
  params = _nest(_experts(model))
  config = _config(in_axis, which)
  lp = lj.lift(params, config, key=jax.random.key(0))
  leaves, treedef = jax.tree.flatten(lp.adapters)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  lp = lj.LoraParams(lp.base, jax.tree.unflatten(
      treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
  names = [n for n, _ in model.named_parameters()]
  lj.save_peft(tmp_path / "peft", lp, config, module_name=_name_map(transposed),
               target=names)
  saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert saved["target_parameters"] == sorted(
      f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in which)
  peft_model = peft.PeftModel.from_pretrained(model, tmp_path / "peft")
  ours = _merged(lp, config)
  theirs = _experts(peft_model.merge_and_unload())
  assert sorted(ours) == sorted(theirs)
  for path in ours:
    np.testing.assert_allclose(ours[path], theirs[path], atol=1e-5, rtol=0, err_msg=path)
  changed = [p for p in ours if p.endswith(which) and not np.allclose(ours[p], params_of(
      params, p))]
  assert len(changed) == 2 * len(which)


def params_of(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return np.asarray(tree)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_peft_made_adapter_imports_to_peft_weights(case, tmp_path):
  in_axis, transposed, which = case
  model = _torch_model(transposed)
  params = _nest(_experts(model))
  torch.manual_seed(1)
  peft_config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=[],
                                target_parameters=[f"mlp.experts.{p}" for p in which],
                                init_lora_weights=False)
  peft_model = peft.get_peft_model(model, peft_config)
  peft_model.save_pretrained(tmp_path / "made")
  theirs = _experts(peft_model.merge_and_unload())
  adapters, config = lj.load_peft(tmp_path / "made", params=params,
                                  module_name=_name_map(transposed),
                                  in_axes={EXPERTS: (in_axis,)})
  ours = _merged(lj.LoraParams(params, adapters), config)
  for path in ours:
    np.testing.assert_allclose(ours[path], theirs[path], atol=1e-5, rtol=0, err_msg=path)
  # ... and exported again it is the same file PEFT wrote, tensor for tensor.
  lj.save_peft(tmp_path / "again", lj.LoraParams(params, adapters), config,
               module_name=_name_map(transposed))
  from safetensors.numpy import load_file
  made, again = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("made",
                                                                                 "again"))
  assert sorted(made) == sorted(again)
  for key in made:
    np.testing.assert_allclose(again[key], made[key], atol=1e-6, rtol=0, err_msg=key)


def test_wrong_names_layouts_and_merges_are_refused(tmp_path):
  model = _torch_model(False)
  params = _nest(_experts(model))
  config = _config(1)
  lp = lj.lift(params, config, key=jax.random.key(0))
  names = [n for n, _ in model.named_parameters()]
  wrong = lj.NameMap("wrong", tuple(
      lj.NameRule(rf"model/layers/(\d+)/mlp/experts/{p}", (r"model.layers.\1.mlp.expert",),
                  param=p, experts=True) for p in BOTH))
  with pytest.raises(ValueError, match=r"(?s)match nothing in the target model.*"
                                       r"no model\.layers\.0\.mlp\.expert\.down_proj"):
    lj.save_peft(tmp_path / "a", lp, config, module_name=wrong, target=names)
  same = lj.NameMap("same", (lj.NameRule(r"model/layers/(\d+)/mlp/experts/(\w+)",
                                          (r"model.layers.\1.mlp.experts",), param="down_proj",
                                          experts=True),))
  with pytest.raises(ValueError, match=r"all map to the parameter 'down_proj'"):
    lj.save_peft(tmp_path / "a", lp, config, module_name=same)
  unstacked = lj.LoraConfig(rank=2, alpha=4.0, targets=EXPERTS, in_axes={EXPERTS: (0, 1)})
  with pytest.raises(ValueError, match=r"stack_axes=\{pattern: \(0,\)\}"):
    lj.save_peft(tmp_path / "b", lj.lift(params, unstacked, key=jax.random.key(0)), unstacked,
                 module_name=_name_map(False))
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
  with pytest.raises(ValueError, match="experts rule names one module"):
    lj.NameRule("x", ("a", "b"), fused_axis=0, experts=True)
  # PEFT's own target-parameter adapter: import reads it; the Hugging Face merge refuses it
  # rather than merging it as something else.
  lj.save_peft(tmp_path / "peft", lp, config, module_name=_name_map(False))
  with pytest.raises(ValueError, match="in_axes="):
    lj.load_peft(tmp_path / "peft", params=params, module_name=_name_map(False))
  model.save_pretrained(tmp_path / "hf", safe_serialization=True)
  with pytest.raises(ValueError, match="target_parameters"):
    lj.merge_hf(tmp_path / "hf", tmp_path / "peft", tmp_path / "merged")
  assert not (tmp_path / "merged").exists()
