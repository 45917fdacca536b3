"""DeepMind's ``gemma`` package (``from gemma import gm``) ↔ Hugging Face / PEFT, both ways.

A tiny random Gemma 3 built and saved by transformers is converted to the gemma package's
Linen parameters by hand here (the layouts written out, independently of the name map); the
gemma package's own ``gm.nn.Transformer`` then computes transformers' logits. LoRA on every
einsum kernel (fused ``kv_einsum`` and MLP ``gating_einsum`` included) exports through
``lj.name_map("gemma/gemma3")`` to a folder the real PEFT loads equal to ours, and PEFT's own
adapter imports back equal.

The gemma package is not in any extra of ours: it installs beside google-tunix but pulls in
TensorFlow, Keras, OpenCV and about 100 other packages, so CI does not install it and these
tests run where ``pip install gemma`` was done.
"""

from __future__ import annotations

import json

import hf_tiny
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj

gm = pytest.importorskip("gemma.gm")
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.slow

S = hf_tiny.SMALL
LAYERS, KV = 6, 2  # hf_tiny's Gemma 3: five sliding-window layers, then a global one
TOKENS = np.random.RandomState(0).randint(1, S["vocab_size"], (2, 7))  # 0 is the pad token
TARGETS = r"(q_einsum|kv_einsum|attn_vec_einsum)/w$|mlp/(gating_einsum|linear)$"
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATOL = 2e-5


def _model():
  kind = gm.nn.config.AttentionType
  types = (kind.LOCAL_SLIDING,) * (LAYERS - 1) + (kind.GLOBAL,)  # Gemma 3's pattern
  config = gm.nn.config.TransformerConfig(
      num_embed=S["vocab_size"], embed_dim=S["hidden_size"], hidden_dim=S["intermediate_size"],
      num_heads=S["num_attention_heads"], head_dim=S["head_dim"], num_kv_heads=KV,
      final_logit_softcap=None, use_post_attn_norm=True, use_post_ffw_norm=True,
      use_qk_norm=True, attention_types=types, sliding_window_size=4,
      transpose_gating_einsum=True, local_base_frequency=10_000, global_base_frequency=10_000,
      query_pre_attn_norm=gm.nn.config.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM)
  return gm.nn.Transformer(config=config, dtype=jnp.float32)


def _params(torch_model) -> dict:
  """transformers' Gemma 3 weights in the gemma package's layouts, written out by hand."""
  w = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  heads, head_dim, d = S["num_attention_heads"], S["head_dim"], S["hidden_size"]
  params = {"embedder": {"input_embedding": w["model.embed_tokens.weight"]},
            "final_norm": {"scale": w["model.norm.weight"]}}
  for i in range(LAYERS):
    p = f"model.layers.{i}."
    q = w[p + "self_attn.q_proj.weight"].reshape(heads, head_dim, d).transpose(0, 2, 1)
    k, v = (w[p + f"self_attn.{x}_proj.weight"].reshape(KV, head_dim, d).transpose(0, 2, 1)
            for x in "kv")
    o = w[p + "self_attn.o_proj.weight"].T.reshape(heads, head_dim, d)
    params[f"layer_{i}"] = {
        "attn": {"q_einsum": {"w": q}, "kv_einsum": {"w": np.stack([k, v])},
                 "attn_vec_einsum": {"w": o},
                 "_query_norm": {"scale": w[p + "self_attn.q_norm.weight"]},
                 "_key_norm": {"scale": w[p + "self_attn.k_norm.weight"]}},
        "mlp": {"gating_einsum": np.stack([w[p + "mlp.gate_proj.weight"],
                                           w[p + "mlp.up_proj.weight"]]),
                "linear": w[p + "mlp.down_proj.weight"].T},
        "pre_attention_norm": {"scale": w[p + "input_layernorm.weight"]},
        "post_attention_norm": {"scale": w[p + "post_attention_layernorm.weight"]},
        "pre_ffw_norm": {"scale": w[p + "pre_feedforward_layernorm.weight"]},
        "post_ffw_norm": {"scale": w[p + "post_feedforward_layernorm.weight"]}}
  return {"params": jax.tree.map(jnp.asarray, params)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  folder = tmp_path_factory.mktemp("gemma3")
  torch_model = hf_tiny.save("gemma3", folder)
  model = _model()
  params = _params(torch_model)

  def apply(p, t):
    with jax.numpy_dtype_promotion("standard"):  # the gemma package mixes bool and int
      return model.apply(p, t).logits

  config = lj.infer_axes(apply, params, jax.ShapeDtypeStruct(TOKENS.shape, jnp.int32),
                         config=lj.LoraConfig(rank=4, alpha=8.0, targets=TARGETS))
  return folder, torch_model, apply, params, config


def _ours(apply, config, lp) -> np.ndarray:
  return np.asarray(jax.jit(lj.wrap(apply, config))(lp, jnp.asarray(TOKENS)))


def _fresh_torch(folder):
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def test_gemma_package_model_equals_transformers(setup):
  _, torch_model, apply, params, _ = setup
  np.testing.assert_allclose(np.asarray(apply(params, jnp.asarray(TOKENS))),
                             hf_tiny.torch_logits(torch_model, TOKENS), atol=ATOL, rtol=0)


def test_export_loads_in_peft_equal_and_imports_back(setup, tmp_path):
  folder, _, apply, params, config = setup
  lp = lj.lift(params, config, key=jax.random.key(0))
  leaves, treedef = jax.tree.flatten(lp.adapters)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  lp = lj.LoraParams(lp.base, jax.tree.unflatten(treedef, [
      0.05 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))
  ours = _ours(apply, config, lp)
  assert np.abs(ours - np.asarray(apply(params, jnp.asarray(TOKENS)))).max() > 0.1
  names = lj.name_map("gemma/gemma3")
  out = lj.save_peft(tmp_path / "peft", lp, config, module_name=names, target=folder)
  written = json.loads((out / "adapter_config.json").read_text())["target_modules"]
  assert sorted({m.split(".")[-1] for m in written}) == sorted(HF_TARGETS), written
  peft_model = peft.PeftModel.from_pretrained(_fresh_torch(folder), out).eval()
  np.testing.assert_allclose(hf_tiny.torch_logits(peft_model, TOKENS), ours, atol=ATOL, rtol=0)
  merged = peft_model.merge_and_unload()
  np.testing.assert_allclose(hf_tiny.torch_logits(merged, TOKENS), ours, atol=ATOL, rtol=0)
  # The fused kernels (kv_einsum, gating_einsum) are joined back over their shared A.
  adapters, back = lj.load_peft(out, params=params, module_name=names,
                                in_axes=dict(config.in_axes))
  np.testing.assert_allclose(_ours(apply, back, lj.LoraParams(params, adapters)), ours,
                             atol=1e-5, rtol=0)


def test_peft_made_adapter_imports_equal(setup, tmp_path):
  folder, _, apply, params, config = setup
  torch.manual_seed(0)
  peft_model = peft.get_peft_model(_fresh_torch(folder), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=HF_TARGETS, init_lora_weights=False)).eval()
  peft_model.save_pretrained(tmp_path / "made")
  adapters, imported = lj.load_peft(tmp_path / "made", params=params,
                                    module_name=lj.name_map("gemma/gemma3"),
                                    in_axes=dict(config.in_axes))
  np.testing.assert_allclose(_ours(apply, imported, lj.LoraParams(params, adapters)),
                             hf_tiny.torch_logits(peft_model, TOKENS), atol=ATOL, rtol=0)


def test_default_names_are_refused_against_the_model(setup, tmp_path):
  folder, _, _, params, config = setup
  lp = lj.lift(params, config, key=jax.random.key(0))
  with pytest.raises(ValueError, match="match nothing in the target model"):
    lj.save_peft(tmp_path / "peft", lp, config, target=folder)
  assert not (tmp_path / "peft").exists()
