"""The ``hf`` task of ``lora-jax train``: a Hugging Face checkpoint and the user's JSONL.

The model comes from the folder through the Tunix zoo (``zoo.load_hf``), its axes from
``infer_axes``; the data from ``textdata`` (the folder's tokenizer, the model's chat template,
loss on completion / assistant tokens only, packed windows, a held-out split for perplexity);
samples from ``sampling.generate`` with the adapters factored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._src.cli import textdata
from lora_jax._src.cli.tasks import Task
from lora_jax._src.core.config import LoraConfig
from lora_jax._src.core.params import LoraParams
from lora_jax._src.factored.infer import infer_axes
from lora_jax._src.factored.sampling import generate
from lora_jax._src.io.zoo import ZooModel, load_hf

# What the hf task adapts unless the job's lora.targets says otherwise: every attention and
# MLP projection of the Tunix models (Gemma's fused einsum kernels included).
TARGETS = (r"attn/(q_proj|k_proj|v_proj|o_proj|q_einsum|kv_einsum|qkv_einsum|"
           r"attn_vec_einsum)/w$", r"mlp/(gate_proj|up_proj|down_proj)/kernel$")


def masked_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean next-token loss over the labels that are targets (``labels >= 0``)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  valid = labels >= 0
  picked = jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
  return -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.maximum(jnp.sum(valid), 1).astype(
      jnp.float32)


def grain_batches(data: tuple[Any, Any], batch_size: int, seed: int) -> Any:
  """An endless grain pipeline of ``(x, y)`` batches, reshuffled each epoch; its iterator's
  ``get_state`` / ``set_state`` is the data position the job saves for an exact resume."""
  try:
    import grain  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError('The hf task reads its data with grain: pip install "lora_jax[models]".'
                      ) from None
  x, y = data
  size = min(batch_size, len(x))
  dataset = (grain.MapDataset.range(len(x)).shuffle(seed=seed).repeat()
             .batch(size, drop_remainder=True).map(lambda index: (x[index], y[index])))
  return iter(dataset.to_iter_dataset())


def build(model_settings: dict[str, Any], data: dict[str, Any], seed: int,
          lora_config: LoraConfig) -> tuple[Task, LoraConfig, ZooModel, textdata.Tokenizer]:
  """The task, the LoRA config with every target's axes inferred, the model and tokenizer."""
  folder = model_settings["hf"]
  model = load_hf(folder, dtype=jnp.dtype(model_settings["dtype"]))
  tokenizer = textdata.Tokenizer(folder)
  vocab = model.hf_config.get("vocab_size")
  if vocab is not None and tokenizer.vocab_size > vocab:
    raise ValueError(f"config key 'model.hf': the tokenizer has {tokenizer.vocab_size} tokens "
                     f"but the model's vocabulary is {vocab}; they are not one model's.")
  records = textdata.read_jsonl(data["jsonl"])
  train, held = textdata.split_examples(records, tokenizer, data["test_fraction"], seed)
  train_xy = textdata.pack(train, data["seq_len"])
  test_xy = textdata.pack(held, data["seq_len"])
  logits = lambda params, tokens: model.apply(params, tokens)[0]  # noqa: E731
  config = infer_axes(logits, model.params,
                      jax.ShapeDtypeStruct((1, data["seq_len"]), jnp.int32), config=lora_config)
  prompts = textdata.prompts_for_samples(records, tokenizer, data["samples"])

  def sample(params: Any, _apply: Callable[..., Any]) -> str:
    if not prompts:
      return ""
    out = generate(model, params, [ids for _, ids in prompts],
                   max_new_tokens=data["max_new_tokens"],
                   config=config if isinstance(params, LoraParams) else None)
    texts = []
    for (text, _), ids in zip(prompts, out.tolist()):
      if tokenizer.eos_id in ids:
        ids = ids[:ids.index(tokenizer.eos_id)]
      texts.append(text + tokenizer.decode(ids))
    return "\n---\n".join(texts)

  task = Task(init=lambda key: model.params, apply=logits, loss=masked_cross_entropy,
              pretrain=None, train=train_xy, test=test_xy, metric="perplexity",
              sample=sample if data["samples"] else None,
              batches=lambda batch_size, seed: grain_batches(train_xy, batch_size, seed))
  return task, config, model, tokenizer
