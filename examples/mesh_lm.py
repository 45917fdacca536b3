"""Data parallel + FSDP on a mesh: the character LM on 2 x 4 devices (8 fake CPU devices here).

The base is sharded (FSDP over "data" on each kernel's first axis, "model" on its last), the
adapters follow the base's shardings, and batches are sharded over "data".
Run: python examples/mesh_lm.py [key=value ...]   (config: configs/charlm_mesh.yaml)
"""

import os
import pathlib
import sys

# Must be set before JAX starts: 8 host devices stand in for accelerators on a CPU machine.
# They share the machine's cores; on a machine with few cores, one device can lag another by more
# than XLA:CPU's default 40 s collective timeout: add
# --xla_cpu_collective_call_terminate_timeout_seconds=1200 to XLA_FLAGS where your XLA knows it.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import lora_jax as lj  # noqa: E402

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "charlm_mesh.yaml"

if __name__ == "__main__":
  lj.run_job(CONFIG, sys.argv[1:])
