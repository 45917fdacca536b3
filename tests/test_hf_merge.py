"""lora-jax merge for Hugging Face folders, against real transformers and PEFT on CPU torch.

A tiny Llama (and a GPT-2 with Conv1D kernels) is saved in several safetensors shards, a PEFT
adapter is made on it, and the folder merged by lora_jax must load with ``from_pretrained``
and give the logits of PEFT's own ``merge_and_unload``.
"""

import json
import warnings

import numpy as np
import pytest

import lora_jax as lj
from lora_jax._src.cli.main import main as cli

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # the real peft, transformers and torch

# Per dtype: PEFT merges in the weights' dtype, lora_jax in float32 with one rounding.
TOL = {"float32": 1e-5, "bfloat16": 3e-2}


def _llama(dtype):
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, tie_word_embeddings=False)
  return transformers.LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()


def _adapted(model, tmp_path, **changes):
  model.save_pretrained(tmp_path / "base", max_shard_size="20KB")
  options = dict(r=4, lora_alpha=8, init_lora_weights=False, use_rslora=True,
                 target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
                 rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3},
                 modules_to_save=["lm_head"])
  peft_model = peft.get_peft_model(model, peft.LoraConfig(**{**options, **changes}))
  with torch.no_grad():
    for name, value in peft_model.named_parameters():
      if "modules_to_save" in name or "lora_magnitude_vector" in name:
        value.mul_(1.2)  # trained head; magnitudes away from ||W||
  peft_model.save_pretrained(tmp_path / "adapter")
  return peft_model


def _logits(model, ids):
  with torch.no_grad():
    return model(ids).logits.float().numpy()


@pytest.mark.parametrize("dtype, dora", [("float32", False), ("float32", True),
                                         ("bfloat16", False), ("bfloat16", True)])
def test_merged_folder_gives_peft_merge_and_unload_logits(tmp_path, dtype, dora):
  peft_model = _adapted(_llama(dtype), tmp_path, use_dora=dora)
  ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
  want = _logits(peft_model.merge_and_unload(), ids)
  report = lj.merge_hf(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged",
                       max_shard_size="30KB" if dtype == "float32" else "15KB")
  assert report["merged"] == 11 and report["shards"] == 3  # 10 LoRA modules + lm_head
  merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged",
                                                         torch_dtype="auto").eval()
  assert next(merged.parameters()).dtype == getattr(torch, dtype)
  got = _logits(merged, ids)
  np.testing.assert_allclose(got / np.abs(want).max(), want / np.abs(want).max(),
                             atol=TOL[dtype])
  index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
  assert sorted(set(index["weight_map"].values())) == [
      f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
  assert (tmp_path / "merged" / "generation_config.json").is_file()


def test_cli_dtype_and_one_shard(tmp_path, capsys):
  peft_model = _adapted(_llama("float32"), tmp_path)
  ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
  want = _logits(peft_model.merge_and_unload(), ids)
  assert cli(["merge", "--base", str(tmp_path / "base"), "--adapters", str(tmp_path / "adapter"),
              "--out", str(tmp_path / "merged"), "--dtype", "bfloat16"]) == 0
  assert "merged 11 of 21 tensors" in capsys.readouterr().out
  assert (tmp_path / "merged" / "model.safetensors").is_file()
  assert not (tmp_path / "merged" / "model.safetensors.index.json").exists()
  config = json.loads((tmp_path / "merged" / "config.json").read_text())
  assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"
  merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
  got = _logits(merged.float(), ids)
  np.testing.assert_allclose(got / np.abs(want).max(), want / np.abs(want).max(), atol=3e-2)
  # An existing output is replaced only with --overwrite.
  assert cli(["merge", "--base", str(tmp_path / "base"), "--adapters", str(tmp_path / "adapter"),
              "--out", str(tmp_path / "merged")]) == 2
  assert "already exists" in capsys.readouterr().err
  assert cli(["merge", "--base", str(tmp_path / "base"), "--adapters", str(tmp_path / "adapter"),
              "--out", str(tmp_path / "merged"), "--overwrite"]) == 0


def test_conv1d_kernels_with_fan_in_fan_out(tmp_path):
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16)).eval()
  model.save_pretrained(tmp_path / "base", max_shard_size="40KB")
  peft_model = peft.get_peft_model(model, peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
      init_lora_weights=False))
  peft_model.save_pretrained(tmp_path / "adapter")
  ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
  want = _logits(peft_model.merge_and_unload(), ids)
  lj.merge_hf(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
  got = _logits(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval(), ids)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_embedding_and_conv2d_kernels(tmp_path, dora):
  """PEFT's embedding ((B·A)ᵀ, norm over the vocabulary) and Conv2d factors, merged exactly."""
  with warnings.catch_warnings():  # PEFT saves the embedding's base weight too, and says so
    warnings.simplefilter("ignore", UserWarning)
    llama = _adapted(_llama("float32"), tmp_path / "llama", use_dora=dora,
                     target_modules=["embed_tokens", "q_proj"], rank_pattern={},
                     alpha_pattern={})
  ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
  want = _logits(llama.merge_and_unload(), ids)
  lj.merge_hf(tmp_path / "llama" / "base", tmp_path / "llama" / "adapter", tmp_path / "m1")
  got = _logits(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m1").eval(), ids)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  torch.manual_seed(0)
  vit = transformers.ViTForImageClassification(transformers.ViTConfig(
      hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
      image_size=16, patch_size=4, num_channels=3, num_labels=5)).eval()
  vit.save_pretrained(tmp_path / "vit")
  peft_model = peft.get_peft_model(vit, peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["projection", "query"], use_dora=dora,
      init_lora_weights=False))
  with torch.no_grad():
    for name, value in peft_model.named_parameters():
      if "lora_magnitude_vector" in name:
        value.mul_(1.2)
  peft_model.save_pretrained(tmp_path / "vit-adapter")
  pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    want = peft_model.merge_and_unload()(pixels).logits.numpy()
  lj.merge_hf(tmp_path / "vit", tmp_path / "vit-adapter", tmp_path / "m2")
  merged = transformers.ViTForImageClassification.from_pretrained(tmp_path / "m2").eval()
  with torch.no_grad():
    got = merged(pixels).logits.numpy()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_failures_leave_nothing_and_name_the_problem(tmp_path, monkeypatch):
  _adapted(_llama("float32"), tmp_path)
  with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: the base has no "
                     r"tensor 'other.layers.0.self_attn.q_proj.weight' \(pass tensor_name="):
    lj.merge_hf(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged",
                tensor_name=lambda m: m.replace("model.", "other.", 1))
  assert not (tmp_path / "merged").exists()
  # A crash in the middle of writing: no output, no staging left behind.
  from lora_jax._src.io import streaming

  calls = []
  original = streaming.SafetensorsWriter.write

  def failing(self, arrays):
    calls.append(1)
    if len(calls) == 7:
      raise OSError("disk full")
    return original(self, arrays)

  monkeypatch.setattr(streaming.SafetensorsWriter, "write", failing)
  with pytest.raises(OSError, match="disk full"):
    lj.merge_hf(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged",
                max_shard_size="30KB")
  # (the lock file beside the output stays, as for every merge)
  assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
      "adapter", "base"]
  with pytest.raises(ValueError, match=r"max_shard_size must be a positive size"):
    lj.merge_hf(tmp_path / "base", tmp_path / "adapter", tmp_path / "x", max_shard_size="big")
