"""Two processes x 4 CPU devices (JAX's multi-controller runtime, gloo collectives on
127.0.0.1): sharded lift, factored training and training-state checkpoints written by every
process; one process is killed with SIGKILL mid-run, both are restarted and resume.

The resumed run must end bitwise equal to an uninterrupted two-process run, and equal to the
one-process 8-device run of the same mesh to float32 rounding: the all-reduces of XLA (one
process) and gloo (two) need not add partial sums in the same order, so those two runs differ
in the last bit (measured: at most 3e-8). The checkpoint then restores in one process onto
another mesh, bitwise.
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

pytestmark = pytest.mark.slow  # spawns processes (jax.distributed, SIGKILL)

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


@pytest.mark.oldest
def test_killed_two_process_run_resumes_exactly(tmp_path):
  _finish([_start(0, 1, 0, tmp_path / "one", tmp_path / "one.npz")])
  # Each process also saves and loads VeRA adapters: the shared projections, replicated over
  # both processes' devices, are kept as their seed and drawn again onto their sharding.
  assert all("vera seed True True" in out
             for out in _finish(_two(tmp_path / "two", tmp_path / "two.npz")))

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
  # The two-process checkpoint restored by one process, on another mesh (4 x 2): the run is
  # complete, so it only restores and writes what it restored.
  restored = subprocess.run(
      [sys.executable, str(JOB), "0", "1", "0", str(tmp_path / "killed"),
       str(tmp_path / "restored.npz"), str(TOTAL), str(EVERY)],
      env={**child_env(), "LORA_JAX_TEST_MESH": "4,2"}, capture_output=True, text=True,
      timeout=240, check=False)
  assert restored.returncode == 0 and f"resumed {TOTAL}" in restored.stdout, restored.stderr
  again = np.load(tmp_path / "restored.npz")
  for name in one.files:
    np.testing.assert_array_equal(again[name], killed[name], err_msg=name)


@pytest.mark.oldest
def test_train_job_runs_as_two_processes(tmp_path):
  """lora-jax train --distributed on 2 processes x 4 devices (mesh 2 x 4) gives the one-process
  8-device run's results; only process 0 reports and writes metrics."""
  import json
  import os

  import lora_jax as lj

  args = ["--config", str(JOB.parent.parent / "configs" / "digits.yaml"), "--set",
          "mesh.data=2", "--set", "mesh.model=4", "--set", "pretrain.steps=8", "--set",
          "finetune.steps=8", "--set", "finetune.log_every=1", "--set", "full_finetune=false"]
  cli = [sys.executable, "-m", "lora_jax._src.cli.main", "train"]

  def env(devices, **extra):
    return {**child_env(), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            **extra}

  one = subprocess.run([*cli, *args, "--set", f"run_dir={tmp_path / 'one'}"], env=env(8),
                       capture_output=True, text=True, timeout=300, check=False)
  assert one.returncode == 0, one.stderr[-3000:]
  port = str(_port())
  procs = [subprocess.Popen([*cli, "--distributed", *args, "--set", f"run_dir={tmp_path / 'two'}"],
                            env=env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                    JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in (0, 1)]
  outputs = _finish(procs, timeout=300)
  assert "LoRA" in outputs[0] and "LoRA" not in outputs[1]  # only process 0 reports
  assert "lora:" not in outputs[1]  # nor shows progress
  metrics = {n: json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two")}
  assert metrics["two"]["lora"] == pytest.approx(metrics["one"]["lora"], abs=0.2)
  np.testing.assert_allclose(metrics["two"]["curves"]["lora"], metrics["one"]["curves"]["lora"],
                             rtol=1e-4)
  loaded = {n: lj.load_adapters(tmp_path / n / "adapters")[0] for n in ("one", "two")}
  for a, b in zip(*(jax_leaves(loaded[n]) for n in ("one", "two"))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))


def jax_leaves(tree):
  import jax  # pylint: disable=import-outside-toplevel

  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_hf_job_two_processes_resume_exactly(tmp_path):
  """lora-jax train --distributed on a Hugging Face folder: two processes x 4 devices, both
  killed (SIGKILL) after a saved state and restarted, end bitwise equal to an uninterrupted
  two-process run; grain's data position is part of the state. Each process loads the model
  on its own device (Tunix's loader alone would put it on process 0's)."""
  import json

  import jax
  import yaml

  import lora_jax as lj

  pytest.importorskip("tunix.models")
  import hf_tiny  # pylint: disable=import-outside-toplevel

  folder = tmp_path / "model"
  hf_tiny.save("llama", folder)
  hf_tiny.save_tokenizer(folder)
  data = tmp_path / "data.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in hf_tiny.records()))
  cli = [sys.executable, "-m", "lora_jax._src.cli.main", "train", "--distributed"]

  def start(name):
    config = {"model": {"hf": str(folder)}, "data": {"jsonl": str(data), "seq_len": 16,
                                                      "samples": 1, "max_new_tokens": 2},
              # A state every 9 steps: each save writes the whole training state.
              "finetune": {"steps": 30, "batch_size": 4, "lr": 1e-2, "log_every": 3,
                           "save_every": 9},
              "lora": {"rank": 4, "alpha": 8.0}, "mesh": {"data": 2, "model": 4},
              "run_dir": str(tmp_path / name)}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    port = str(_port())
    return [subprocess.Popen([*cli, "--config", str(tmp_path / f"{name}.yaml")],
                             env={**child_env(),
                                  "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                                  "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                  "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in (0, 1)]

  _finish(start("whole"), timeout=300)
  procs = start("killed")
  deadline = time.monotonic() + 300
  while not (tmp_path / "killed" / "state" / "9").is_dir():
    assert all(p.poll() is None for p in procs), "a process ended before step 9"
    assert time.monotonic() < deadline, "no state at step 9 in 300 s"
    time.sleep(0.02)
  for p in procs:
    p.send_signal(signal.SIGKILL)
    p.communicate()
  assert not (tmp_path / "killed" / "metrics.json").exists()
  outputs = _finish(start("killed"), timeout=300)
  assert "lora: resumed from step" in outputs[0], outputs[0][-3000:]
  hf_tiny.assert_runs_equal(tmp_path / "whole", tmp_path / "killed")
  # The PEFT export gathered the adapters from both processes: it computes what they do.
  model = lj.load_hf(folder)
  tokens = jax.numpy.asarray(np.arange(16, dtype=np.int32).reshape(2, 8) % 40)

  def logits(lp, config):
    return np.asarray(lj.wrap(lambda p, t: model.apply(p, t)[0], config)(lp, tokens))

  adapters, config = lj.load_adapters(tmp_path / "whole" / "adapters")
  imported, imported_config = lj.load_peft(tmp_path / "whole" / "peft", params=model.params,
                                           module_name=model.name_map,
                                           in_axes=dict(config.in_axes))
  np.testing.assert_allclose(logits(lj.LoraParams(model.params, imported), imported_config),
                             logits(lj.LoraParams(model.params, adapters), config),
                             atol=1e-5, rtol=0)
