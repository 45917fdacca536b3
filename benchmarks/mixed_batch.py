"""Mixed-batch inference: every example with its own adapter, N adapters over one base.

The benchmark LM of train_step.py (d_model 512, 4 blocks, vocabulary 1024, sequence 128),
batch 64, LoRA r=8 on every kernel; N = 1, 4, 16, 64 stacked adapters (lj.stack_adapters),
each example with a random adapter. One jitted forward per approach:

  gather    lj.wrap(...)(LoraParams(base, stack), x, adapter_ids=ids): each example's
            factors gathered (the work of one adapter, whatever N is)
  one-hot   the same model with every adapted product computing x·A for all N adapters and
            keeping each example's by a one-hot mask (N times the adapter work; what JAX
            serving stacks do), emulated by swapping the per-example rule
  ragged    the same, with the examples sorted by adapter and jax.lax.ragged_dot over the
            groups (the SGMV form); on CPU, jax lowers ragged_dot densely (each group
            masked against every row; GPU and TPU get XLA's ragged dot)
  loop      for each of the N adapters, the whole batch with that adapter selected, keeping
            its examples' rows (N forward passes)

Reports the median time per batch over interleaved repeats and its ratio to gather at N = 1,
the stack's bytes and the temporary memory of the compiled gather forward.

Run: python benchmarks/mixed_batch.py [--repeats 5] [--sizes 1 4 16 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from train_step import RANK, SEQ, TARGETS, VOCAB, DecoderLM

import lora_jax as lj
import lora_jax._src.adapters.stack as stack_module

BATCH = 64


def _flat(x, a, b, x_contract):
  """x as (batch, rows, in), A as (N, in, r), B as (N, r, out)."""
  n, r = a.shape[0], a.shape[-1]
  k = a[0].size // r
  free = [d for d in range(x.ndim) if d not in x_contract]
  rows = jnp.transpose(x, free + list(x_contract)).reshape(x.shape[0], -1, k)
  return rows, a.reshape(n, k, r), b.reshape(n, r, -1)


def one_hot_product(x, w_product, a, b, ids, *, x_contract, ins, outs, path):
  """The one-hot alternative: x·A for every adapter, each example keeps its own."""
  del ins, outs, path
  rows, a, b = _flat(x, a, b, x_contract)
  hot = jax.nn.one_hot(ids, a.shape[0], dtype=jnp.float32)             # (batch, N)
  t = jnp.einsum("bmk,nkr->bmnr", rows, a) * hot[:, None, :, None]
  low = jnp.einsum("bmnr,nro->bmo", t, b)
  return (w_product + low.reshape(w_product.shape)).astype(w_product.dtype)


def ragged_product(x, w_product, a, b, ids, *, x_contract, ins, outs, path):
  """Examples grouped by adapter (ids sorted), one ragged_dot for x·A and one for ·B."""
  del ins, outs, path
  rows, a, b = _flat(x, a, b, x_contract)
  (batch, m, k), n = rows.shape, a.shape[0]
  order = jnp.argsort(ids)
  sel = jnp.clip(ids[order], 0, n - 1)
  sizes = jnp.bincount(sel, length=n).astype(jnp.int32) * m
  grouped = rows[order].reshape(batch * m, k)
  t = jax.lax.ragged_dot(grouped, a, sizes)
  t = t * jnp.repeat((ids[order] >= 0).astype(t.dtype), m)[:, None]
  low = jax.lax.ragged_dot(t, b, sizes).reshape(batch, m, -1)
  low = low[jnp.argsort(order)]
  return (w_product + low.reshape(w_product.shape)).astype(w_product.dtype)


def adapter(n: int, template):
  """``n`` random adapters shaped like ``template``."""
  def one(i):
    leaves, tree = jax.tree.flatten(template)
    keys = jax.random.split(jax.random.key(100 + i), len(leaves))
    return jax.tree.unflatten(tree, [0.01 * jax.random.normal(k, v.shape, v.dtype)
                                     for k, v in zip(keys, leaves)])
  return [one(i) for i in range(n)]


def measure(n, model, params, config, adapters, tokens, repeats):
  """Median seconds per batch of each approach with ``n`` stacked adapters."""
  stack, stack_config = lj.stack_adapters({f"a{i}": (a, config) for i, a in enumerate(adapters)})
  ids = jax.random.randint(jax.random.key(n), (BATCH,), 0, n)
  apply = lj.wrap(model.apply, stack_config)

  def compiled(rule):
    """The mixed forward compiled with ``rule`` as the per-example product (a new function
    each time: jit would otherwise reuse the first trace)."""
    def mixed(st, t, ids):
      return apply(lj.LoraParams(params, st), t, adapter_ids=ids)

    original = stack_module.mixed_product
    stack_module.mixed_product = rule
    try:
      return jax.jit(mixed).lower(stack, tokens, ids).compile()
    finally:
      stack_module.mixed_product = original

  gather = compiled(stack_module.mixed_product)
  one_hot = compiled(one_hot_product)
  ragged = compiled(ragged_product)
  single = jax.jit(lambda ad, t: apply(lj.LoraParams(params, ad), t))

  def loop():
    out = jnp.zeros((BATCH, SEQ, VOCAB), jnp.float32)
    for i in range(n):
      y = single(stack.select(jnp.int32(i)), tokens)
      out = jnp.where((ids == i)[:, None, None], y, out)
    return out

  fns = {"gather": lambda: gather(stack, tokens, ids),
         "one-hot": lambda: one_hot(stack, tokens, ids),
         "ragged": lambda: ragged(stack, tokens, ids), "loop": loop}
  reference = jax.block_until_ready(fns["gather"]())
  for name in ("one-hot", "ragged", "loop"):
    other = jax.block_until_ready(fns[name]())
    assert float(jnp.max(jnp.abs(other - reference))) < 1e-3 * float(
        jnp.max(jnp.abs(reference))), name
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)
  row = {name: statistics.median(v) for name, v in times.items()}
  row["stack_bytes"] = sum(x.nbytes for x in jax.tree.leaves(stack))
  row["temp_bytes"] = gather.memory_analysis().temp_size_in_bytes
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64])
  parser.add_argument("--json", default=None)
  args = parser.parse_args()

  model = DecoderLM()
  tokens = jax.random.randint(jax.random.key(0), (BATCH, SEQ), 0, VOCAB)
  params = jax.jit(model.init)(jax.random.key(0), tokens)
  config = lj.infer_axes(model.apply, params, jax.ShapeDtypeStruct(tokens.shape, tokens.dtype),
                         config=lj.LoraConfig(rank=RANK, alpha=2.0 * RANK, targets=TARGETS))
  template = lj.lift(params, config, key=jax.random.key(1)).adapters
  rows = {n: measure(n, model, params, config, adapter(n, template), tokens, args.repeats)
          for n in args.sizes}
  unit = rows[args.sizes[0]]["gather"]
  print(f"mixed-batch forward, benchmark LM, batch {BATCH}, r={RANK}; device "
        f"{jax.devices()[0].device_kind}; {args.repeats} interleaved repeats, medians; ratios "
        f"to gather at N={args.sizes[0]} ({1e3 * unit:.0f} ms)\n")
  print(f"{'N':>3} {'gather':>8} {'one-hot':>8} {'ragged':>8} {'loop':>8} {'stack MB':>9} "
        f"{'gather temp MB':>15}")
  for n, row in rows.items():
    print(f"{n:>3} {row['gather'] / unit:8.3f} {row['one-hot'] / unit:8.3f} "
          f"{row['ragged'] / unit:8.3f} {row['loop'] / unit:8.3f} "
          f"{row['stack_bytes'] / 2**20:9.2f} {row['temp_bytes'] / 2**20:15.1f}")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"unit_s": unit, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
