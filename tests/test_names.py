"""Built-in name maps read without any zoo installed (their interop is tested in test_tunix.py
and test_gemma_package.py against the real models)."""

import pytest

import lora_jax as lj


@pytest.mark.parametrize("prefix", ["params/", ""])
def test_gemma_package_map_splits_fused_kernels_in_order(prefix):
  names = lj.name_map("gemma/gemma3")
  gating = names.parts(f"{prefix}layer_11/mlp/gating_einsum")
  assert [(p.module, p.axis, p.index, p.count) for p in gating] == [
      ("model.layers.11.mlp.gate_proj", 0, 0, 2), ("model.layers.11.mlp.up_proj", 0, 1, 2)]
  kv = names.parts(f"{prefix}layer_0/attn/kv_einsum/w")
  assert [p.module for p in kv] == ["model.layers.0.self_attn.k_proj",
                                    "model.layers.0.self_attn.v_proj"]
  assert names(f"{prefix}layer_2/mlp/linear") == "model.layers.2.mlp.down_proj"
  assert names(f"{prefix}embedder/input_embedding") == "model.embed_tokens"
  assert names(f"{prefix}layer_2/attn/_query_norm/scale") == "model.layers.2.self_attn.q_norm"
  assert names(f"{prefix}final_norm/scale") == "model.norm"


def test_maps_refuse_what_they_do_not_know():
  assert lj.name_map("gemma/gemma2").parts("layer_0/attn/_query_norm/scale") is None
  with pytest.raises(ValueError, match="gemma/gemma3 name map has no rule"):
    lj.name_map("gemma/gemma3")("layer_0/mlp/unknown")
  with pytest.raises(ValueError, match="holds 2 PyTorch modules"):
    lj.name_map("gemma/gemma3")("layer_0/mlp/gating_einsum")
  with pytest.raises(KeyError, match="gemma/gemma3"):
    lj.name_map("gemma/gemma4")
