"""A LoRA training job on a 2 x 4 mesh, run as one process or as several (JAX multi-controller).

Usage: python multiprocess_job.py PROCESS_ID NUM_PROCESSES PORT CKPT_DIR OUT.npz TOTAL_STEPS
                                  SAVE_EVERY [STEP_SLEEP_S]
LORA_JAX_TEST_MESH=4,2 uses another mesh shape (a restore onto another mesh).
With NUM_PROCESSES > 1 each process owns 8 / NUM_PROCESSES CPU devices and joins through
jax.distributed (coordinator 127.0.0.1:PORT, gloo collectives). The base is sharded over the
global mesh, lift makes sharded adapters, every SAVE_EVERY steps the training state is saved
(every process writing its shards), and a restarted run resumes from the newest step. Data for
step i is a pure function of i. Process 0 prints "saved N" and writes OUT.npz at the end.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from host_devices import set_host_devices  # noqa: E402  (beside this script)


def _join() -> tuple[int, int]:
  """Sets this process's devices and joins the others; before anything else touches JAX."""
  process, processes = int(sys.argv[1]), int(sys.argv[2])
  set_host_devices(8 // processes)
  import jax  # pylint: disable=import-outside-toplevel

  if processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{sys.argv[3]}",
                               num_processes=processes, process_id=process)
  return process, processes


def main(process: int) -> None:
  import time  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  import lora_jax as lj  # pylint: disable=import-outside-toplevel

  ckpt, out, total, every = sys.argv[4], sys.argv[5], int(sys.argv[6]), int(sys.argv[7])
  pause = float(sys.argv[8]) if len(sys.argv) > 8 else 0.0
  shape = tuple(int(n) for n in os.environ.get("LORA_JAX_TEST_MESH", "2,4").split(","))
  mesh = jax.make_mesh(shape, ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rng = np.random.default_rng(0)
  host = {"l1": {"kernel": rng.standard_normal((16, 32), np.float32) / 4,
                 "bias": np.zeros(32, np.float32)},
          "l2": {"kernel": rng.standard_normal((32, 8), np.float32) / 4}}
  # FSDP over "data" (across the processes) and tensor parallelism over "model".
  specs = {"l1": {"kernel": P("data", "model"), "bias": P("model")},
           "l2": {"kernel": P("model", None)}}
  params = jax.tree.map(
      lambda v, s: jax.make_array_from_callback(v.shape, NamedSharding(mesh, s),
                                                lambda idx, v=v: v[idx]), host, specs)
  config = lj.LoraConfig(rank=4, alpha=8.0, targets=r"kernel$", trainable=r"bias$")
  batch = NamedSharding(mesh, P("data", None))

  def model(p, x):
    return jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"]) @ p["l2"]["kernel"]

  apply = lj.wrap(model, config)
  tx = lj.optimizer(optax.adam(1e-2), config)
  lp = lj.lift(params, config, key=jax.random.key(2))

  @jax.jit
  def step_fn(lp, opt_state, i):
    key = jax.random.fold_in(jax.random.key(3), i)
    x = jax.lax.with_sharding_constraint(jax.random.normal(key, (32, 16)), batch)
    y = jnp.sin(x[:, :8])
    grads = jax.grad(lambda lp: jnp.mean((apply(lp, x) - y) ** 2))(lp)
    updates, opt_state = tx.update(grads, opt_state, lp)
    return optax.apply_updates(lp, updates), opt_state

  def state_of(lp, opt_state):
    return {"adapters": lp.adapters, "bias": lp.base["l1"]["bias"], "opt_state": opt_state}

  opt_state = tx.init(lp)
  start = 0
  found = lj.load_train_state(ckpt, state_of(lp, opt_state), config=config)
  if found is not None:
    start, state = found
    base = {**params, "l1": {**params["l1"], "bias": state["bias"]}}
    lp, opt_state = lj.LoraParams(base, state["adapters"]), state["opt_state"]
    if process == 0:
      print(f"resumed {start}", flush=True)
  times = []
  with jax.numpy_dtype_promotion("standard"):  # optax Adam mixes float and int32 counts
    for i in range(start, total):
      begin = time.perf_counter()
      lp, opt_state = jax.block_until_ready(step_fn(lp, opt_state, i))
      times.append(time.perf_counter() - begin)
      time.sleep(pause)
      if (i + 1) % every == 0:
        lj.save_train_state(ckpt, i + 1, state_of(lp, opt_state), config)
        if process == 0:
          print(f"saved {i + 1}", flush=True)
  trained = {"/".join(str(getattr(k, "key", k)) for k in path): v for path, v in
             jax.tree_util.tree_leaves_with_path(state_of(lp, opt_state)["adapters"])}
  trained["bias"] = lp.base["l1"]["bias"]
  gathered = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
              for k, v in trained.items()}
  # VeRA across processes: lift replicates its projections over the global mesh, the
  # checkpoint holds their seed, and a load onto the sharded target draws them again.
  vera = lj.LoraConfig(rank=4, kind="vera", targets=r"kernel$")
  lifted = lj.lift(params, vera, key=jax.random.key(5)).adapters
  lj.save_adapters(f"{ckpt}-vera", lifted, vera, overwrite=True)
  back, _ = lj.load_adapters(f"{ckpt}-vera", target=lifted)
  same = all(np.array_equal(np.asarray(x.addressable_data(0)), np.asarray(y.addressable_data(0)))
             and x.sharding == y.sharding
             for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(lifted)))
  print(f"vera seed {os.path.isdir(f'{ckpt}-vera/shared_drawn')} {same}", flush=True)
  if process == 0:
    np.savez(out, **gathered)
    if len(times) > 2:  # the first steps compile
      print(f"step_ms {1e3 * float(np.median(times[2:])):.3f}", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
  main(_join()[0])
