"""Tiny random Hugging Face causal LMs (transformers, PyTorch) saved as folders, for the zoo tests.

Each family is built by transformers itself and saved with ``save_pretrained``, so the folder is
what a user downloads, only small.
"""

from __future__ import annotations

import pathlib

import numpy as np

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, head_dim=8, max_position_embeddings=64, rope_theta=10000.0,
             rms_norm_eps=1e-6)
NORM_NOISE = True
FAMILIES = ("llama", "qwen2", "qwen3", "gemma2", "gemma2_gqa", "gemma3")


def build(family: str, seed: int = 0):
  """The transformers model (eval mode, float32) of ``family`` with random weights."""
  import torch
  import transformers

  torch.manual_seed(seed)
  kv = 4 if family == "gemma2" else 2  # gemma2: one fused qkv kernel; gemma2_gqa: q + kv
  # google-tunix 0.1.6 and 0.1.7's Llama 3 and Qwen 3 apply RoPE base 1e6 whatever the config
  # says.
  common = dict(SMALL, num_key_value_heads=kv,
                rope_theta=1e6 if family in ("llama", "qwen3") else 10000.0)
  if family == "llama":
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common,
                                                                  tie_word_embeddings=False))
  elif family == "qwen2":
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common,
                                                                  tie_word_embeddings=False))
  elif family == "qwen3":
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common,
                                                                  tie_word_embeddings=False))
  elif family in ("gemma2", "gemma2_gqa"):
    model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **common, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=8,
        sliding_window=4, final_logit_softcapping=30.0, attn_logit_softcapping=50.0))
  elif family == "gemma3":
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **dict(common, num_hidden_layers=6), sliding_window=4, query_pre_attn_scalar=8,
        rope_local_base_freq=10000.0))
  else:
    raise ValueError(family)
  with torch.no_grad():  # transformers zero-initializes some norms; make every weight count
    for name, p in model.named_parameters():
      if "norm" in name and NORM_NOISE:
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def save(family: str, folder: pathlib.Path, seed: int = 0):
  model = build(family, seed)
  model.save_pretrained(folder, safe_serialization=True)
  return model


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def save_tokenizer(folder: pathlib.Path, vocab_size: int = SMALL["vocab_size"]) -> None:
  """A character-level tokenizer.json (the tokenizers library) with a chat template."""
  import json

  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

  specials = ["<pad>", "<s>", "</s>", "<unk>"]
  chars = [chr(c) for c in range(32, 127)][:vocab_size - len(specials)]
  vocab = {t: i for i, t in enumerate(specials + chars)}
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
  tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", 1)])
  tokenizer.decoder = decoders.Fuse()
  tokenizer.add_special_tokens(specials)  # "</s>" in a chat template is the EOS token
  tokenizer.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}))


def records() -> list[dict]:
  """60 JSONL records of sums, in the three shapes the hf task reads."""
  rng = np.random.default_rng(0)
  out = []
  for i in range(60):
    a, b = rng.integers(0, 10, 2)
    if i % 3 == 0:
      out.append({"text": f"{a} plus {b} is {a + b}."})
    elif i % 3 == 1:
      out.append({"prompt": f"{a} plus {b} is", "completion": f" {a + b}."})
    else:
      out.append({"messages": [{"role": "user", "content": f"{a} plus {b}?"},
                               {"role": "assistant", "content": f"{a + b}."}]})
  return out


def assert_runs_equal(first: pathlib.Path, second: pathlib.Path) -> None:
  """Two job runs ended with the same adapters, bit for bit, and the same loss curve."""
  import json

  import jax

  import lora_jax as lj
  adapters = [lj.load_adapters(run / "adapters")[0] for run in (first, second)]
  for a, b in zip(*(jax.tree.leaves(x) for x in adapters)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  curves = [json.loads((run / "metrics.json").read_text())["curves"]["lora"]
            for run in (first, second)]
  assert curves[0] == curves[1]
