"""Test setup: 8 fake CPU devices and strict dtype promotion, set before JAX starts."""

import gc
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
# still writing or one a killed child left half written. pytest-xdist's workers (-n) share
# one folder where JAX can lock it (the filelock package; JAX locks its cache only when it has
# a size limit, so one is set), else each worker has its own; each worker's children have
# their own. LORA_JAX_TEST_XLA_CACHE=off disables it; a path moves it (default
# ~/.cache/lora_jax-tests).
_cache = os.environ.get("LORA_JAX_TEST_XLA_CACHE", "")
_worker = os.environ.get("PYTEST_XDIST_WORKER")
_LOCKED_CACHE_BYTES = 32 << 30
if _cache != "off":
  try:
    import filelock  # noqa: F401
    _shared = True
  except ImportError:
    _shared = False
  _root = pathlib.Path(_cache or pathlib.Path(os.environ.get(
      "XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "lora_jax-tests")
  # A locked cache keeps access times beside its entries, so it has a folder of its own.
  _tests = (_root / "xla" if _worker is None else _root / "xla-locked" if _shared
            else _root / "xla" / _worker)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_tests)
  os.environ["LORA_JAX_TEST_CHILD_XLA_CACHE"] = str(_root / "xla-children" / (_worker or "main"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
# Also through jax.config: a plugin may have imported JAX before this file set the environment.
if _cache != "off":
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
  if _worker is not None and _shared:  # several workers write one folder: JAX locks it
    jax.config.update("jax_compilation_cache_max_size", _LOCKED_CACHE_BYTES)


# The modules CI also runs with the oldest supported releases (.ci/run: pytest -m oldest),
# besides the slow tests marked `oldest` one by one: the code that meets the JAX, Flax and
# orbax APIs that change between releases (jaxpr primitives and their parameters, shardings,
# NNX state, checkpoints), each module whole.
VERSION_SENSITIVE = ("test_factored.py", "test_conv.py", "test_experts.py", "test_sharding.py",
                     "test_checkpoint.py", "test_infer.py", "test_nnx.py", "test_lift.py",
                     "test_merge.py", "test_kinds.py", "test_layers.py", "test_api.py")


# The modules whose tests run longest (processes, whole jobs, Tunix and transformers models),
# longest first. They start first: with pytest-xdist's `--dist load` each worker takes the next
# test when it is free, so the short tests fill in around the long ones instead of one long
# test starting last and holding up the end of the run.
LONGEST_FIRST = ("test_multiprocess.py", "test_tunix.py", "test_third_party.py", "test_job.py")


def pytest_collection_modifyitems(config, items):
  for item in items:
    if item.path.name in VERSION_SENSITIVE:
      item.add_marker(pytest.mark.oldest)

  def order(item):
    name = item.path.name
    if name in LONGEST_FIRST:
      return LONGEST_FIRST.index(name)
    return len(LONGEST_FIRST) + (item.get_closest_marker("slow") is None)

  items.sort(key=order)  # stable: the collection order within each group


@pytest.fixture
def key():
  return jax.random.key(0)


@pytest.fixture
def collect_orbax_leftovers():
  """Collects, after the test, what reads of damaged checkpoints leave: orbax coroutines that
  fail when garbage collected (orbax's clean-up, not ours; modules using this ignore
  ``PytestUnraisableExceptionWarning``), so that no later test reports them.

  What is alive after the collection is then frozen (``gc.freeze``): the next collection
  scans only what later tests made, not the whole heap of a long session (JAX's caches and
  compiled programs), which took about 2 s per test.
  """
  yield
  gc.collect()
  gc.freeze()
