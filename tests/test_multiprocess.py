"""Two processes x 4 CPU devices (JAX's multi-controller runtime, gloo collectives on
127.0.0.1): sharded lift, factored training and training-state checkpoints written by every
process; one process is killed with SIGKILL mid-run, both are restarted and resume.

The resumed run must end bitwise equal to an uninterrupted two-process run, and equal to the
one-process 8-device run of the same mesh to float32 rounding: the all-reduces of XLA (one
process) and gloo (two) add the partial sums of the 4-way "model" axis in different orders,
so those two runs differ in the last bit (measured: at most 3e-8).
"""

import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from child_env import child_env

JOB = pathlib.Path(__file__).resolve().parent / "multiprocess_job.py"
TOTAL, EVERY = 8, 2


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(process, processes, port, ckpt, out, pause=0.0):
  return subprocess.Popen(
      [sys.executable, str(JOB), str(process), str(processes), str(port), str(ckpt), str(out),
       str(TOTAL), str(EVERY), str(pause)],
      env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs, timeout=240):
  outputs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      p.kill()
      out, _ = p.communicate()
      pytest.fail(f"a process did not finish in {timeout} s:\n{out[-3000:]}")
    outputs.append(out)
    assert p.returncode == 0, out[-3000:]
  return outputs


def _two(ckpt, out, pause=0.0):
  port = _port()
  return [_start(i, 2, port, ckpt, out, pause) for i in (0, 1)]


def test_killed_two_process_run_resumes_exactly(tmp_path):
  _finish([_start(0, 1, 0, tmp_path / "one", tmp_path / "one.npz")])
  _finish(_two(tmp_path / "two", tmp_path / "two.npz"))

  procs = _two(tmp_path / "killed", tmp_path / "killed.npz", pause=0.3)
  deadline = time.monotonic() + 180
  for line in procs[0].stdout:  # wait until step 4 is saved, then kill process 1 mid-run
    if line.startswith("saved 4") or time.monotonic() > deadline:
      break
  assert line.startswith("saved 4"), "the run did not reach step 4"
  procs[1].send_signal(signal.SIGKILL)
  procs[1].wait(timeout=30)
  try:  # process 0 now waits on a collective with a dead peer (or fails): stop it too
    procs[0].wait(timeout=10)
  except subprocess.TimeoutExpired:
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait(timeout=30)
  for p in procs:
    p.stdout.close()
  assert not (tmp_path / "killed.npz").exists()

  outputs = _finish(_two(tmp_path / "killed", tmp_path / "killed.npz"))
  resumed = [line for line in outputs[0].splitlines() if line.startswith("resumed")]
  assert resumed and int(resumed[0].split()[1]) >= 4, outputs[0][-2000:]

  one, two, killed = (np.load(tmp_path / f"{n}.npz") for n in ("one", "two", "killed"))
  assert sorted(killed.files) == sorted(one.files)
  for name in one.files:
    np.testing.assert_array_equal(killed[name], two[name], err_msg=name)
    np.testing.assert_allclose(killed[name], one[name], rtol=1e-6, atol=1e-7, err_msg=name)
  assert not np.array_equal(one["l1/kernel/b"], np.zeros_like(one["l1/kernel/b"]))
