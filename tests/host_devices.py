"""XLA flags for N fake CPU devices, keeping only the flags the installed XLA knows.

Eight fake devices sharing two cores can leave one device thread behind long
enough for XLA:CPU's 40 s collective timeout to abort the process, so the
timeout is raised where XLA has a flag for it. Older XLA releases abort on an
unknown flag (jaxlib 0.7 knows neither timeout flag; 0.8.0 knows one), so each
is probed in a child process before JAX starts in this one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

_TIMEOUT_FLAGS = ("--xla_cpu_collective_call_terminate_timeout_seconds",
                  "--xla_cpu_collective_timeout_seconds")
_PROBE = "import jax; jax.devices('cpu')"


def host_device_flags(count: int, *, timeout_s: int = 1200) -> str:
  """``XLA_FLAGS`` text for ``count`` CPU devices and raised collective timeouts.

  Flags that this jaxlib's XLA does not know are left out (found by starting
  JAX in a child process, about a second each). Call it before importing JAX.
  """
  flags = [f"--xla_force_host_platform_device_count={count}",
           *(f"{name}={timeout_s}" for name in _TIMEOUT_FLAGS)]
  for _ in _TIMEOUT_FLAGS:
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    probe = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                           text=True, check=False)
    unknown = re.search(r"Unknown flags? in XLA_FLAGS: (--[\w]+)", probe.stderr)
    if probe.returncode == 0 or unknown is None:
      break
    flags = [f for f in flags if not f.startswith(unknown.group(1) + "=")]
  return " ".join(flags)


def set_host_devices(count: int, *, timeout_s: int = 1200) -> None:
  """Appends ``host_device_flags(count)`` to ``XLA_FLAGS``; call before importing JAX."""
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                             + host_device_flags(count, timeout_s=timeout_s)).strip()
