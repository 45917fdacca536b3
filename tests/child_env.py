"""The environment for test scripts run as child processes (kill and resume tests)."""

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def child_env() -> dict[str, str]:
  """This environment on CPU, with the project importable and no fake-device flags."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)
  if "LORA_JAX_TEST_CHILD_XLA_CACHE" in env:  # their own compilation cache (conftest.py)
    env["JAX_COMPILATION_CACHE_DIR"] = env["LORA_JAX_TEST_CHILD_XLA_CACHE"]
  return env
