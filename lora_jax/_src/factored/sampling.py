"""Generation with adapters, without merging: a jitted KV-cache sampler for zoo models.

``generate`` runs the lifted model factored (``wrap``), so one base serves any adapter, and a
stack of adapters serves a batch where each sequence has its own (``adapter_ids``, the
mixed-batch path). Prompts of different lengths are left-padded; the padding is masked out of
attention and positions count from each prompt's first token, so a padded prompt generates
what it generates alone. Decoding is greedy at ``temperature=0``; otherwise it samples from
the softmax at that temperature after ``top_k`` and ``top_p`` (nucleus) filtering.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src.core.config import LoraConfig
from lora_jax._src.core.params import LoraParams
from lora_jax._src.core.tree import PyTree
from lora_jax._src.factored.wrap import wrap


def init_cache(model: Any, batch: int, length: int, dtype: Any = jnp.float32) -> dict:
  """An empty Tunix KV cache: per layer ``k``, ``v`` ``[batch, length, kv_heads, head_dim]``."""
  cfg = model.config
  shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
  return {f"layer_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                         "end_index": jnp.zeros((batch,), jnp.int32)}
          for i in range(cfg.num_layers)}


def _filter(logits: jax.Array, top_k: int | None, top_p: float | None) -> jax.Array:
  """Logits outside the top-k / top-p set of each row at -inf (the set keeps at least one)."""
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
    keep_sorted = before < top_p
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def _pick(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None,
          top_p: float | None) -> jax.Array:
  logits = logits.astype(jnp.float32)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = _filter(logits / temperature, top_k, top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(model: Any, params: PyTree | LoraParams, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, config: LoraConfig | None = None,
             adapter_ids: Sequence[int] | None = None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None,
             key: jax.Array | None = None, pad_id: int = 0) -> np.ndarray:
  """Generates ``max_new_tokens`` tokens after each prompt with a KV cache, in one jit.

  Args:
    model: a ``ZooModel`` (``lj.load_hf``).
    params: the model's parameters, or ``LoraParams`` (then ``config`` is required): the
      adapters run factored, nothing is merged.
    prompts: token ids, one list per sequence (lengths may differ; at least one token each).
    max_new_tokens: how many tokens to generate per sequence.
    config: the ``LoraConfig`` of ``params`` when they are ``LoraParams``.
    adapter_ids: with a stack of adapters (``lj.stack_adapters``), one adapter index per
      sequence (``-1``: the base alone).
    temperature: 0 for greedy decoding; otherwise the sampling temperature.
    top_k: keep the ``top_k`` most likely tokens before sampling.
    top_p: keep the smallest set of tokens whose probability reaches ``top_p``.
    key: the random key (needed when ``temperature > 0``).
    pad_id: the token id written into left padding (masked out; any valid id).

  Returns:
    ``[len(prompts), max_new_tokens]`` int32 token ids.

  Raises:
    ValueError: for an empty prompt, ``max_new_tokens < 1``, sampling without a key,
      ``top_k < 1`` or ``top_p`` outside (0, 1], or ``LoraParams`` without their config.
  """
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}.")
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("generate: every prompt needs at least one token.")
  if temperature < 0 or (temperature > 0 and key is None):
    raise ValueError(f"generate: temperature {temperature} needs temperature >= 0 and, when "
                     "> 0, key=jax.random.key(...).")
  if top_k is not None and top_k < 1:
    raise ValueError(f"generate: top_k must be >= 1, got {top_k}.")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}.")
  adapted = isinstance(params, LoraParams)
  if adapted and config is None:
    raise ValueError("generate: LoraParams need config= (the LoraConfig they were lifted with).")
  length = max(len(p) for p in prompts)
  batch = len(prompts)
  tokens = np.full((batch, length), pad_id, np.int32)
  valid = np.zeros((batch, length), bool)
  for i, p in enumerate(prompts):
    tokens[i, length - len(p):] = p
    valid[i, length - len(p):] = True
  ids = None if adapter_ids is None else jnp.asarray(adapter_ids, jnp.int32)
  return np.asarray(_run(model, config if adapted else None, params, jnp.asarray(tokens),
                         jnp.asarray(valid), ids, max_new_tokens, float(temperature), top_k,
                         top_p, key if key is not None else jax.random.key(0)))


def _run(model, config, params, tokens, valid, ids, new, temperature, top_k, top_p, key):
  return _compiled(model, config, new, temperature, top_k, top_p, ids is not None)(
      params, tokens, valid, ids, key)


def _compiled(model, config, new, temperature, top_k, top_p, mixed):
  """One jitted program per (config, settings), kept on the model for its next call."""
  programs = model.__dict__.setdefault("_programs", {})
  cache_key = (config, new, temperature, top_k, top_p, mixed)
  if cache_key in programs:
    return programs[cache_key]

  def forward(params, tokens, cache, positions, mask, ids):
    if config is None:
      return model.apply(params, tokens, cache=cache, positions=positions, attention_mask=mask)
    apply = wrap(lambda p, t, c, pos, m: model.apply(p, t, cache=c, positions=pos,
                                                     attention_mask=m), config)
    return apply(params, tokens, cache, positions, mask, adapter_ids=ids)

  @jax.jit
  def run(params, tokens, valid, ids, key):
    batch, length = tokens.shape
    total = length + new
    slots = jnp.concatenate([valid, jnp.ones((batch, new), bool)], axis=1)  # [B, total]
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    causal = jnp.arange(total)[None, :] <= jnp.arange(length)[:, None]      # [L, total]
    mask = causal[None] & slots[:, None, :]
    cache = init_cache(model, batch, total)
    logits, cache = forward(params, tokens, cache, positions, mask, ids)
    keys = jax.random.split(key, new)
    first = _pick(logits[:, -1], keys[0], temperature, top_k, top_p)
    count = jnp.sum(valid, axis=1).astype(jnp.int32)                        # next position

    def step(carry, i):
      token, cache = carry
      position = (count + i)[:, None]
      step_mask = (jnp.arange(total)[None, :] <= length + i) & slots         # [B, total]
      logits, cache = forward(params, token[:, None], cache, position, step_mask[:, None, :],
                              ids)
      nxt = _pick(logits[:, -1], keys[i + 1], temperature, top_k, top_p)
      return (nxt, cache), token

    (last, _), out = jax.lax.scan(step, (first, cache), jnp.arange(new - 1))
    return jnp.concatenate([out.T, last[:, None]], axis=1) if new > 1 else last[:, None]

  programs[cache_key] = run
  return run
