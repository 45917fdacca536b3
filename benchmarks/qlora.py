"""QLoRA: a training step over an NF4 / int8 base against the float32 and bf16 bases.

The benchmark LM of train_step.py (d_model 512, 4 blocks, vocabulary 1024, sequence 128,
batch 8; LoRA r=8 on query, key, value, out, both MLP kernels and the LM head), one jitted
factored step each (loss, adapter gradient, Adam update; the base frozen), with the base:

  float32   as initialized
  bf16      every leaf cast to bfloat16
  nf4       lj.quantize(kernels and the embedding, "nf4"): blocks of 64, double quantization
  nf4-nodq  the same without double quantization
  int8      lj.quantize(same leaves, "int8", config=config): one scale per output channel

Reports the base's stored bytes and bits per quantized parameter, then medians over
interleaved repeats of wall time, XLA cost-analysis FLOPs, XLA temporary memory and the
step's argument memory, as ratios to the float32 base's step.

Run: python benchmarks/qlora.py [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from train_step import BATCH, RANK, SEQ, TARGETS, VOCAB, DecoderLM, joined_loss, lm_loss, make_step

import lora_jax as lj

QUANTIZED = r"(kernel|embedding)$"


def base_bytes(tree) -> int:
  quantized = lambda x: isinstance(x, lj.QuantizedArray)  # noqa: E731
  return sum(leaf.nbytes for leaf in jax.tree.leaves(tree, is_leaf=quantized))


def bases(params, config):
  return {
      "float32": params,
      "bf16": jax.tree.map(lambda x: x.astype(jnp.bfloat16), params),
      "nf4": lj.quantize(params, targets=QUANTIZED, kind="nf4"),
      "nf4-nodq": lj.quantize(params, targets=QUANTIZED, kind="nf4", double_quant=False),
      "int8": lj.quantize(params, targets=QUANTIZED, kind="int8", config=config),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--json", default=None, help="also write the results here")
  args = parser.parse_args()

  model = DecoderLM()
  tokens = jax.random.randint(jax.random.key(0), (BATCH, SEQ), 0, VOCAB)
  params = jax.jit(model.init)(jax.random.key(0), tokens)
  config = lj.LoraConfig(rank=RANK, alpha=2.0 * RANK, targets=TARGETS)
  config = lj.infer_axes(model.apply, params, jax.ShapeDtypeStruct(tokens.shape, tokens.dtype),
                         config=config)
  tx = optax.adam(1e-4)
  join = lambda adapters, base: lj.LoraParams(base, adapters)  # noqa: E731
  step = make_step(joined_loss(lj.wrap(model.apply, config), join, lm_loss), tx)

  state, stats = {}, {}
  for name, base in bases(params, config).items():
    lp = lj.lift(base, config, key=jax.random.key(1))
    adapters = jax.tree.map(jnp.copy, lp.adapters)
    opt_state = tx.init(adapters)
    compiled = step.lower(adapters, lp.base, opt_state, tokens).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    memory = compiled.memory_analysis()
    s = lj.summary(lp, config)
    stats[name] = {"flops": float(cost["flops"]), "temp_bytes": int(memory.temp_size_in_bytes),
                   "argument_bytes": int(memory.argument_size_in_bytes),
                   "base_bytes": base_bytes(lp.base),
                   "bits_per_quantized_param": (8 * s.quantized_bytes / s.quantized_params
                                                if s.quantized_params else None)}
    adapters, opt_state, loss = step(adapters, lp.base, opt_state, tokens)  # warm up
    jax.block_until_ready(loss)
    state[name] = [adapters, lp.base, opt_state]
    stats[name]["first_loss"] = float(loss)

  times = {name: [] for name in state}
  for _ in range(args.repeats):  # interleaved, so machine noise hits every base alike
    for name, entry in state.items():
      adapters, base, opt_state = entry
      t0 = time.perf_counter()
      adapters, opt_state, loss = step(adapters, base, opt_state, tokens)
      jax.block_until_ready((adapters, loss))
      times[name].append(time.perf_counter() - t0)
      entry[0], entry[2] = adapters, opt_state

  ref, ref_wall = stats["float32"], statistics.median(times["float32"])
  results = {"device": str(jax.devices()[0].device_kind), "repeats": args.repeats,
             "quantized_leaves": QUANTIZED, "bases": {}}
  print(f"benchmark LM, LoRA r={RANK}, factored step; device: {results['device']}, "
        f"{args.repeats} interleaved repeats, medians; ratios to the float32 base\n")
  print(f"{'base':9} {'base MB':>8} {'base/f32':>8} {'bits/q':>7} {'wall ms':>8} {'wall':>6} "
        f"{'FLOPs':>6} {'temp':>6} {'args':>6} {'loss':>7}")
  for name in state:
    st, wall = stats[name], statistics.median(times[name])
    row = {**st, "wall_ms": 1e3 * wall, "wall_ratio": wall / ref_wall,
           "base_ratio": st["base_bytes"] / ref["base_bytes"],
           "flops_ratio": st["flops"] / ref["flops"],
           "temp_ratio": st["temp_bytes"] / ref["temp_bytes"],
           "argument_ratio": st["argument_bytes"] / ref["argument_bytes"]}
    results["bases"][name] = row
    bits = row["bits_per_quantized_param"]
    print(f"{name:9} {row['base_bytes'] / 1e6:8.2f} {row['base_ratio']:8.3f} "
          f"{'' if bits is None else f'{bits:.3f}':>7} {row['wall_ms']:8.1f} "
          f"{row['wall_ratio']:6.3f} {row['flops_ratio']:6.3f} {row['temp_ratio']:6.3f} "
          f"{row['argument_ratio']:6.3f} {row['first_loss']:7.4f}")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
