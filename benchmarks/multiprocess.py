"""Step time of one LoRA training job as 2 processes x 4 CPU devices vs 1 process x 8.

Runs tests/multiprocess_job.py (a 2 x 4 mesh: FSDP over "data", tensor parallelism over
"model"; a two-layer model with sharded adapters) for --steps steps without checkpoints, once
as one process with 8 CPU devices and once as two processes with 4 each (jax.distributed on
127.0.0.1, gloo collectives), and reports each run's median step time (after 2 compiling
steps) and their ratio. On one machine the two processes share its cores, and their
collectives go through gloo's TCP instead of memory: the ratio shows that overhead, not a
pod's.

Run: python benchmarks/multiprocess.py [--steps 200]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import socket
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "multiprocess_job.py"


def _env() -> dict[str, str]:
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
  env.pop("XLA_FLAGS", None)
  return env


def _step_ms(output: str) -> float:
  found = re.search(r"step_ms ([0-9.]+)", output)
  if found is None:
    raise RuntimeError(output[-3000:])
  return float(found[1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=200)
  args = parser.parse_args()
  folder = pathlib.Path(tempfile.mkdtemp(prefix="lora_jax_mp_bench_"))
  common = [str(args.steps), str(10 ** 9)]  # no checkpoints
  one = subprocess.run([sys.executable, str(JOB), "0", "1", "0", str(folder / "one"),
                        str(folder / "one.npz"), *common], env=_env(), capture_output=True,
                       text=True, check=False, timeout=1200)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  procs = [subprocess.Popen([sys.executable, str(JOB), str(i), "2", port, str(folder / "two"),
                             str(folder / "two.npz"), *common], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in (0, 1)]
  outputs = [p.communicate(timeout=1200)[0] for p in procs]
  single, multi = _step_ms(one.stdout + one.stderr), _step_ms(outputs[0])
  print(f"{args.steps} steps, median step time: 1 process x 8 devices {single:.2f} ms, "
        f"2 processes x 4 devices {multi:.2f} ms; ratio {multi / single:.2f}")


if __name__ == "__main__":
  main()
