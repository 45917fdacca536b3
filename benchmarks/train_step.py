"""Training-step cost of LoRA variants on fixed models, as ratios to the frozen floor.

Models (--model, default lm; float32; LoRA r=8 unless noted):
  lm     decoder LM, vocabulary 1024, d_model 512, 8 heads (Flax SelfAttention, DenseGeneral
         kernels), 4 blocks with a 2048-wide GELU MLP, LayerNorm, sequence 128, batch 8;
         LoRA on query, key, value, out, both MLP kernels and the LM head
  gemma  Gemma-style decoder (DeepMind gemma's einsum layouts: q_einsum (heads, embed,
         head_dim), kv_einsum (2, kv_heads, embed, head_dim), attn_vec_einsum, gated MLP
         gating_einsum (2, hidden, embed) and linear), GQA 8/2 heads, RMSNorm, d_model 512,
         4 blocks, MLP 2048, sequence 128, batch 8; LoRA on every einsum kernel, axes from
         lora_jax.infer_axes
  moe    decoder whose MLPs are top-1 mixture-of-experts (8 experts, 512 -> 1024 -> 512)
         through jax.lax.ragged_dot, 4 blocks of attention + MoE, sequence 128, batch 8;
         LoRA on attention kernels and on every expert (per-expert adapters)
  conv   3-layer ConvNet, 3x3 convolutions, 64 channels, input 16x24x24x16, r=4
  tunix-llama3, tunix-qwen3, tunix-gemma3
         Tunix's own models (pip install "lora_jax[models]"), d_model 512, GQA 8/2 heads,
         MLP 2048, 4 layers, vocabulary 1024, sequence 128, batch 8; LoRA on every attention
         and MLP projection; qwix through qwix.apply_lora_to_model, as Tunix applies it

Variants, each a jitted step (loss, gradient, Adam update of what it trains):
  floor     gradient for biases and LayerNorm parameters only (forward + input-gradient backward)
  full      full fine-tuning (gradient for every parameter)
  merge     lora_jax, mode="merge" (W + s*A*B formed inside the step)
  factored  lora_jax, default factored mode
  qwix      qwix.LoraProvider on the same model and targets (skipped if qwix is not
            installed; where qwix fails on a model, the reason is printed)
  with --dora, also:
  dora-merge   DoRA (use_dora=True) by forming each weight m * V / ||V|| inside the step
  dora         DoRA, factored (norms from the factors; see lora_jax/_src/numerics/dora.py)
  and the ratios of factored DoRA to factored LoRA.

Reports medians over interleaved repeats of wall time, XLA cost-analysis FLOPs and XLA
temporary memory, all as ratios to the floor, plus compile time (trace + lower + compile from
empty caches, every variant in turn, median of --compile-repeats) and forward-only inference
time (factored vs merged weights).

Run: python benchmarks/train_step.py [--model lm|gemma|moe|conv|tunix-llama3|tunix-qwen3|
                                            tunix-gemma3] [--repeats 7] [--compile-repeats 3]
                                    [--dora] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lora_jax as lj

VOCAB, D, HEADS, LAYERS, MLP, SEQ, BATCH, RANK = 1024, 512, 8, 4, 2048, 128, 8, 8
TARGETS = r"(query|key|value|out|mlp_in|mlp_out|lm_head)/kernel$"
QWIX_MODULES = r".*(query|key|value|out|mlp_in|mlp_out|lm_head)$"


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, mask):
    x = x + nn.SelfAttention(num_heads=HEADS, name="attn")(nn.LayerNorm()(x), mask=mask)
    h = nn.gelu(nn.Dense(MLP, name="mlp_in")(nn.LayerNorm()(x)))
    return x + nn.Dense(D, name="mlp_out")(h)


class DecoderLM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D)(tokens)
    x = x + self.param("pos", nn.initializers.normal(0.02), (SEQ, D))
    mask = nn.make_causal_mask(tokens)
    for i in range(LAYERS):
      x = Block(name=f"block_{i}")(x, mask)
    return nn.Dense(VOCAB, name="lm_head")(nn.LayerNorm()(x))


class RMSNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros, (x.shape[-1],))
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * (1 + scale)


def _w(module, name, shape, fan_in):
  return module.param(name, nn.initializers.normal(fan_in ** -0.5), shape)


class EinsumAttention(nn.Module):
  """Gemma's attention layouts: the input axis sits inside the q and kv kernels."""

  heads: int = HEADS
  kv_heads: int = 2

  @nn.compact
  def __call__(self, x, mask):
    dh = D // self.heads
    q = jnp.einsum("BTD,NDH->BTNH", x,
                   _w(self, "q_einsum", (self.heads, D, dh), D))
    k, v = jnp.einsum("BSD,CKDH->CBSKH", x,
                      _w(self, "kv_einsum", (2, self.kv_heads, D, dh), D))
    k, v = (jnp.repeat(t, self.heads // self.kv_heads, axis=2) for t in (k, v))
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) * dh ** -0.5
    logits = jnp.where(mask, logits, -1e9)
    mix = jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(logits, -1), v)
    return jnp.einsum("BTNH,NHD->BTD", mix, _w(self, "attn_vec_einsum", (self.heads, dh, D), D))


class GatedMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    gate, up = jnp.einsum("BTD,CFD->CBTF", x, _w(self, "gating_einsum", (2, MLP, D), D))
    return jnp.einsum("BTF,FD->BTD", jax.nn.gelu(gate) * up, _w(self, "linear", (MLP, D), MLP))


EXPERTS, EXPERT_MLP = 8, 1024


class MoE(nn.Module):
  """Top-1 routing; tokens sorted by expert and run through ragged_dot."""

  @nn.compact
  def __call__(self, x):
    shape = x.shape
    x = x.reshape(-1, D)
    router = nn.Dense(EXPERTS, use_bias=False, name="router")(x)
    expert = jnp.argmax(router, -1)
    gate = jnp.take_along_axis(jax.nn.softmax(router, -1), expert[:, None], -1)
    order = jnp.argsort(expert)
    sizes = jnp.bincount(expert, length=EXPERTS).astype(jnp.int32)
    xs = x[order]
    h = jax.nn.gelu(jax.lax.ragged_dot(xs, _w(self, "w_in", (EXPERTS, D, EXPERT_MLP), D), sizes))
    ys = jax.lax.ragged_dot(h, _w(self, "w_out", (EXPERTS, EXPERT_MLP, D), EXPERT_MLP), sizes)
    y = jnp.zeros_like(ys).at[order].set(ys)
    return (y * gate).reshape(shape)


class EinsumLM(nn.Module):
  moe: bool = False

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D)(tokens)
    mask = nn.make_causal_mask(tokens)
    for i in range(LAYERS):
      x = x + EinsumAttention(name=f"block_{i}_attn")(RMSNorm(name=f"block_{i}_norm1")(x), mask)
      mlp = MoE(name=f"block_{i}_moe") if self.moe else GatedMLP(name=f"block_{i}_mlp")
      x = x + mlp(RMSNorm(name=f"block_{i}_norm2")(x))
    return nn.Dense(VOCAB, name="lm_head")(RMSNorm(name="final_norm")(x))


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(3):
      x = jax.nn.relu(nn.Conv(64, (3, 3), name=f"conv{i}")(x))
    return x


def lm_loss(logits, tokens):
  logp = jax.nn.log_softmax(logits[:, :-1])
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def split(tree, predicate):
  """(trainable {path: leaf}, frozen {path: leaf}) and a function joining them back."""
  leaves, treedef = jax.tree.flatten(tree)
  names = lj.paths(tree)
  train = {n: x for n, x in zip(names, leaves) if predicate(n)}
  frozen = {n: x for n, x in zip(names, leaves) if not predicate(n)}

  def join(train, frozen):
    return jax.tree.unflatten(treedef, [train[n] if n in train else frozen[n] for n in names])

  return train, frozen, join


class Spec(NamedTuple):
  model: nn.Module
  batch: jax.Array
  loss: Any            # loss(output, batch) -> scalar
  targets: str
  rank: int
  qwix_modules: str       # qwix LoraRule.module_path for the same targets
  floor: Any = None       # which leaves the floor trains (default: biases and scales)


def lm_spec(model: nn.Module, targets: str, qwix_modules: str) -> Spec:
  tokens = jax.random.randint(jax.random.key(0), (BATCH, SEQ), 0, VOCAB)
  return Spec(model, tokens, lm_loss, targets, RANK, qwix_modules)


MODELS = {
    "lm": lambda: lm_spec(DecoderLM(), TARGETS, QWIX_MODULES),
    "gemma": lambda: lm_spec(EinsumLM(), r"(einsum|linear)$|lm_head/kernel$",
                             r".*block_\d+_(attn|mlp)$|.*lm_head$"),
    "moe": lambda: lm_spec(EinsumLM(moe=True), r"einsum$|w_(in|out)$|lm_head/kernel$",
                           r".*block_\d+_(attn|moe)$|.*lm_head$"),
    "conv": lambda: Spec(ConvNet(), jax.random.normal(jax.random.key(0), (16, 24, 24, 16)),
                         lambda out, x: jnp.mean(out ** 2), r"kernel$", 4, r".*conv\d$"),
}


def _tunix(family: str) -> Spec:
  import tunix_models  # pylint: disable=import-outside-toplevel
  model = tunix_models.TunixModel(family)
  tokens = jax.random.randint(jax.random.key(0), (tunix_models.BATCH, tunix_models.SEQ), 0,
                              tunix_models.VOCAB)
  return Spec(model, tokens, lm_loss, tunix_models.TARGETS, RANK, "", tunix_models.is_floor)


for _family in ("llama3", "qwen3", "gemma3"):
  MODELS[f"tunix-{_family}"] = (lambda f: lambda: _tunix(f))(_family)


def joined_loss(apply_fn, join, loss):
  """loss(trainable, frozen, batch) for a model applied to the joined parameter tree."""
  return lambda t, f, x: loss(apply_fn(join(t, f), x), x)


def make_step(loss_fn, tx):
  """loss_fn(trainable, frozen, batch) -> scalar; returns the jitted training step."""

  def step(trainable, frozen, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 2))


def variants(spec: Spec, params, dora: bool = False):
  model = spec.model
  tx = optax.adam(1e-4)
  out = {}

  is_floor = spec.floor or (lambda n: n.endswith("/bias") or n.endswith("/scale"))  # noqa: E731
  train, frozen, join = split(params, is_floor)
  out["floor"] = (make_step(joined_loss(model.apply, join, spec.loss), tx), train, frozen)

  train, frozen, join = split(params, lambda n: True)
  out["full"] = (make_step(joined_loss(model.apply, join, spec.loss), tx), train, frozen)

  config = lj.LoraConfig(rank=spec.rank, alpha=2.0 * spec.rank, targets=spec.targets)
  # The axes of every target, read from the model (standard LoRA shapes for any layout).
  config = lj.infer_axes(model.apply, params, jax.ShapeDtypeStruct(spec.batch.shape,
                                                                   spec.batch.dtype),
                         config=config)
  lp = lj.lift(params, config, key=jax.random.key(1))
  join = lambda adapters, base: lj.LoraParams(base, adapters)  # noqa: E731
  for mode in ("merge", "factored"):
    apply = lj.wrap(model.apply, config, mode=mode)
    out[mode] = (make_step(joined_loss(apply, join, spec.loss), tx), lp.adapters, lp.base)
  if dora:
    dora_config = lj.LoraConfig(**{**config.to_dict(), "use_dora": True})
    dora_lp = lj.lift(params, dora_config, key=jax.random.key(1))
    for mode, name in (("merge", "dora-merge"), ("factored", "dora")):
      apply = lj.wrap(model.apply, dora_config, mode=mode)
      out[name] = (make_step(joined_loss(apply, join, spec.loss), tx), dora_lp.adapters,
                   dora_lp.base)

  try:
    import qwix  # pylint: disable=import-outside-toplevel
  except ImportError:
    print("qwix not installed: skipping it (pip install qwix)")
  else:
    if hasattr(model, "qwix_variant"):  # an NNX model (Tunix): qwix's NNX path
      out["qwix"] = model.qwix_variant(params, spec.rank, make_step, spec.loss)
      return out, lp, config
    rule = qwix.LoraRule(module_path=spec.qwix_modules, rank=spec.rank, alpha=2.0 * spec.rank)
    qmodel = qwix.apply_lora_to_model(model, qwix.LoraProvider([rule]))
    try:
      qparams = jax.jit(qmodel.init)(jax.random.key(0), spec.batch)
    except Exception as e:  # report why qwix cannot run this model, and go on
      print(f"qwix {getattr(qwix, '__version__', '')} fails on this model: "
            f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
      return out, lp, config
    is_lora = lambda n: "lora_" in n  # noqa: E731
    train, frozen, join = split(qparams, is_lora)
    out["qwix"] = (make_step(joined_loss(qmodel.apply, join, spec.loss), tx), train, frozen)
  return out, lp, config


def _stats(compiled, compile_s):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  return {"flops": float(cost["flops"]), "temp_bytes": int(memory.temp_size_in_bytes),
          "compile_s": compile_s}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", choices=sorted(MODELS), default="lm")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--compile-repeats", type=int, default=3,
                      help="compiles per variant from empty caches (median reported)")
  parser.add_argument("--dora", action="store_true", help="also DoRA, merged and factored")
  parser.add_argument("--json", default=None, help="also write the results here")
  args = parser.parse_args()

  spec = MODELS[args.model]()
  tokens = spec.batch
  params = jax.jit(spec.model.init)(jax.random.key(0), tokens)
  steps, lp, config = variants(spec, params, dora=args.dora)
  tx = optax.adam(1e-4)

  # Compile time: every variant traced, lowered and compiled from empty caches (what a fresh
  # process pays), in rotating order, median of --compile-repeats; a single compile is noise.
  stats, compiled, failed = {}, {}, set()
  order = list(steps)
  compile_times = {name: [] for name in steps}
  opt_states = {name: tx.init(entry[1]) for name, entry in steps.items()
                if isinstance(entry, tuple)}
  for repeat in range(max(1, args.compile_repeats)):
    shift = repeat % len(order)
    for name in order[shift:] + order[:shift]:
      if name in failed:
        continue
      entry = steps[name]
      jax.clear_caches()
      t0 = time.perf_counter()
      if not isinstance(entry, tuple):  # an NNX runner (qwix on a Tunix model): owns its state
        try:
          compiled[name] = entry.lower(tokens).compile()
        except Exception as e:  # report why qwix cannot train this model, and go on
          print(f"{name} fails on this model: {type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}")
          failed.add(name)
          continue
      else:
        step, trainable, frozen = entry
        compiled[name] = step.lower(trainable, frozen, opt_states[name], tokens).compile()
      compile_times[name].append(time.perf_counter() - t0)
  for name, c in compiled.items():
    stats[name] = _stats(c, statistics.median(compile_times[name]))

  state = {}
  for name, entry in steps.items():
    if name in failed:
      continue
    if not isinstance(entry, tuple):
      jax.block_until_ready(entry(tokens))  # warm up
      state[name] = entry
      continue
    step, trainable, frozen = entry
    trainable = jax.tree.map(jnp.copy, trainable)  # the step donates it; variants share leaves
    opt_state = tx.init(trainable)
    trainable, opt_state, loss = step(trainable, frozen, opt_state, tokens)  # warm up
    jax.block_until_ready(loss)
    state[name] = [step, trainable, frozen, opt_state]

  times = {name: [] for name in state}
  for _ in range(args.repeats):  # interleaved, so machine noise hits every variant alike
    for name, entry in state.items():
      if not isinstance(entry, list):
        t0 = time.perf_counter()
        jax.block_until_ready(entry(tokens))
        times[name].append(time.perf_counter() - t0)
        continue
      step, trainable, frozen, opt_state = entry
      t0 = time.perf_counter()
      trainable, opt_state, loss = step(trainable, frozen, opt_state, tokens)
      jax.block_until_ready((trainable, loss))
      times[name].append(time.perf_counter() - t0)
      entry[1], entry[3] = trainable, opt_state

  # Forward-only inference: factored adapters vs the merged weights.
  model = spec.model
  lp = lj.LoraParams(lp.base, jax.tree.map(lambda x: x + 0.01, lp.adapters))
  forward_factored = jax.jit(lj.wrap(model.apply, config))
  merged = lj.merge(lp, config)
  forward_merged = jax.jit(model.apply)
  jax.block_until_ready((forward_factored(lp, tokens), forward_merged(merged, tokens)))
  fwd = {"factored": [], "merged": []}
  for _ in range(args.repeats):
    for name, fn, p in (("factored", forward_factored, lp), ("merged", forward_merged, merged)):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(p, tokens))
      fwd[name].append(time.perf_counter() - t0)

  floor = stats["floor"]
  floor_wall = statistics.median(times["floor"])
  results = {"model": args.model, "device": str(jax.devices()[0].device_kind),
             "repeats": args.repeats, "variants": {}}
  print(f"model: {args.model}; device: {results['device']}, {args.repeats} interleaved repeats, "
        "medians\n")
  print(f"{'variant':10} {'wall ms':>9} {'wall/floor':>10} {'FLOPs/floor':>11} "
        f"{'temp mem/floor':>14} {'compile s':>9}")
  for name in state:
    wall = statistics.median(times[name])
    row = {"wall_ms": 1e3 * wall, "wall_ratio": wall / floor_wall,
           "flops_ratio": stats[name]["flops"] / floor["flops"],
           "temp_ratio": stats[name]["temp_bytes"] / floor["temp_bytes"],
           "compile_s": stats[name]["compile_s"], "flops": stats[name]["flops"],
           "temp_bytes": stats[name]["temp_bytes"]}
    results["variants"][name] = row
    print(f"{name:10} {row['wall_ms']:9.1f} {row['wall_ratio']:10.3f} {row['flops_ratio']:11.3f} "
          f"{row['temp_ratio']:14.3f} {row['compile_s']:9.2f}")
  if args.dora:
    lora, dora = results["variants"]["factored"], results["variants"]["dora"]
    results["dora_over_lora"] = {k: dora[k] / lora[k] for k in ("wall_ms", "flops", "temp_bytes")}
    print("\nfactored DoRA / factored LoRA: wall {wall_ms:.3f}, FLOPs {flops:.3f}, temp memory "
          "{temp_bytes:.3f}".format(**results["dora_over_lora"]))
  ratio = statistics.median(fwd["factored"]) / statistics.median(fwd["merged"])
  results["forward_factored_over_merged"] = ratio
  print(f"\nforward-only inference, factored / merged weights: {ratio:.3f}")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
