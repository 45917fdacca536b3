"""Test setup: 8 fake CPU devices and strict dtype promotion, set before JAX starts."""

import os

from lora_jax._src.host_devices import set_host_devices

# The 8 fake devices share 2 cores: raise XLA:CPU's 40 s collective timeout (where this XLA
# has the flags) so a lagging device thread is waited for instead of aborting the process.
set_host_devices(8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def key():
  return jax.random.key(0)
