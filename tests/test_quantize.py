"""QLoRA: NF4 / int8 quantized bases (``lj.quantize``) through factored training and merge.

NF4 is checked bit for bit against bitsandbytes where it is installed. The factored
model on a quantized base is compared with the model on merged weights formed from the
dequantized base; the memory test reads XLA's memory analysis of a compiled step.
"""

import importlib.util
import json
import math
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import zoo
from architectures import architectures

import lora_jax as lj
from lora_jax._src.cli.main import main as cli
from lora_jax._src.numerics import qarray

F32 = dict(rtol=1e-4, atol=1e-5)
KINDS = [dict(kind="nf4", block_size=2), dict(kind="nf4", block_size=2, double_quant=False),
         dict(kind="int8")]


def _reference(lp, config, apply, x):
  plain = lj.LoraParams(lj.dequantize(lp.base), lp.adapters)
  return apply(lj.merge(plain, config), x)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="bitsandbytes is not installed (pip install -e '.[test]')")
@pytest.mark.parametrize("shape", [(64, 128), (300, 192), (33, 64)])
def test_nf4_is_bitsandbytes_nf4(shape):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes.functional as bnb
    import torch
  rng = np.random.default_rng(0)
  x = rng.standard_normal(shape).astype(np.float32)
  x[0, :64] = 0.0  # an all-zero block
  x[1, 5] = 30.0   # an outlier
  q = qarray.quantize_array(jnp.asarray(x), "nf4", 64, False)
  codes, state = bnb.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4",
                                   compress_statistics=False)
  np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), codes.numpy().reshape(-1))
  np.testing.assert_array_equal(np.asarray(q.absmax).reshape(-1), state.absmax.numpy())
  np.testing.assert_array_equal(np.asarray(q.dequantize()),
                                bnb.dequantize_4bit(codes, state).numpy())
  np.testing.assert_array_equal(qarray.NF4_VALUES, state.code.numpy())
  # Double quantization: the same dynamic map (to one float32 ulp) and nearly all the same
  # absmax codes (a value on a rounding boundary may differ by that ulp).
  np.testing.assert_allclose(qarray.dynamic_map(), bnb.create_dynamic_map(signed=True).numpy(),
                             rtol=2e-7, atol=1e-9)
  dq = qarray.quantize_array(jnp.asarray(x), "nf4", 64, True)
  _, state2 = bnb.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4",
                                compress_statistics=True)
  same = np.mean(np.asarray(dq.absmax).reshape(-1) == state2.absmax.numpy())
  assert same >= 0.95, same


@pytest.mark.parametrize("kind,double_quant,limit", [("nf4", True, 4.15), ("nf4", False, 4.55),
                                                      ("int8", None, 8.1)])
def test_bits_per_parameter(kind, double_quant, limit):
  params = {"w": {"kernel": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}}
  q = lj.quantize(params, targets="kernel", kind=kind, double_quant=double_quant)
  s = lj.summary(q, lj.LoraConfig(rank=4))
  bits = 8 * s.quantized_bytes / s.quantized_params
  assert bits <= limit, bits
  assert "bits each" in str(s)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: "-".join(map(str, k.values())))
@pytest.mark.parametrize("case", zoo.cases(), ids=lambda c: c.name)
def test_factored_equals_merged_on_zoo(case, kind):
  base = lj.quantize(case.params, targets=r"(kernel|embedding|/w)$", **kind)
  lp = zoo.randomize(lj.lift(base, case.config, key=jax.random.key(1)))
  apply = lj.wrap(case.apply, case.config)
  with warnings.catch_warnings():
    warnings.simplefilter("error", lj.FallbackWarning)
    got = jax.jit(apply)(lp, case.x)
  np.testing.assert_allclose(got, _reference(lp, case.config, case.apply, case.x), **F32)

  def loss(adapters, fn):
    out = fn(lj.LoraParams(lp.base, adapters), case.x)
    return jnp.sum(jnp.sin(out))

  grads = jax.jit(jax.grad(loss), static_argnums=1)(lp.adapters, apply)
  want = jax.grad(lambda ad: jnp.sum(jnp.sin(_reference(
      lj.LoraParams(lp.base, ad), case.config, case.apply, case.x))))(lp.adapters)
  # float32 sums of O(100) terms: absolute tolerance relative to the largest entry.
  jax.tree.map(lambda g, w: np.testing.assert_allclose(
      g, w, rtol=2e-4, atol=2e-5 * max(1.0, float(jnp.abs(w).max()))), grads, want)
  # Without adapters the quantized base runs exactly as its dequantized weights.
  np.testing.assert_allclose(apply(lj.disable(lp), case.x),
                             case.apply(lj.dequantize(lp.base), case.x), **F32)


def test_bf16_base_and_merge_dtype():
  model = nn.Dense(128)
  x = jax.random.normal(jax.random.key(1), (4, 64), jnp.bfloat16)
  params = jax.tree.map(lambda v: v.astype(jnp.bfloat16),
                        model.init(jax.random.key(0), x.astype(jnp.float32)))
  config = lj.LoraConfig(rank=4, targets=r"kernel$")
  lp = zoo.randomize(lj.lift(lj.quantize(params, targets=r"kernel$"), config,
                             key=jax.random.key(2)))
  got = jax.jit(lj.wrap(model.apply, config))(lp, x)
  assert got.dtype == jnp.bfloat16
  want = _reference(lp, config, model.apply, x)
  np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=2e-2,
                             atol=2e-2)
  merged = lj.merge(lp, config, dtype=jnp.float32)
  assert merged["params"]["kernel"].dtype == jnp.float32
  assert merged["params"]["bias"].dtype == jnp.bfloat16  # not quantized: kept


class _Deep(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(8):
      x = jnp.tanh(nn.Dense(512, use_bias=False, name=f"layer{i}")(x))
    return x


def _step(apply, opt):
  def step(lp, state, x):
    loss, g = jax.value_and_grad(lambda ad: jnp.mean(apply(lj.LoraParams(lp.base, ad), x) ** 2)
                                 )(lp.adapters)
    updates, state = opt.update(g, state, lp.adapters)
    return optax.apply_updates(lp.adapters, updates), state, loss
  return step


def _memory(base, config, model, x):
  lp = lj.lift(base, config, key=jax.random.key(1))
  opt = optax.adam(1e-3)
  with jax.numpy_dtype_promotion("standard"):  # optax Adam mixes float and int32 counts
    compiled = jax.jit(_step(lj.wrap(model.apply, config), opt)).lower(
        lp, opt.init(lp.adapters), x).compile()
  mem = compiled.memory_analysis()
  return mem.temp_size_in_bytes, mem.argument_size_in_bytes


def test_training_step_memory_holds_the_quantized_base():
  """A step's temporaries hold at most about one layer's dequantized weight (plus the
  float32 step's own), never a full-precision copy of all eight."""
  model, x = _Deep(), jax.random.normal(jax.random.key(0), (16, 512))
  params = model.init(jax.random.key(1), x)
  config = lj.LoraConfig(rank=8, targets=r"kernel$")
  layer = 512 * 512 * 4
  temp32, args32 = _memory(params, config, model, x)
  tempq, argsq = _memory(lj.quantize(params, targets=r"kernel$"), config, model, x)
  assert tempq - temp32 <= 1.5 * layer, (tempq - temp32) / layer  # 1.03 measured
  assert argsq <= 0.15 * args32 + 2 * 512 * 8 * 4 * 8 * 3, argsq / args32


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(4):
      h = nn.gelu(nn.Dense(1024, name=f"up{i}")(nn.LayerNorm()(x)))
      x = x + nn.Dense(256, name=f"down{i}")(h)
    return x


def test_transformer_mlp_step_memory_is_that_of_the_float_step():
  """Pre-norm GELU MLP blocks: the quantized step keeps what the float32 step keeps (one
  buffer per up-projection output, the GELU input; the LayerNorm and GELU outputs
  recomputed), plus at most one layer's dequantized weights in flight."""
  model, x = _Mlp(), jax.random.normal(jax.random.key(0), (4, 128, 256))
  params = model.init(jax.random.key(1), x)
  config = lj.LoraConfig(rank=8, targets=r"kernel$")
  temp32, _ = _memory(params, config, model, x)
  tempq, _ = _memory(lj.quantize(params, targets=r"kernel$"), config, model, x)
  layer = 2 * 256 * 1024 * 4  # both kernels of a block, float32
  assert tempq <= temp32 + layer, (tempq - temp32) / layer


def test_scanned_layers_slice_quantized_codes():
  case = next(c for c in zoo.cases() if c.name == "scan")
  base = lj.quantize(case.params, targets=r"kernel$", block_size=4)  # 96 scales per layer
  w = base["params"]["blocks"]["Dense_0"]["kernel"]
  assert w.shape == (3, 24, 16) and w.offset.shape == (3,)  # one scale group per layer
  lp = zoo.randomize(lj.lift(base, case.config, key=jax.random.key(1)))
  with warnings.catch_warnings():
    warnings.simplefilter("error", lj.FallbackWarning)
    got = jax.jit(lj.wrap(case.apply, case.config))(lp, case.x)
  np.testing.assert_allclose(got, _reference(lp, case.config, case.apply, case.x), **F32)


def test_dropout_mask_is_the_same_in_backward():
  """LoRA dropout through a dequantized use: the gradient matches a finite difference."""
  model = nn.Dense(64, use_bias=False)
  x = jax.random.normal(jax.random.key(0), (4, 64))
  params = model.init(jax.random.key(1), x)
  config = lj.LoraConfig(rank=4, targets=r"kernel$", dropout=0.5)
  lp = zoo.randomize(lj.lift(lj.quantize(params, targets=r"kernel$"), config,
                             key=jax.random.key(2)))
  apply = lj.wrap(model.apply, config)
  rng = jax.random.key(5)
  f = lambda b: jnp.sum(apply(lj.LoraParams(lp.base, {"params": {"kernel": {  # noqa: E731
      "a": lp.adapters["params"]["kernel"]["a"], "b": b}}}), x, lora_rng=rng) ** 2)
  b = lp.adapters["params"]["kernel"]["b"]
  g = jax.jit(jax.grad(f))(b)
  d = jnp.zeros_like(b).at[1, 3].set(1e-2)
  numeric = (f(b + d) - f(b - d)) / 2e-2
  np.testing.assert_allclose(g[1, 3], numeric, rtol=2e-2)


def test_sharded_quantize_lift_step_and_checkpoint(tmp_path):
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  model = nn.Dense(256, use_bias=False)
  x = jax.random.normal(jax.random.key(0), (8, 128))
  params = model.init(jax.random.key(1), x)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "model"))
  params = jax.device_put(params, sharding)
  base = lj.quantize(params, targets=r"kernel$")
  w = base["params"]["kernel"]
  assert w.codes.sharding.spec == jax.sharding.PartitionSpec("data", "model")
  config = lj.LoraConfig(rank=4, targets=r"kernel$")
  lp = zoo.randomize(lj.lift(base, config, key=jax.random.key(2)))
  assert lp.adapters["params"]["kernel"]["b"].sharding.spec[-1] == "model"
  got = jax.jit(lj.wrap(model.apply, config))(lp, x)
  np.testing.assert_allclose(got, _reference(lp, config, model.apply, x), **F32)
  # orbax: save, then restore sharded onto an abstract quantized target.
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "base", base)
  checkpointer.wait_until_finished()
  abstract = lj.quantize(jax.tree.map(
      lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding), params),
      targets=r"kernel$")
  restored = checkpointer.restore(tmp_path / "base", abstract)
  r = restored["params"]["kernel"]
  assert r.codes.sharding.spec == jax.sharding.PartitionSpec("data", "model")
  for a, b in zip(r.arrays, w.arrays):
    np.testing.assert_array_equal(a, b)


def test_quantize_errors_name_the_path():
  params = {"emb": {"ids": jnp.zeros((4, 64), jnp.int32)}, "ln": {"scale": jnp.ones(64)},
            "odd": {"kernel": jnp.ones((8, 48))}, "ok": {"kernel": jnp.ones((8, 64))}}
  with pytest.raises(ValueError) as e:
    lj.quantize(params, targets=r"(ids|scale|kernel)$")
  msg = str(e.value)
  assert "emb/ids: only floating-point" in msg
  assert "ln/scale: shape (64,)" in msg
  assert "odd/kernel: shape (8, 48); blocks of 64" in msg and "ok/kernel" not in msg
  with pytest.raises(ValueError, match="matches no parameter path"):
    lj.quantize(params, targets=r"nothing$")
  with pytest.raises(ValueError, match="positive even"):
    lj.quantize(params, targets=r"ok/kernel$", block_size=3)
  with pytest.raises(ValueError, match="double_quant applies to NF4"):
    lj.quantize(params, targets=r"ok/kernel$", kind="int8", double_quant=True)
  with pytest.raises(ValueError, match="kind must be one of"):
    lj.quantize(params, targets=r"ok/kernel$", kind="int4")
  q = lj.quantize(params, targets=r"ok/kernel$")
  with pytest.raises(ValueError, match="ok/kernel: already quantized"):
    lj.quantize(q, targets=r"kernel$", kind="int8", block_size=16)
  mesh = jax.make_mesh((8,), ("model",))
  sharded = jax.device_put(jnp.ones((4, 256)), jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, "model")))
  with pytest.raises(ValueError, match="split in 8 shards of 32"):
    lj.quantize({"kernel": sharded}, targets="kernel")


def test_quantized_targets_refuse_variants_and_full_training():
  params = {"w": {"kernel": jnp.ones((8, 64))}}
  q = lj.quantize(params, targets="kernel")
  with pytest.raises(ValueError, match="w/kernel: DoRA on a quantized base"):
    lj.lift(q, lj.LoraConfig(rank=2, use_dora=True), key=jax.random.key(0))
  with pytest.raises(ValueError, match="w/kernel: init='pissa'"):
    lj.lift(q, lj.LoraConfig(rank=2, init="pissa"), key=jax.random.key(0))
  config = lj.LoraConfig(rank=2, targets=r"nothing", trainable=r"kernel$")
  with pytest.raises(ValueError, match="quantized leaves are frozen"):
    lj.wrap(lambda p, x: x @ p["w"]["kernel"], config)(lj.LoraParams(q, {}), jnp.ones((1, 8)))


def test_double_quantization_groups_per_layer_only_where_it_pays():
  """A stacked kernel with many scales per layer gets a group per layer (slices stay
  quantized); a (in, heads, head_dim) kernel with 2 scales per row gets one group."""
  stacked = lj.quantize({"k": jnp.ones((2, 128, 128))}, targets="k")["k"]
  assert stacked.offset.shape == (2,) and stacked.drop_leading_axis() is not None
  query = lj.quantize({"k": jax.random.normal(jax.random.key(0), (256, 2, 64))},
                      targets="k")["k"]
  assert query.offset.shape == () and query.drop_leading_axis() is None
  assert 8 * query.nbytes / query.size < 4.15
  np.testing.assert_allclose(query.dequantize(), lj.dequantize({"k": query})["k"], rtol=1e-6)


def _saved_qlora(tmp_path):
  """A quantized base and adapters trained on it, saved; and the full-precision original."""
  model = nn.Dense(128)
  x = jax.random.normal(jax.random.key(0), (4, 64))
  params = model.init(jax.random.key(1), x)
  config = lj.LoraConfig(rank=4, targets=r"kernel$")
  base = lj.quantize(params, targets=r"kernel$")
  lp = zoo.randomize(lj.lift(base, config, key=jax.random.key(2)))
  lj.save_quantized(tmp_path / "qbase", base)
  lj.save_adapters(tmp_path / "adapters", lp, config)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "fbase", params)
  return model, x, params, config, base, lp


def test_save_load_quantized_and_refusals(tmp_path):
  _, _, params, _, base, _ = _saved_qlora(tmp_path)
  got = lj.load_quantized(tmp_path / "qbase")
  w, r = base["params"]["kernel"], got["params"]["kernel"]
  assert repr(r) == repr(w)
  for a, b in zip(r.arrays, w.arrays):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(FileExistsError, match="pass overwrite=True"):
    lj.save_quantized(tmp_path / "qbase", base)
  lj.save_quantized(tmp_path / "qbase", base, overwrite=True)
  with pytest.raises(FileExistsError, match="is not a quantized base saved by"):
    lj.save_quantized(tmp_path / "fbase", base, overwrite=True)
  with pytest.raises(ValueError, match="holds no QuantizedArray leaf"):
    lj.save_quantized(tmp_path / "plain", params)
  with pytest.raises(ValueError, match="no lora_jax_quantization.json"):
    lj.load_quantized(tmp_path / "fbase")
  # Codes saved with orbax alone say nothing of their kind or block size: refused.
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "loose", base)
  with pytest.raises(ValueError, match=r"\['params/kernel'\] hold quantization codes"):
    lj.merge_checkpoint(tmp_path / "loose", tmp_path / "adapters", tmp_path / "out")
  # A record that does not fit the arrays (here: another block size) is refused.
  record = json.loads((tmp_path / "qbase" / "lora_jax_quantization.json").read_text())
  record["params/kernel"]["block_size"] = 32
  (tmp_path / "qbase" / "lora_jax_quantization.json").write_text(json.dumps(record))
  with pytest.raises(lj.ChecksumError, match="lora_jax_quantization.json: its content changed"):
    lj.merge_checkpoint(tmp_path / "qbase", tmp_path / "adapters", tmp_path / "out")
  # Without the checksum record (as lora_jax 0.3.0 wrote it), the fit check still refuses it.
  (tmp_path / "qbase" / "lora_jax_checksums.json").unlink()
  with pytest.raises(ValueError, match="params/kernel is recorded as nf4"):
    lj.load_quantized(tmp_path / "qbase")


@pytest.mark.parametrize("which", ["qbase", "fbase"])
def test_merge_cli_with_quantized_or_original_base(tmp_path, which, capsys):
  """lora-jax merge over the quantized base (dequantized + delta) or over the
  full-precision original (what QLoRA deploys: W + delta), each checked by lineage."""
  model, x, params, config, _, lp = _saved_qlora(tmp_path)
  assert cli(["merge", "--base", str(tmp_path / which), "--adapters",
              str(tmp_path / "adapters"), "--out", str(tmp_path / "out")]) == 0
  assert "1 adapted base leaves match" in capsys.readouterr().out
  with ocp.StandardCheckpointer() as checkpointer:
    merged = checkpointer.restore(tmp_path / "out")
  if which == "qbase":
    want = lj.merge(lp, config, dtype=jnp.float32)
  else:
    want = lj.merge(lj.LoraParams(params, lp.adapters), config)
  np.testing.assert_allclose(merged["params"]["kernel"], want["params"]["kernel"], **F32)
  np.testing.assert_array_equal(merged["params"]["bias"], params["params"]["bias"])
  # Another full-precision base does not quantize to the codes trained on: refused.
  other = jax.tree.map(lambda v: v + 0.05, params)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "other", other)
  with pytest.raises(lj.BaseMismatch, match="nf4 codes differ"):
    lj.merge_checkpoint(tmp_path / "other", tmp_path / "adapters", tmp_path / "out2")


def test_inspect_quantized_base(tmp_path, capsys):
  _saved_qlora(tmp_path)
  assert cli(["inspect", str(tmp_path / "qbase")]) == 0
  out = capsys.readouterr().out
  assert "params/kernel" in out and "nf4" in out and "(64, 128)" in out
  assert "1 quantized leaves, 8,192 parameters" in out and "1 other leaves, 512 bytes" in out


def test_int8_per_channel_follows_the_lora_input_axes():
  """A (in, heads, head_dim) kernel: with the config, one int8 scale per output channel
  (heads, head_dim), shared over the input axis (not per (in, head) row)."""
  model = nn.DenseGeneral((4, 32), name="query")
  x = jax.random.normal(jax.random.key(0), (2, 512))
  params = model.init(jax.random.key(1), x)
  config = lj.infer_axes(model.apply, params, x, config=lj.LoraConfig(rank=4,
                                                                       targets=r"kernel$"))
  plain = lj.quantize(params, targets=r"kernel$", kind="int8")["params"]["kernel"]
  q = lj.quantize(params, targets=r"kernel$", kind="int8", config=config)["params"]["kernel"]
  assert plain.absmax.shape == (512, 1, 32) and q.absmax.shape == (1, 4, 32)
  assert 8 * q.nbytes / q.size < 8.1 < 8 * plain.nbytes / plain.size
  w = params["params"]["kernel"]
  assert float(jnp.max(jnp.abs(q.dequantize() - w))) <= float(jnp.max(jnp.abs(w))) / 127
  lp = zoo.randomize(lj.lift({"params": {"kernel": q, "bias": params["params"]["bias"]}},
                             config, key=jax.random.key(2)))
  got = jax.jit(lj.wrap(model.apply, config))(lp, x)
  np.testing.assert_allclose(got, _reference(lp, config, model.apply, x), **F32)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("name", sorted(a.name for a in architectures()))
def test_architecture_zoo_on_a_quantized_base(name, kind):
  """The models users bring (Gemma-style bf16 einsums, Llama, ragged_dot MoE, depthwise
  ResNet, ViT), every LoRA target quantized: factored equals merged dequantized weights,
  values and gradients, with no fallback."""
  arch = next(a for a in architectures() if a.name == name)
  config = lj.infer_axes(arch.apply, arch.params, arch.x,
                         config=lj.LoraConfig(rank=arch.rank, targets=arch.targets))
  paths = [t.path for t in lj.plan(arch.params, config)]
  block = math.gcd(8, *(t.shape[-1] for t in lj.plan(arch.params, config)))
  base = lj.quantize(arch.params, targets=[f"^{re.escape(p)}$" for p in paths], kind=kind,
                     block_size=block if kind == "nf4" else None,
                     config=config if kind == "int8" else None)
  lp = zoo.randomize(lj.lift(base, config, key=jax.random.key(0)))
  factored = lj.wrap(arch.apply, config)
  merged = lj.wrap(arch.apply, config, mode="merge")
  loss = lambda apply: lambda lp, x: jnp.mean(jnp.sin(apply(lp, x).astype(jnp.float32)))  # noqa: E731
  with warnings.catch_warnings():
    warnings.simplefilter("error", lj.FallbackWarning)
    out = jax.jit(factored)(lp, arch.x)
    grads = jax.jit(jax.grad(loss(factored), allow_int=True))(lp, arch.x)
  want = jax.jit(merged)(lp, arch.x)
  top = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
  np.testing.assert_allclose(np.asarray(out, np.float32) / top,
                             np.asarray(want, np.float32) / top, atol=arch.tol)
  reference = jax.jit(jax.grad(loss(merged), allow_int=True))(lp, arch.x)
  for g, r in zip(jax.tree.leaves(grads.adapters), jax.tree.leaves(reference.adapters)):
    g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
    scale = float(np.max(np.abs(r))) + 1e-12
    np.testing.assert_allclose(g / scale, r / scale, atol=max(arch.tol, 1e-4) * 10)
