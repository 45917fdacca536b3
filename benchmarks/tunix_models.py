"""Tunix's models (google-tunix, ``pip install "lora_jax[models]"``) for train_step.py.

Tiny but LLM-shaped: d_model 512, 8 query heads over 2 KV heads (head_dim 64), MLP 2048,
4 layers, vocabulary 1024, sequence 128, batch 8, float32; random weights (the cost of a step
does not depend on them). LoRA r=8 on every attention and MLP projection (Gemma 3's
``q_einsum``/``kv_einsum``/``attn_vec_einsum`` included), axes from ``lj.infer_axes``;
qwix beside it through ``qwix.apply_lora_to_model``, as Tunix itself applies LoRA.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import optax

# Every attention and MLP projection of the Tunix models (as the hf task of lora-jax train).
TARGETS = (r"attn/(q_proj|k_proj|v_proj|o_proj|q_einsum|kv_einsum|qkv_einsum|"
           r"attn_vec_einsum)/w$|mlp/(gate_proj|up_proj|down_proj)/kernel$")
SIZES = dict(num_layers=4, embed_dim=512, hidden_dim=2048, num_heads=8, head_dim=64,
             num_kv_heads=2)
VOCAB, SEQ, BATCH = 1024, 128, 8
QWIX_MODULES = {"llama3": ".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                "qwen3": ".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                "gemma3": ".*(q_einsum|kv_einsum|qkv_einsum|attn_vec_einsum|gate_proj|up_proj|"
                          "down_proj)"}


def _config(family: str):
  module = importlib.import_module(f"tunix.models.{family}.model")
  if family == "gemma3":
    return module, module.ModelConfig(**SIZES, num_embed=VOCAB, sliding_window_size=64,
                                      param_dtype=jnp.float32)
  return module, module.ModelConfig(**SIZES, vocab_size=VOCAB, rope_theta=1_000_000,
                                    norm_eps=1e-6)


def _inputs(tokens):
  batch, length = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch, length, length))
  return positions, mask


class TunixModel:
  """A Tunix model with the ``init`` / ``apply`` pair train_step.py's Linen models have."""

  def __init__(self, family: str):
    from flax import nnx
    self.family = family
    module, config = _config(family)
    cls = {"llama3": "Llama3", "qwen3": "Qwen3", "gemma3": "Gemma3"}[family]
    # Built once, outside any trace; init only draws new values for its parameters.
    model = getattr(module, cls)(config, rngs=nnx.Rngs(params=0))
    self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)

  def init(self, key, tokens):
    del tokens  # Gemma 3's MLP kernels start at zero: every leaf is redrawn here
    leaves, treedef = jax.tree.flatten(self.params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [0.02 * jax.random.normal(k, x.shape, x.dtype)
                                        for k, x in zip(keys, leaves)])

  def apply(self, params, tokens):
    from flax import nnx
    positions, mask = _inputs(tokens)
    with jax.numpy_dtype_promotion("standard"):
      return nnx.merge(self.graphdef, params, self.rest)(tokens, positions, None, mask)[0]

  def qwix_variant(self, params, rank: int, make_step, loss):
    """qwix LoRA on this model with ``params`` as its base, trained as Tunix trains it."""
    del make_step
    import qwix
    from flax import nnx
    model = nnx.merge(self.graphdef, params, self.rest)
    tokens = jnp.zeros((BATCH, SEQ), jnp.int32)
    positions, mask = _inputs(tokens)
    provider = qwix.LoraProvider(module_path=QWIX_MODULES[self.family], rank=rank,
                                 alpha=2.0 * rank)
    with jax.numpy_dtype_promotion("standard"):
      qmodel = qwix.apply_lora_to_model(model, provider, tokens, positions, None, mask,
                                        rngs=nnx.Rngs(1))
    return NnxRunner(qmodel, loss)


class NnxRunner:
  """A qwix-adapted NNX model trained the NNX way (nnx.jit, nnx.value_and_grad over
  nnx.LoRAParam, nnx.Optimizer), as Tunix trains it: qwix's interceptors set module
  attributes while the model runs, which a functional split/merge step cannot host."""

  def __init__(self, model, loss):
    from flax import nnx
    self.model = model
    self.optimizer = nnx.Optimizer(model, optax.adam(1e-4), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer, tokens):
      positions, mask = _inputs(tokens)

      def loss_fn(model):
        with jax.numpy_dtype_promotion("standard"):
          return loss(model(tokens, positions, None, mask)[0], tokens)

      value, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
      optimizer.update(model, grads)
      return value

    self.step = step

  def lower(self, tokens):
    return self.step.lower(self.model, self.optimizer, tokens)

  def __call__(self, tokens):
    return self.step(self.model, self.optimizer, tokens)


def is_floor(path: str) -> bool:
  """The norms' scales: what the floor trains (Tunix names them w or scale)."""
  return "norm" in path

