"""Third-party model code: Hugging Face transformers' Flax models (transformers < 5).

Optional: skips with a reason when transformers with Flax models is not installed
(`pip install "transformers<5"`). Models are built from small configs: nothing is downloaded.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # transformers' Flax models
if not hasattr(transformers, "FlaxGPT2LMHeadModel"):
  pytest.skip(f"transformers {transformers.__version__} has no Flax models (they ended in 5.0); "
              "install 'transformers<5' to run these tests", allow_module_level=True)



@pytest.fixture(autouse=True)
def standard_promotion():
  """transformers' own Flax code mixes int and bool/float arrays: strict promotion rejects it."""
  with jax.numpy_dtype_promotion("standard"):
    yield


GPT2_IN_AXES = {r"(c_attn|c_proj|c_fc)/kernel$": (1,)}  # Conv1D kernels are stored (out, in)


def _gpt2():
  config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
  model = transformers.FlaxGPT2LMHeadModel(config, seed=0)
  ids = jax.random.randint(jax.random.key(0), (2, 12), 0, 64)
  return model, ids


def _perturbed(lp):
  return lj.LoraParams(lp.base, jax.tree.map(
      lambda a: a + 0.05 * jax.random.normal(jax.random.key(7), a.shape), lp.adapters))


def test_gpt2_out_in_kernels_need_their_layout():
  model, ids = _gpt2()
  config = lj.LoraConfig(rank=4, targets=r"(c_attn|c_proj)/kernel$")
  lp = lj.lift(model.params, config, key=jax.random.key(1))
  with pytest.raises(ValueError, match=r"stored \(out, in\)[^$]*h/0/attn/c_attn/kernel: shape "
                     r"\(96, 32\)"):
    lj.wrap(model.__call__, config, params_kwarg="params")(lp, ids)


def test_gpt2_factored_equals_merged_with_params_kwarg():
  model, ids = _gpt2()
  config = lj.LoraConfig(rank=4, targets=r"(c_attn|c_proj|c_fc)/kernel$", in_axes=GPT2_IN_AXES)
  lp = _perturbed(lj.lift(model.params, config, key=jax.random.key(1)))
  assert lp.adapters["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]["a"].shape == (32, 4)
  apply = lj.wrap(model.__call__, config, params_kwarg="params")
  with warnings.catch_warnings():
    warnings.simplefilter("error", lj.FallbackWarning)
    logits = jax.jit(lambda lp, ids: apply(lp, ids).logits)(lp, ids)
    grads = jax.grad(lambda lp: jnp.mean(apply(lp, ids).logits ** 2))(lp)
  merged = model(ids, params=lj.merge(lp, config)).logits
  np.testing.assert_allclose(logits, merged, rtol=1e-4, atol=1e-5)
  merged_apply = lj.wrap(model.__call__, config, mode="merge", params_kwarg="params")
  reference = jax.grad(lambda lp: jnp.mean(merged_apply(lp, ids).logits ** 2))(lp)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6),
               grads.adapters, reference.adapters)


def test_gpt2_layout_is_inferred_from_the_model():
  """infer_axes finds the (out, in) Conv1D layout that GPT2_IN_AXES states by hand."""
  model, ids = _gpt2()
  base = lj.LoraConfig(rank=4, targets=r"(c_attn|c_proj|c_fc)/kernel$")
  config = lj.infer_axes(lambda p, ids: model(ids, params=p).logits, model.params,
                         jax.ShapeDtypeStruct(ids.shape, ids.dtype), config=base)
  targets = lj.plan(model.params, config)
  assert len(targets) == 8 and all(t.in_axes == (1,) and t.layout_certain for t in targets)
  assert all(r"\d+" in pattern for pattern, _ in config.in_axes)  # one pattern for all layers
  lp = _perturbed(lj.lift(model.params, config, key=jax.random.key(1)))
  with warnings.catch_warnings():
    warnings.simplefilter("error", lj.FallbackWarning)
    logits = lj.wrap(model.__call__, config, params_kwarg="params")(lp, ids).logits
  np.testing.assert_allclose(logits, model(ids, params=lj.merge(lp, config)).logits,
                             rtol=1e-4, atol=1e-5)


def test_roberta_dense_kernels_factored_equals_merged():
  config = transformers.RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64,
                                      max_position_embeddings=40)
  model = transformers.FlaxRobertaModel(config, seed=0)
  ids = jax.random.randint(jax.random.key(0), (2, 10), 3, 64)
  lora = lj.LoraConfig(rank=4, targets=r"(query|value)/kernel$")
  lp = _perturbed(lj.lift(model.params, lora, key=jax.random.key(1)))
  out = lj.wrap(model.__call__, lora, params_kwarg="params")(lp, ids).last_hidden_state
  merged = model(ids, params=lj.merge(lp, lora)).last_hidden_state
  np.testing.assert_allclose(out, merged, rtol=1e-4, atol=1e-5)


def test_gpt2_kv_cache_output_keeps_past_key_values_factored():
  """Factored wrap returns the whole ModelOutput (past_key_values for KV-cache decoding), as
  merge mode does, and the cache it returns equals merge mode's."""
  model, ids = _gpt2()
  config = lj.LoraConfig(rank=4, targets=r"(c_attn|c_proj|c_fc)/kernel$", in_axes=GPT2_IN_AXES)
  lp = _perturbed(lj.lift(model.params, config, key=jax.random.key(1)))
  cache = model.init_cache(2, 16)
  kwargs = dict(past_key_values=cache, position_ids=jnp.broadcast_to(jnp.arange(12), (2, 12)),
                attention_mask=jnp.ones((2, 16), jnp.int32))
  outs = {mode: lj.wrap(model.__call__, config, params_kwarg="params", mode=mode)(lp, ids,
                                                                                  **kwargs)
          for mode in ("factored", "merge")}
  assert list(outs["factored"].keys()) == list(outs["merge"].keys()) == ["logits",
                                                                          "past_key_values"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               outs["factored"].past_key_values, outs["merge"].past_key_values)
