"""Data parallel + FSDP on a mesh: the character LM on 2 x 4 devices (8 fake CPU devices here).

The base is sharded (FSDP over "data" on each kernel's first axis, "model" on its last), the
adapters follow the base's shardings, and batches are sharded over "data".
Run: python examples/mesh_lm.py [key=value ...]   (config: configs/charlm_mesh.yaml)
"""

import os
import pathlib
import sys

from lora_jax._src.host_devices import host_device_flags

# Must be set before JAX starts: 8 host devices stand in for accelerators on a CPU machine.
# They share the machine's cores, so one device can lag another by more than XLA:CPU's default
# 40 s collective timeout on a 2-core machine; the flags raise it where this XLA has the flags.
if "XLA_FLAGS" not in os.environ:
  os.environ["XLA_FLAGS"] = host_device_flags(8)

import lora_jax as lj  # noqa: E402

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "charlm_mesh.yaml"

if __name__ == "__main__":
  lj.run_job(CONFIG, sys.argv[1:])
