"""Test setup: 8 fake CPU devices and strict dtype promotion, set before JAX starts."""

import os

# The 8 fake devices share 2 cores: raise XLA:CPU's 40 s collective timeout so a lagging
# device thread is waited for instead of aborting the process.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_cpu_collective_call_terminate_timeout_seconds=1200"
    " --xla_cpu_collective_timeout_seconds=1200").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def key():
  return jax.random.key(0)
