"""bf16 bases with float32 adapters: the adapter branch accumulates in float32.

The reference computes every use in float32 from the same bf16 values of the
base and the inputs, with ``W + s·A·B`` formed in float32, and rounds the
result to bf16 once. The factored form must agree with it up to that one
rounding, for adapter updates far below bf16's resolution of ``W`` too (which
merged bf16 weights lose), and its A and B gradients must carry float32
precision, not bf16's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lora_jax as lj

R = 4
GROUPS = jnp.array([5, 0, 7, 4], jnp.int32)
CONV_DN = ("NHWC", "HWIO", "NHWC")


def dense(p, x):
  w = p["w"]
  return x @ w


def transposed(p, x):
  w = p["w"]  # a kernel stored (out, in), used as x @ W.T
  return x @ w.T


def einsum_inside(p, x):
  w = p["w"]  # Gemma's q_einsum: (heads, embed, head_dim)
  return jnp.einsum("BTD,NDH->BTNH", x, w)


def experts(p, x):
  w = p["w"]
  return jnp.einsum("ECD,EDF->ECF", x, w)


def ragged(p, x):
  w = p["w"]
  return lax.ragged_dot(x, w, GROUPS)


def embed(p, ids):
  return jnp.take(p["w"], ids, axis=0)


def conv(p, x):
  w = p["w"]
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=CONV_DN)


# fn, weight shape, input shape (None: integer ids), in_axes, stack_axes
CASES = {
    "dense": (dense, (64, 48), (96, 64), (0,), ()),
    "transposed": (transposed, (48, 64), (96, 64), (1,), ()),
    "einsum-inside": (einsum_inside, (4, 64, 12), (3, 32, 64), (1,), ()),
    "experts": (experts, (4, 64, 48), (4, 24, 64), (1,), (0,)),
    "ragged_dot": (ragged, (4, 64, 48), (16, 64), (1,), (0,)),
    "embed": (embed, (80, 48), None, (0,), ()),
    "conv": (conv, (3, 3, 16, 24), (2, 8, 8, 16), (0, 1, 2), ()),
}


def _setup(name, delta_scale):
  fn, w_shape, x_shape, in_axes, stack_axes = CASES[name]
  k = jax.random.split(jax.random.key(0), 4)
  w = jax.random.normal(k[0], w_shape).astype(jnp.bfloat16)
  if x_shape is None:
    x = jax.random.randint(k[1], (6, 9), 0, w_shape[0])
  else:
    x = jax.random.normal(k[1], x_shape).astype(jnp.bfloat16)
  config = lj.LoraConfig(rank=R, alpha=R, targets=r"^w$", in_axes={r"^w$": in_axes},
                         stack_axes={r"^w$": stack_axes or 0})
  lp = lj.lift({"w": w}, config, key=k[2])
  a, b = lp.adapters["w"]["a"], lp.adapters["w"]["b"]
  # Scale B so that s·A·B is `delta_scale` of W's typical entry.
  b = jax.random.normal(k[3], b.shape) * delta_scale / np.sqrt(R)
  return fn, x, config, lj.LoraParams(lp.base, {"w": {"a": a, "b": b}})


def _reference(fn, x, config, lp):
  """fn in float32 with W + s·A·B formed in float32 from the same values."""
  w32 = lj.merge(jax.tree.map(lambda v: v.astype(jnp.float32), lp), config)["w"]
  x32 = x if jnp.issubdtype(x.dtype, jnp.integer) else x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    return fn({"w": w32}, x32)


def _ulps(y, ref):
  """|y - ref| in units of bf16's spacing at ref.

  Where a sum cancels to far below its terms, float32's own rounding of the
  terms (summed in another order) exceeds bf16's spacing at the result, so
  the spacing is floored at 2**-16 of the output's RMS.
  """
  ref = np.asarray(ref, np.float32)
  _, exponent = np.frexp(np.asarray(jnp.asarray(ref).astype(jnp.bfloat16), np.float32))
  spacing = np.ldexp(1.0, exponent - 8)  # bf16 keeps 8 significant bits
  spacing = np.maximum(spacing, np.sqrt(np.mean(ref ** 2)) * 2.0 ** -16)
  return np.abs(np.asarray(y, np.float32) - ref) / spacing


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_base_rounds_once(name):
  """Adapter updates ~1/1000 of W: below bf16's resolution, still in the factored output."""
  fn, x, config, lp = _setup(name, delta_scale=1e-3)
  out = jax.jit(lj.wrap(fn, config))(lp, x)
  assert out.dtype == jnp.bfloat16
  ref = _reference(fn, x, config, lp)
  err = _ulps(out, ref)
  # Rounded once from a float32 sum: at most one bf16 step off (a near-tie), rarely.
  assert err.max() <= 1.0 + 1e-6, err.max()
  assert np.mean(err > 0.501) < 0.02, np.mean(err > 0.501)
  # Merged bf16 weights round W + s·A·B to bf16 first, which drops most of the update.
  merged = fn(lj.merge(lp, config), x)
  base = fn(lp.base, x)
  changed = np.asarray(ref.astype(jnp.bfloat16) != base.astype(jnp.bfloat16))
  assert changed.mean() > 0.02  # the update is visible in a correctly rounded output
  merged_err = _ulps(merged, ref)
  if name == "embed":  # a lookup returns rows of W + s·A·B, which merging rounds the same way
    return
  assert np.mean(merged_err > 0.501) > 2 * np.mean(err > 0.501)


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_base_adapter_gradients_are_float32(name):
  fn, x, config, lp = _setup(name, delta_scale=0.05)
  cot = jax.random.normal(jax.random.key(7), jax.eval_shape(fn, lp.base, x).shape)
  cot_bf16 = cot.astype(jnp.bfloat16).astype(jnp.float32)  # what reaches a bf16 output
  apply = lj.wrap(fn, config)
  grads = jax.jit(jax.grad(
      lambda ad: jnp.sum(apply(lj.LoraParams(lp.base, ad), x).astype(jnp.float32) * cot)))(
          lp.adapters)

  def reference_loss(ad):
    return jnp.sum(_reference(fn, x, config, lj.LoraParams(lp.base, ad)) * cot_bf16)

  ref = jax.grad(reference_loss)(lp.adapters)
  for part in ("a", "b"):
    g, r = grads["w"][part], ref["w"][part]
    assert g.dtype == jnp.float32
    rel = float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r)))
    # bf16 rounding of the gradient would be ~2**-9 = 2e-3; float32 accumulation is far below.
    # A convolution takes one dtype, so A enters it rounded to bf16, and so does the x·A
    # that B's gradient is made of.
    assert rel < (4e-3 if (name, part) == ("conv", "b") else 2e-4), (part, rel)
