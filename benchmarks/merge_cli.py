"""Peak memory and wall time of `lora-jax merge` against a plain restore-then-save copy.

Builds a synthetic float32 base checkpoint (20 transformer layers, d=1536, MLP 6144: about
2.3 GB) with orbax's StandardCheckpointer, LoRA adapters (r=16 on every kernel), then runs,
each under `/usr/bin/time -v` in a fresh process:
  baseline  python importing jax and orbax-checkpoint (the runtime's own memory)
  copy      StandardCheckpointer().restore(BASE) then .save(OUT)  (holds the whole model)
  merge     lora-jax merge --base BASE --adapters ADAPTERS --out OUT
Targets: merge peak RSS <= 0.5 x checkpoint size + baseline RSS; merge wall <= 1.5 x copy.

Run: python benchmarks/merge_cli.py [--workdir DIR] [--layers 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

D, MLP, RANK = 1536, 6144, 16


def build(workdir: pathlib.Path, layers: int) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  import lora_jax as lj  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32) * 0.02  # noqa: E731
  params = {"params": {f"layer_{i}": {
      **{n: {"kernel": normal(D, D), "bias": np.zeros(D, np.float32)}
         for n in ("query", "key", "value", "out")},
      "mlp_in": {"kernel": normal(D, MLP)}, "mlp_out": {"kernel": normal(MLP, D)},
      "norm": {"scale": np.ones(D, np.float32)}} for i in range(layers)}}
  size = sum(x.nbytes for x in jax.tree.leaves(params))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(workdir / "base", params)
  checkpointer.wait_until_finished()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  config = lj.LoraConfig(rank=RANK, alpha=32.0, targets=r"kernel$")
  lp = lj.lift(abstract, config, key=jax.random.key(0))
  adapters = jax.tree.map(lambda s: normal(*s.shape), lp.adapters)  # B non-zero: real work
  # Saved with the base, so the merge also checks the base's fingerprint (lineage).
  lj.save_adapters(workdir / "adapters", lj.LoraParams(params, adapters), config)
  return size


def timed(command: list[str]) -> tuple[float, float]:
  """(wall seconds, peak RSS bytes) of a command under /usr/bin/time -v."""
  result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True,
                          check=False)
  if result.returncode != 0:
    raise RuntimeError(f"{command} failed:\n{result.stdout}\n{result.stderr}")
  rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)[1]) * 1024
  wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", result.stderr)[1]
  seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
  return seconds, rss


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--layers", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="lora_jax_merge_bench_"))
  size = build(workdir, args.layers)
  py = sys.executable
  commands = {
      "baseline": [py, "-c", "import jax, jax.numpy as jnp, orbax.checkpoint; jnp.ones(1)"],
      "copy": [py, "-c", "import sys, orbax.checkpoint as ocp; c = ocp.StandardCheckpointer(); "
               "t = c.restore(sys.argv[1]); c.save(sys.argv[2], t); c.wait_until_finished()",
               str(workdir / "base"), str(workdir / "copy")],
      "merge": [py, "-m", "lora_jax._src.cli", "merge", "--base", str(workdir / "base"),
                "--adapters", str(workdir / "adapters"), "--out", str(workdir / "merged")],
  }
  results = {name: [] for name in commands}
  for _ in range(args.repeats):  # interleaved
    for name, command in commands.items():
      for out in ("copy", "merged"):
        shutil.rmtree(workdir / out, ignore_errors=True)
      results[name].append(timed(command))
  med = {name: (float(np.median([w for w, _ in r])), float(np.median([m for _, m in r])))
         for name, r in results.items()}
  gib = 2 ** 30
  base_rss = med["baseline"][1]
  print(f"checkpoint: {size / gib:.2f} GiB float32, {args.layers} layers; "
        f"medians of {args.repeats} interleaved runs")
  print(f"{'run':9} {'wall s':>7} {'peak RSS GiB':>13} {'(RSS-baseline)/ckpt':>20}")
  for name, (wall, rss) in med.items():
    print(f"{name:9} {wall:7.1f} {rss / gib:13.2f} {(rss - base_rss) / size:20.3f}")
  merge_wall, merge_rss = med["merge"]
  print(f"\nmerge peak RSS = baseline + {(merge_rss - base_rss) / size:.3f} x checkpoint "
        f"(target <= 0.5); merge wall / copy wall = {merge_wall / med['copy'][0]:.2f} "
        "(target <= 1.5)")
  shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  main()
