"""Time and peak memory of combining adapters by SVD: lj.combine vs forming ΔW and its SVD.

8 adapters of rank 16 on one 4096 x 4096 float32 kernel, weights 1/8 each, reduced to rank
16. Each method runs in a fresh process under `/usr/bin/time -v`:
  baseline   python importing jax, numpy and lora_jax
  combine    lj.combine(..., method="svd", rank=16): QR of the stacked factors and an SVD of
             the 128 x 128 core (no 4096 x 4096 matrix)
  dense      ΔW = Σ wᵢ·sᵢ·Aᵢ·Bᵢ formed in float32, numpy's full SVD, truncated to rank 16
The two results are compared (relative difference of the rank-16 products).

Run: python benchmarks/combine.py [--size 4096] [--adapters 8] [--rank 16]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

_CHILD = r"""
import json, sys, time
import numpy as np
import jax, jax.numpy as jnp
import lora_jax as lj
size, n, rank, method = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = np.random.default_rng(0)
config = lj.LoraConfig(rank=rank, alpha=2.0 * rank)
inputs = {f"a{i}": ({"w": {"a": jnp.asarray(rng.standard_normal((size, rank), np.float32)),
                           "b": jnp.asarray(rng.standard_normal((rank, size), np.float32))}},
                    config) for i in range(n)}
weights = dict.fromkeys(inputs, 1.0 / n)
jax.block_until_ready(inputs)
if method == "baseline":
  print(json.dumps({"seconds": 0.0})); sys.exit()
start = time.perf_counter()
if method == "combine":
  out, cfg = lj.combine(inputs, weights, method="svd", rank=rank)
  a, b = np.asarray(out["w"]["a"]), np.asarray(out["w"]["b"])
else:
  s = config.scale_for("w")
  delta = sum(w * s * (np.asarray(e["w"]["a"]) @ np.asarray(e["w"]["b"]))
              for (e, _), w in zip(inputs.values(), weights.values()))
  u, sv, vt = np.linalg.svd(delta, full_matrices=False)
  a, b = u[:, :rank] * sv[:rank], vt[:rank]
seconds = time.perf_counter() - start
probe = rng.standard_normal((4, size), np.float32)
np.save(sys.argv[5], probe @ a @ b)
print(json.dumps({"seconds": seconds}))
"""


def run(args: list[str]) -> tuple[float, float]:
  result = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", _CHILD, *args],
                          capture_output=True, text=True, check=False)
  if result.returncode != 0:
    raise RuntimeError(result.stderr[-2000:])
  rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)[1]) * 1024
  return json.loads(result.stdout.strip().splitlines()[-1])["seconds"], rss


def main():
  import tempfile  # pylint: disable=import-outside-toplevel

  import numpy as np  # pylint: disable=import-outside-toplevel

  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=4096)
  parser.add_argument("--adapters", type=int, default=8)
  parser.add_argument("--rank", type=int, default=16)
  args = parser.parse_args()
  folder = tempfile.mkdtemp(prefix="lora_jax_combine_")
  common = [str(args.size), str(args.adapters), str(args.rank)]
  results = {m: run([*common, m, f"{folder}/{m}.npy"]) for m in ("baseline", "combine", "dense")}
  base = results["baseline"][1]
  print(f"{args.adapters} adapters of rank {args.rank} on a {args.size} x {args.size} float32 "
        f"kernel, combined by SVD to rank {args.rank}")
  print(f"{'method':9} {'seconds':>8} {'peak RSS MiB':>13} {'RSS - baseline MiB':>19}")
  for name, (seconds, rss) in results.items():
    print(f"{name:9} {seconds:8.3f} {rss / 2**20:13.0f} {(rss - base) / 2**20:19.0f}")
  ours, dense = (np.load(f"{folder}/{m}.npy") for m in ("combine", "dense"))
  print(f"\nrelative difference of the results: "
        f"{np.abs(ours - dense).max() / np.abs(dense).max():.2e}; combine takes "
        f"{results['combine'][0] / results['dense'][0]:.4f}x the time and "
        f"{(results['combine'][1] - base) / max(results['dense'][1] - base, 1):.3f}x the memory "
        "above the baseline")


if __name__ == "__main__":
  main()
