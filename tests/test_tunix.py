"""Real models: HF checkpoint -> Tunix loader -> lift -> export -> PyTorch PEFT, and back.

Each family is a tiny random model built and saved by transformers itself; the names, layouts
and fused kernels are checked against the real transformers and peft packages, never against
our reading of them. Skipped where google-tunix (``pip install "lora_jax[models]"``) or torch is
not installed.
"""

from __future__ import annotations

import json

import hf_tiny
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj

pytest.importorskip("tunix.models")
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

TARGETS = r"(q_proj|k_proj|v_proj|o_proj|q_einsum|kv_einsum|qkv_einsum|attn_vec_einsum|" \
          r"gate_proj|up_proj|down_proj)/(w|kernel)$"
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = np.random.RandomState(0).randint(0, hf_tiny.SMALL["vocab_size"], (2, 7))
# float32 on both sides. The two frameworks sum in other orders; Tunix's Gemma 2 forward differs
# from transformers' by up to 5e-5 where attention logits grow (the base model alone shows it),
# so PEFT-vs-ours uses this bound, and the conversion itself is checked exactly (EXACT) through
# PEFT's merged weights loaded back into Tunix.
ATOL = {"gemma2": 1e-4, "gemma2_gqa": 1e-4}
EXACT = 1e-5


@pytest.fixture(scope="module", params=hf_tiny.FAMILIES)
def family(request, tmp_path_factory):
  folder = tmp_path_factory.mktemp(request.param)
  torch_model = hf_tiny.save(request.param, folder)
  model = lj.load_hf(folder)
  logits = lambda p, t: model.apply(p, t)[0]
  config = lj.infer_axes(logits, model.params, jax.ShapeDtypeStruct(TOKENS.shape, jnp.int32),
                         config=lj.LoraConfig(rank=4, alpha=8.0, targets=TARGETS))
  return request.param, folder, torch_model, model, config


def _randomized(lp: lj.LoraParams, key) -> lj.LoraParams:
  """Nonzero B everywhere, so every adapter changes the output."""
  leaves, treedef = jax.tree.flatten(lp.adapters)
  keys = jax.random.split(key, len(leaves))
  leaves = [0.05 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  return lj.LoraParams(lp.base, jax.tree.unflatten(treedef, leaves))


def _ours(model, config, lp) -> np.ndarray:
  apply = lj.wrap(lambda p, t: model.apply(p, t)[0], config)
  return np.asarray(jax.jit(apply)(lp, jnp.asarray(TOKENS)))


def _fresh_torch(name: str, folder):
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def _assert_same_weights(torch_model, ours: np.ndarray, folder) -> None:
  """The conversion, exactly: Tunix running PEFT's merged weights computes our logits."""
  torch_model.save_pretrained(folder, safe_serialization=True)
  tunix_model = lj.load_hf(folder)
  logits = np.asarray(tunix_model.apply(tunix_model.params, jnp.asarray(TOKENS))[0])
  np.testing.assert_allclose(logits, ours, atol=EXACT, rtol=0)


def test_loader_equals_transformers(family):
  name, _, torch_model, model, _ = family
  ours = np.asarray(model.apply(model.params, jnp.asarray(TOKENS))[0])
  np.testing.assert_allclose(ours, hf_tiny.torch_logits(torch_model, TOKENS), atol=2e-5, rtol=0)


def test_export_loads_in_peft_equal(family, tmp_path):
  name, folder, _, model, config = family
  lp = _randomized(lj.lift(model.params, config, key=jax.random.key(0)), jax.random.key(1))
  ours = _ours(model, config, lp)
  assert np.abs(ours - np.asarray(model.apply(model.params, jnp.asarray(TOKENS))[0])).max() > 0.1
  out = lj.export_peft(lp, config, tmp_path / "peft", module_name=model.name_map, target=folder)
  written = json.loads((out / "adapter_config.json").read_text())["target_modules"]
  assert all(m.split(".")[-1] in HF_TARGETS for m in written), written
  peft_model = peft.PeftModel.from_pretrained(_fresh_torch(name, folder), out).eval()
  atol = ATOL.get(name, 2e-5)
  np.testing.assert_allclose(hf_tiny.torch_logits(peft_model, TOKENS), ours, atol=atol, rtol=0)
  merged = peft_model.merge_and_unload()
  np.testing.assert_allclose(hf_tiny.torch_logits(merged, TOKENS), ours, atol=atol, rtol=0)
  _assert_same_weights(merged, ours, tmp_path / "merged")
  # ... and reads back as the same adapter (fused kernels joined over their shared A).
  adapters, back = lj.import_peft(out, params=model.params, module_name=model.name_map,
                                  in_axes=dict(config.in_axes))
  assert back.rank_pattern == ()
  np.testing.assert_allclose(_ours(model, back, lj.LoraParams(model.params, adapters)), ours,
                             atol=EXACT, rtol=0)


def test_peft_made_adapter_imports_equal(family, tmp_path):
  name, folder, _, model, config = family
  torch.manual_seed(0)
  peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=HF_TARGETS,
                                init_lora_weights=False)
  peft_model = peft.get_peft_model(_fresh_torch(name, folder), peft_config).eval()
  peft_model.save_pretrained(tmp_path / "made")
  adapters, imported = lj.import_peft(tmp_path / "made", params=model.params,
                                      module_name=model.name_map, in_axes=dict(config.in_axes))
  ours = _ours(model, imported, lj.LoraParams(model.params, adapters))
  np.testing.assert_allclose(ours, hf_tiny.torch_logits(peft_model, TOKENS),
                             atol=ATOL.get(name, 2e-5), rtol=0)
  _assert_same_weights(peft_model.merge_and_unload(), ours, tmp_path / "merged")


def test_default_names_are_refused_against_the_model(family, tmp_path):
  """The silent failure this replaces: Flax-style default names PEFT would skip with a warning."""
  _, folder, _, model, config = family
  lp = lj.lift(model.params, config, key=jax.random.key(0))
  with pytest.raises(ValueError, match="match nothing in the target model"):
    lj.export_peft(lp, config, tmp_path / "peft", target=folder)
  assert not (tmp_path / "peft").exists()


def test_map_without_a_rule_is_refused(tmp_path):
  lp = lj.LoraParams({"odd": {"kernel": jnp.ones((4, 3))}},
                     {"odd": {"kernel": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 3))}}})
  config = lj.LoraConfig(rank=2, targets=r"kernel$", in_axes={r"kernel$": (0,)})
  with pytest.raises(ValueError, match="tunix/llama3 name map gives no PyTorch module"):
    lj.export_peft(lp, config, tmp_path / "p", module_name=lj.name_map("tunix/llama3"))


def test_unsupported_config_is_refused(tmp_path):
  """google-tunix 0.1.6's Llama 3 ignores rope_theta; loading would differ from transformers."""
  import transformers
  config = transformers.LlamaConfig(**dict(hf_tiny.SMALL, num_key_value_heads=2,
                                           rope_theta=500000.0))
  transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
  from lora_jax._src import zoo
  applied = zoo._rope_base_applied(zoo._tunix("llama3.model"), "rope_theta")
  if applied in (None, 500000.0):
    pytest.skip("this google-tunix release applies the config's rope_theta")
  with pytest.raises(ValueError, match="rope_theta is 500000"):
    lj.load_hf(tmp_path)


def test_stray_weight_file_is_refused(family, tmp_path):
  import shutil
  _, folder, _, _, _ = family
  copy = tmp_path / "copy"
  shutil.copytree(folder, copy)
  shutil.copy(copy / "model.safetensors", copy / "adapter_model.safetensors")
  with pytest.raises(ValueError, match="adapter_model.safetensors"):
    lj.load_hf(copy)


def test_readme_recipe_runs(family, tmp_path):
  """The README's "Fine-tune a Hugging Face checkpoint" block, on each family's folder."""
  import pathlib
  import re
  _, folder, _, _, _ = family
  text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
  (block,) = re.findall(r"```python tunix\n(.*?)```", text, flags=re.S)
  namespace = {"HF_FOLDER": folder, "PEFT_FOLDER": tmp_path / "peft"}
  with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes float and int32
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
  assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_sampler_greedy_equals_merged_and_mixed_ids_equal_alone(name, tmp_path):
  hf_tiny.save(name, tmp_path)
  model = lj.load_hf(tmp_path)
  config = lj.infer_axes(lambda p, t: model.apply(p, t)[0], model.params,
                         jax.ShapeDtypeStruct(TOKENS.shape, jnp.int32),
                         config=lj.LoraConfig(rank=4, alpha=8.0, targets=TARGETS))
  adapters = [_randomized(lj.lift(model.params, config, key=jax.random.key(i)),
                          jax.random.key(10 + i)) for i in range(2)]
  prompts = [[5, 9, 3, 7, 2, 11], [4, 8], [1, 2, 3]]
  lp = adapters[0]
  ours = lj.generate(model, lp, prompts, config=config, max_new_tokens=6)
  with jax.numpy_dtype_promotion("standard"):
    merged = lj.merge(lp, config)
  np.testing.assert_array_equal(ours, lj.generate(model, merged, prompts, max_new_tokens=6))
  # Left padding is invisible: a prompt alone generates what it generates in the batch.
  np.testing.assert_array_equal(ours[1:2], lj.generate(model, lp, prompts[1:2], config=config,
                                                       max_new_tokens=6))
  # ... and the first token is the full forward pass's argmax.
  logits = np.asarray(_ours_on(model, config, lp, np.asarray([prompts[0]])))
  assert ours[0, 0] == logits[0, -1].argmax()
  # Mixed batch: each sequence with its own adapter (or the base) equals that adapter alone.
  stack, stack_config = lj.stack_adapters({"a": (adapters[0].adapters, config),
                                           "b": (adapters[1].adapters, config)})
  mixed = lj.generate(model, lj.LoraParams(model.params, stack), prompts, config=stack_config,
                      adapter_ids=[1, 0, -1], max_new_tokens=6)
  np.testing.assert_array_equal(mixed[0], lj.generate(model, adapters[1], prompts[:1],
                                                      config=config, max_new_tokens=6)[0])
  np.testing.assert_array_equal(mixed[1], ours[1])
  np.testing.assert_array_equal(mixed[2], lj.generate(model, model.params, prompts[2:],
                                                      max_new_tokens=6)[0])
  sampled = lj.generate(model, lp, prompts, config=config, max_new_tokens=4, temperature=0.8,
                        top_k=5, top_p=0.9, key=jax.random.key(3))
  assert sampled.shape == (3, 4) and sampled.min() >= 0


def _ours_on(model, config, lp, tokens):
  apply = lj.wrap(lambda p, t: model.apply(p, t)[0], config)
  return jax.jit(apply)(lp, jnp.asarray(tokens))
