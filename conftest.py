"""Test setup: 8 fake CPU devices and strict dtype promotion, set before JAX starts."""

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "tests"))

from host_devices import set_host_devices  # noqa: E402  (tests/host_devices.py)

# The 8 fake devices share 2 cores: raise XLA:CPU's 40 s collective timeout (where this XLA
# has the flags) so a lagging device thread is waited for instead of aborting the process.
set_host_devices(8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# XLA's persistent compilation cache (JAX's own, keyed by the program, the jax/jaxlib versions,
# the backend and the XLA flags): a later run compiles only what changed. The test processes
# and the processes they start use separate folders, so that none reads an entry another is
# still writing (JAX writes entries in place) or one a killed child left half written.
# LORA_JAX_TEST_XLA_CACHE=off disables it; a path moves it (default ~/.cache/lora_jax-tests).
_cache = os.environ.get("LORA_JAX_TEST_XLA_CACHE", "")
if _cache != "off":
  _root = pathlib.Path(_cache or pathlib.Path(os.environ.get(
      "XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "lora_jax-tests")
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_root / "xla"))
  os.environ.setdefault("LORA_JAX_TEST_CHILD_XLA_CACHE", str(_root / "xla-children"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
# JAX read its environment when lora_jax imported it, above: set this process's cache here.
if "JAX_COMPILATION_CACHE_DIR" in os.environ:
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


@pytest.fixture
def key():
  return jax.random.key(0)
