"""Adapter checkpoints, strict restore, sharded restore and exact resume after SIGKILL."""

import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from child_env import child_env
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj

HERE = pathlib.Path(__file__).resolve().parent

# After a failed restore (the damaged-checkpoint test), orbax's background asyncio threads can
# report "Event loop is closed" as an unraisable exception at a later test's setup. That is
# orbax's clean-up, not our code; keep it from failing the neighbouring tests.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _lifted():
  config = lj.LoraConfig(rank=4, targets=r"kernel$", rank_pattern={"h": 2})
  params = {"d": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)},
            "h": {"kernel": jnp.ones((8, 4))}}
  lp = lj.lift(params, config, key=jax.random.key(0))
  return lj.LoraParams(lp.base, jax.tree.map(lambda x: x + 0.5, lp.adapters)), config


def test_round_trip_with_config(tmp_path):
  lp, config = _lifted()
  path = lj.save_adapters(tmp_path / "ckpt", lp.adapters, config)
  adapters, restored = lj.load_adapters(path, target=lp.adapters)
  assert restored == config
  jax.tree.map(np.testing.assert_array_equal, adapters, lp.adapters)
  adapters, _ = lj.load_adapters(path)  # no target: the saved structure
  jax.tree.map(np.testing.assert_array_equal, adapters, lp.adapters)
  with pytest.raises(FileExistsError, match=r"already exists; pass overwrite=True"):
    lj.save_adapters(tmp_path / "ckpt", lp.adapters, config)
  lj.save_adapters(tmp_path / "ckpt", lp.adapters, config, overwrite=True)


def test_trained_leaves_are_saved_restored_and_overlaid(tmp_path):
  """Everything a run trains survives: adapters and the leaves trained in full."""
  config = lj.LoraConfig(rank=2, targets=r"layers/\d+/kernel$", trainable=(r"bias$", r"head/"))
  k = jax.random.split(jax.random.key(0), 3)
  params = {"layers": [{"kernel": jax.random.normal(k[0], (6, 5)), "bias": jnp.zeros(5)},
                       {"kernel": jax.random.normal(k[1], (5, 4)), "bias": jnp.zeros(4)}],
            "head": {"kernel": jax.random.normal(k[2], (4, 3)), "bias": jnp.zeros(3)}}
  apply = lambda p, x: (jax.nn.relu(jax.nn.relu(x @ p["layers"][0]["kernel"]  # noqa: E731
                                                + p["layers"][0]["bias"])
                                    @ p["layers"][1]["kernel"] + p["layers"][1]["bias"])
                        @ p["head"]["kernel"] + p["head"]["bias"])
  lp = lj.lift(params, config, key=jax.random.key(1))
  trained = lj.LoraParams(jax.tree.map(lambda x: x + 0.25, lp.base),  # every leaf "trained"...
                          jax.tree.map(lambda x: x + 0.5, lp.adapters))
  # ...but only adapters and config.trainable leaves are the run's: the frozen kernels stay.
  biases = [{"bias": layer["bias"]} for layer in trained.base["layers"]]
  trained = lj.LoraParams(lj.overlay(params, {"layers": biases, "head": trained.base["head"]}),
                          trained.adapters)
  x = jax.random.normal(jax.random.key(2), (7, 6))
  expected = lj.wrap(apply, config)(trained, x)
  with pytest.raises(ValueError, match=r"names base leaves trained in full, which lp.adapters "
                     r"does not hold; saving it alone would lose them"):
    lj.save_adapters(tmp_path / "ckpt", trained.adapters, config)
  path = lj.save_adapters(tmp_path / "ckpt", trained, config)
  loaded, restored = lj.load_adapters(path)
  assert restored == config and isinstance(loaded, lj.LoraParams)
  assert sorted(lj.paths(loaded.base)) == ["head/bias", "head/kernel", "layers/0/bias",
                                           "layers/1/bias"]
  lp2 = lj.overlay(params, loaded)  # the original base + everything the run trained
  np.testing.assert_array_equal(lj.wrap(apply, config)(lp2, x), expected)
  strict, _ = lj.load_adapters(path, target=trained)
  jax.tree.map(np.testing.assert_array_equal, lj.overlay(params, strict), trained)
  with pytest.raises(ValueError, match=r"overlay: the trained leaves do not fit the base tree"
                     r"[^$]*head/kernel: shape \(4, 3\) here, \(4, 2\) in the base"):
    lj.overlay({**params, "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(3)}}, loaded)


def test_load_and_inspect_log_no_warnings(tmp_path, caplog):
  lp, config = _lifted()
  path = lj.save_adapters(tmp_path / "ckpt", lp.adapters, config)
  caplog.clear()
  lj.load_adapters(path, target=lp.adapters)
  lj.load_adapters(path)
  assert not [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def test_steps_and_latest(tmp_path):
  lp, config = _lifted()
  for step in (10, 20):
    lj.save_adapters(tmp_path / "run", jax.tree.map(lambda x, s=step: x + s, lp.adapters),
                     config, step=step)
  latest, _ = lj.load_adapters(tmp_path / "run")
  first, _ = lj.load_adapters(tmp_path / "run", step=10)
  np.testing.assert_array_equal(latest["h"]["kernel"]["b"], lp.adapters["h"]["kernel"]["b"] + 20)
  np.testing.assert_array_equal(first["h"]["kernel"]["b"], lp.adapters["h"]["kernel"]["b"] + 10)
  with pytest.raises(FileNotFoundError,
                     match=r"No checkpoint for step 30 .* found steps \[10, 20\]"):
    lj.load_adapters(tmp_path / "run", step=30)


def test_strict_restore_lists_all_mismatches(tmp_path):
  lp, config = _lifted()
  path = lj.save_adapters(tmp_path / "ckpt", lp.adapters, config)
  target = {"d": {"kernel": {"a": jnp.ones((16, 3)), "b": jnp.ones((4, 8))}},
            "q": {"kernel": {"a": jnp.ones((8, 4)), "b": jnp.ones((4, 8))}}}
  with pytest.raises(ValueError) as info:
    lj.load_adapters(path, target=target)
  message = str(info.value)
  assert "missing q/kernel/a: expected shape (8, 4)" in message
  assert "unexpected h/kernel/a: shape (8, 2)" in message
  assert "d/kernel/a: shape (16, 4) in the checkpoint, expected (16, 3)" in message


def test_missing_and_damaged_checkpoints(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"No adapter checkpoint at .*nothing"):
    lj.load_adapters(tmp_path / "nothing")
  lp, config = _lifted()
  path = lj.save_adapters(tmp_path / "ckpt", lp.adapters, config)
  for f in (path / "adapters").rglob("*"):
    if f.is_file() and "manifest" in f.name:
      f.write_bytes(b"\x00garbage")
  with pytest.raises(ValueError, match=r"Cannot read the adapter checkpoint at .*ckpt"):
    lj.load_adapters(path, target=lp.adapters)


def test_restore_onto_a_different_sharding(tmp_path):
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  kernel = jax.device_put(jnp.ones((16, 8)), NamedSharding(mesh, P("data", "model")))
  params = {"d": {"kernel": kernel}}
  config = lj.LoraConfig(rank=4)
  lp = lj.lift(params, config, key=jax.random.key(0))
  path = lj.save_adapters(tmp_path / "ckpt", lp.adapters, config)
  # Restore onto another layout: A sharded over "model" instead of "data", B replicated.
  target = {"d": {"kernel": {
      "a": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=NamedSharding(mesh, P("model"))),
      "b": jax.ShapeDtypeStruct((4, 8), jnp.float32, sharding=NamedSharding(mesh, P()))}}}
  adapters, _ = lj.load_adapters(path, target=target)
  assert adapters["d"]["kernel"]["a"].sharding.spec == P("model")
  assert adapters["d"]["kernel"]["b"].sharding.spec == P()
  jax.tree.map(np.testing.assert_array_equal, adapters, lp.adapters)


def _job(ckpt, out, total=12, every=3, pause=0.0):
  return [sys.executable, str(HERE / "resume_job.py"), str(ckpt), str(out), str(total),
          str(every), str(pause)]


@pytest.mark.oldest
@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_identical(tmp_path):
  subprocess.run(_job(tmp_path / "a", tmp_path / "a.npz"), check=True, env=child_env(),
                 capture_output=True)
  with subprocess.Popen(_job(tmp_path / "b", tmp_path / "b.npz", pause=0.3), env=child_env(),
                        stdout=subprocess.PIPE, text=True) as proc:
    for line in proc.stdout:
      if line.strip() == "saved 6":
        proc.send_signal(signal.SIGKILL)  # no clean-up: as a preemption
        break
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not (tmp_path / "b.npz").exists()
  resumed = subprocess.run(_job(tmp_path / "b", tmp_path / "b.npz"), check=True, env=child_env(),
                           capture_output=True, text=True)
  assert "resumed" in resumed.stdout
  a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
  assert sorted(a.files) == sorted(b.files)
  for name in a.files:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
  lp, config = _lifted()
  state = {"adapters": lp.adapters}
  lj.save_train_state(tmp_path / "run", 4, state, config)
  # What a save killed halfway leaves behind: orbax's temporary folder, never renamed.
  partial = tmp_path / "run" / "8.orbax-checkpoint-tmp-1234567890"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "_METADATA").write_text("{truncated")
  step, restored = lj.load_train_state(tmp_path / "run", state)
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert lj.load_train_state(tmp_path / "empty", state) is None
