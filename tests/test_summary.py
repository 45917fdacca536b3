"""summary: counts, the LoRA paper's RoBERTa-base figure, the printed table."""

import jax
import jax.numpy as jnp

import lora_jax as lj


def _roberta_base():
  """Abstract RoBERTa-base encoder shapes: 12 layers, d=768, FFN 3072, vocab 50265."""
  sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
  layers = {}
  for i in range(12):
    attn = {n: {"kernel": sds(768, 768), "bias": sds(768)} for n in ("query", "key", "value")}
    layers[f"layer_{i}"] = {
        "attention": {**attn, "output": {"kernel": sds(768, 768), "bias": sds(768)}},
        "intermediate": {"kernel": sds(768, 3072), "bias": sds(3072)},
        "output": {"kernel": sds(3072, 768), "bias": sds(768)},
    }
  return {"params": {"embeddings": {"word": {"embedding": sds(50265, 768)}}, "encoder": layers}}


def test_roberta_base_lora_paper_count():
  config = lj.LoraConfig(rank=8, targets=r"attention/(query|value)/kernel$")
  lp = lj.lift(_roberta_base(), config, key=jax.random.key(0))
  s = lj.summary(lp, config)
  assert s.adapter_params == 294_912
  assert len(s.rows) == 24
  assert s.adapter_bytes == 294_912 * 4
  assert s.trainable_params == 294_912
  text = str(s)
  assert "294,912" in text
  assert "params/encoder/layer_0/attention/query/kernel" in text
  assert "(768, 768)" in text and "(768, 8)" in text and "(8, 768)" in text


def test_summary_counts_trainable_and_plain_trees():
  params = {"d": {"kernel": jnp.ones((10, 6)), "bias": jnp.ones(6)}}
  config = lj.LoraConfig(rank=2, trainable=r"bias$")
  s = lj.summary(params, config)
  assert s.base_params == 66
  assert s.adapter_params == 2 * 10 + 2 * 6
  assert s.full_trainable_params == 6
  assert s.trainable_params == 38
  assert abs(s.trainable_percent - 100 * 38 / 66) < 1e-9


def test_rows_in_natural_order():
  params = {"layers": {str(i): {"kernel": jnp.zeros((4, 4))} for i in range(12)}}
  rows = lj.summary(params, lj.LoraConfig(rank=2)).rows
  assert [r.path for r in rows] == [f"layers/{i}/kernel" for i in range(12)]
