"""``lora-jax train``: a whole LoRA fine-tuning job from a YAML config.

Build the model, get a base (pretrain it briefly, or load an orbax checkpoint),
lift, train only the adapters in a jitted loop, evaluate, save the adapter
checkpoint, merge and check the merged model against the adapted one,
optionally fine-tune the full model for comparison, then write ``metrics.json``
and ``loss.svg`` to the run directory and print a summary table.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import math
import pathlib
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax._src.adapters.lift import lift, overlay
from lora_jax._src.adapters.merge import merge
from lora_jax._src.adapters.optim import optimizer
from lora_jax._src.adapters.quantize import dequantize, quantize
from lora_jax._src.adapters.summary import format_table, summary
from lora_jax._src.cli.hf_task import TARGETS as HF_TARGETS
from lora_jax._src.cli.plot import write_loss_svg
from lora_jax._src.cli.progress import Progress
from lora_jax._src.cli.tasks import TASKS, TEXTCLS_PACKAGES, Task
from lora_jax._src.core.config import LoraConfig
from lora_jax._src.core.params import LoraParams
from lora_jax._src.core.patterns import compile_safe
from lora_jax._src.core.tree import leaves_with_paths, trained_leaves
from lora_jax._src.core.yaml_io import load_yaml, short
from lora_jax._src.factored.wrap import wrap
from lora_jax._src.io import atomic, checksums
from lora_jax._src.io.checkpoint import save_adapters
from lora_jax._src.io.quantized_io import is_job_base, write_base
from lora_jax._src.io.train_state import load_train_state, save_train_state

_TRAIN = {"steps": 300, "lr": 1e-3, "batch_size": 64}
DEFAULTS: dict[str, Any] = {
    "task": "digits",            # digits | textcls | charlm | hf (implied by model.hf)
    "framework": "linen",        # linen | nnx (nnx: digits only)
    "seed": 0,
    "run_dir": None,             # default: runs/<config file name>
    "model": {},                 # task-specific, see TASK_DEFAULTS
    "data": {},                  # task-specific, see TASK_DEFAULTS
    "base_checkpoint": None,     # orbax checkpoint of the base parameters; skips pretraining
    "save_base": False,          # save the pretrained base to RUN_DIR/base (for base_checkpoint)
    "pretrain": dict(_TRAIN),
    "finetune": {**_TRAIN, "lr": 3e-3, "log_every": 25, "dropout_rng": True,
                 "lora_plus_ratio": 1.0,  # LoRA+: B's learning rate over A's (16 in the paper)
                 "save_every": 0,         # save RUN_DIR/state every N steps; a rerun resumes
                 "freeze_a": False},      # LoRA-FA: train B only
    "lora": {"rank": 8, "alpha": 16.0, "targets": ["kernel$"]},  # any LoraConfig field
    "full_finetune": True,       # also fine-tune every parameter, for comparison
    "mesh": None,                # {data: N, model: M}: shard the base and the batch
    "quantize": None,            # nf4 | int8 | {dtype, targets, block_size, double_quant}
    "export": {"peft": True,     # hf task: RUN_DIR/peft, names checked against the folder
               "merged": False},  # hf task: RUN_DIR/merged, a merged Hugging Face folder
}
# ``quantize:`` as a mapping; targets default to the LoRA targets.
QUANTIZE_DEFAULTS: dict[str, Any] = {"kind": "nf4", "targets": None, "block_size": None,
                                     "double_quant": None}
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"model": {"hidden": [256, 128]},
               "data": {"shift": "rotate", "test_fraction": 0.3}},
    "textcls": {"model": {"d_model": 64, "heads": 4, "layers": 2, "mlp": 256, "max_len": 96},
                "data": {"pretrain_packages": ["asyncio", "email", "xml", "urllib"],
                         "finetune_packages": ["logging", "multiprocessing", "importlib",
                                               "http"],
                         "test_fraction": 0.25}},
    "charlm": {"model": {"d_model": 128, "heads": 4, "layers": 2, "mlp": 512, "max_len": 64,
                         "scan": False},
               "data": {"test_fraction": 0.15}},
    "hf": {"model": {"hf": None, "dtype": "float32"},  # hf: a Hugging Face model folder
           "data": {"jsonl": None, "seq_len": 128, "test_fraction": 0.1, "samples": 2,
                    "max_new_tokens": 32}},
}
CHOICES = {"task": (*TASKS, "hf"), "framework": ("linen", "nnx"),
           "data.shift": ("rotate", "noise", "invert"),
           "model.dtype": ("float32", "bfloat16")}
_POSITIVE = lambda v: v > 0  # noqa: E731
# Ranges of numeric keys (by the key's last part) and of list elements: (test, wording).
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: 0 <= v < 2**31, "an integer from 0 to 2**31 - 1"),
    "steps": (_POSITIVE, "an integer >= 1"),
    "batch_size": (_POSITIVE, "an integer >= 1"),
    "log_every": (_POSITIVE, "an integer >= 1"),
    "lr": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "lora_plus_ratio": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "test_fraction": (lambda v: 0 < v < 1, "a number strictly between 0 and 1"),
    "hidden": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
               "a list of integers >= 1"),
    "d_model": (_POSITIVE, "an integer >= 1"), "heads": (_POSITIVE, "an integer >= 1"),
    "layers": (_POSITIVE, "an integer >= 1"), "mlp": (_POSITIVE, "an integer >= 1"),
    "max_len": (_POSITIVE, "an integer >= 1"),
    "seq_len": (_POSITIVE, "an integer >= 1"), "max_new_tokens": (_POSITIVE, "an integer >= 1"),
    "samples": (lambda v: v >= 0, "an integer >= 0"),
    "save_every": (lambda v: v >= 0, "an integer >= 0 (0: no saves)"),
    "data": (_POSITIVE, "an integer >= 1"), "model": (_POSITIVE, "an integer >= 1"),
    "pretrain_packages": (lambda v: isinstance(v, str) and bool(v),
                          "a list of importable package names"),
    "finetune_packages": (lambda v: isinstance(v, str) and bool(v),
                          "a list of importable package names"),
    "run_dir": (bool, "a non-empty path"), "base_checkpoint": (bool, "a non-empty path"),
    "hf": (bool, "a non-empty path"), "jsonl": (bool, "a non-empty path"),
}


def _in_range(value: Any, key: str) -> None:
  rule = RANGES.get(key.rpartition(".")[2])
  if rule is None:
    return
  test, wording = rule
  items = value if isinstance(value, (list, tuple)) else [value]
  if isinstance(value, (list, tuple)) and not value and key.endswith("_packages"):
    items = [""]
  if not all(test(v) for v in items):
    raise ValueError(f"config key '{key}': must be {wording}, got {short(value)}.")


def _check(value: Any, default: Any, key: str) -> Any:
  """Validates ``value`` against the default's type, the allowed choices and its range."""
  if key in CHOICES and value not in CHOICES[key]:
    raise ValueError(f"config key '{key}': {short(value)} is not one of {list(CHOICES[key])}.")
  if value is None:
    if default is None:
      return value
    raise ValueError(f"config key '{key}': null is not a value here; expected "
                     f"{type(default).__name__} (default {short(default)}). Remove the key to "
                     "use the default.")
  if default is None:
    if not isinstance(value, str):
      raise ValueError(f"config key '{key}': expected a path (str), got {short(value)} "
                       f"({type(value).__name__}).")
    _in_range(value, key)
    return value
  if isinstance(default, bool):
    ok = isinstance(value, bool)
  elif isinstance(default, int):
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif isinstance(default, float):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    value = float(value) if ok else value
  elif isinstance(default, (list, tuple)):
    ok = isinstance(value, (list, tuple))
  else:
    ok = isinstance(value, type(default))
  if not ok:
    raise ValueError(f"config key '{key}': expected {type(default).__name__}, got "
                     f"{short(value)} ({type(value).__name__}).")
  _in_range(value, key)
  return value


def _merge_config(defaults: Mapping[str, Any], given: Mapping[str, Any], prefix: str
                  ) -> dict[str, Any]:
  if not isinstance(given, Mapping):
    raise ValueError(f"config key '{prefix.rstrip('.')}': expected a mapping of keys "
                     f"{sorted(defaults)}, got {short(given)}.")
  out = copy.deepcopy(dict(defaults))
  for key, value in given.items():
    full = f"{prefix}{key}"
    if not isinstance(key, str) or key not in defaults:
      raise ValueError(f"unknown config key '{full[:80]}'; allowed keys here: "
                       f"{sorted(defaults)}.")
    default = defaults[key]
    if isinstance(default, dict):
      if not isinstance(value, Mapping):
        raise ValueError(f"config key '{full}': expected a mapping, got {short(value)}.")
      out[key] = _merge_config(default, value, f"{full}.")
    else:
      out[key] = _check(value, default, full)
  return out


def load_job_config(path: str | pathlib.Path | None = None,
                    overrides: list[str] | None = None) -> dict[str, Any]:
  """Reads a job YAML, applies ``key=value`` overrides (dotted keys) and validates it.

  Raises:
    ValueError: naming an unknown key and the allowed ones, or a bad value.
  """
  given: dict[str, Any] = {}
  if path is not None:
    try:
      text = pathlib.Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
      raise ValueError(f"{path}: not a UTF-8 text file; a job config is YAML.") from None
    given = load_yaml(text, str(path)) or {}
    if not isinstance(given, dict):
      raise ValueError(f"{path}: a job config is a mapping of keys, got {type(given).__name__}.")
  for item in overrides or []:
    key, sep, raw = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--set expects key=value, got {short(item)}.")
    node = given
    *parents, last = key.split(".")
    for i, part in enumerate(parents):
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f"--set {key}: '{'.'.join(parents[:i + 1])}' is not a section.")
    node[last] = load_yaml(raw, f"--set {key}")
  if "task" not in given and isinstance(given.get("model"), Mapping) and "hf" in given["model"]:
    given["task"] = "hf"  # model: {hf: DIR} names the task
  task = given.get("task", DEFAULTS["task"])
  _check(task, DEFAULTS["task"], "task")
  if task == "hf":
    given.setdefault("full_finetune", False)  # a full copy of an LLM is not the default
    if isinstance(given.get("lora"), dict):
      given["lora"].setdefault("targets", list(HF_TARGETS))
    elif given.get("lora") is None:
      given["lora"] = {"targets": list(HF_TARGETS)}
  config = _merge_config(DEFAULTS, {k: v for k, v in given.items()
                                    if k not in ("model", "data", "lora", "mesh",
                                                 "quantize")}, "")
  if task != "hf" and given.get("export"):
    raise ValueError("config key 'export': applies to the hf task (model: {hf: DIR}) only.")
  for section in ("model", "data"):
    config[section] = _merge_config(TASK_DEFAULTS[task][section], given.get(section) or {},
                                    f"{section}.")
  lora = given.get("lora") or {}
  if not isinstance(lora, dict):
    raise ValueError(f"config key 'lora': expected a mapping of LoraConfig fields, got "
                     f"{short(lora)}.")
  try:
    config["lora"] = LoraConfig.from_dict({**DEFAULTS["lora"], **lora})
  except (TypeError, ValueError) as e:
    raise ValueError(f"config key 'lora': {str(e)[:400]}") from None
  _check_model(config, task)
  mesh = given.get("mesh")
  if mesh is not None:
    config["mesh"] = _merge_config({"data": 1, "model": 1}, mesh, "mesh.")
  config["quantize"] = _quantize_config(given.get("quantize"))
  if task == "hf":
    for key in ("model.hf", "data.jsonl"):
      section, _, name = key.partition(".")
      if not config[section][name]:
        raise ValueError(f"config key '{key}': the hf task needs it (model: {{hf: a Hugging "
                         "Face model folder}, data: {jsonl: your records}).")
    if config["base_checkpoint"] or config["save_base"]:
      raise ValueError("config keys 'base_checkpoint' / 'save_base': the hf task's base is "
                       "the model folder (model.hf).")
  if config["framework"] == "nnx" and task != "digits":
    raise ValueError("config key 'framework': 'nnx' is available for task 'digits'.")
  if config["run_dir"] is None:
    stem = pathlib.Path(path).stem if path is not None else task
    config["run_dir"] = str(pathlib.Path("runs") / stem)
  return config


def _quantize_config(given: Any) -> dict[str, Any] | None:
  """``quantize:`` as a mapping of ``QUANTIZE_DEFAULTS`` keys, or None."""
  if given is None:
    return None
  if isinstance(given, str):
    given = {"kind": given}
  if not isinstance(given, Mapping):
    raise ValueError(f"config key 'quantize': expected nf4, int8 or a mapping of keys "
                     f"{sorted(QUANTIZE_DEFAULTS)}, got {short(given)}.")
  if "dtype" in given:  # the previous release's name of quantize.kind
    if "kind" in given:
      raise ValueError("config keys 'quantize.kind' and 'quantize.dtype' (its deprecated name) "
                       "are both set; keep quantize.kind.")
    warnings.warn("config key 'quantize.dtype' is deprecated and will be removed in 0.5; "
                  "write quantize.kind (nf4 or int8).", FutureWarning, stacklevel=2)
    given = {("kind" if k == "dtype" else k): v for k, v in given.items()}
  out = dict(QUANTIZE_DEFAULTS)
  kinds = {"kind": (str,), "targets": (str, list), "block_size": (int,),
           "double_quant": (bool,)}
  for key, value in given.items():
    if key not in QUANTIZE_DEFAULTS:
      raise ValueError(f"unknown config key 'quantize.{str(key)[:80]}'; allowed keys here: "
                       f"{sorted(QUANTIZE_DEFAULTS)}.")
    bad_int = key == "block_size" and (isinstance(value, bool) or
                                       (isinstance(value, int) and value < 1))
    if value is not None and (not isinstance(value, kinds[key]) or bad_int):
      raise ValueError(f"config key 'quantize.{key}': got {short(value)}; expected "
                       f"{' or '.join(k.__name__ for k in kinds[key])}"
                       f"{' >= 1' if key == 'block_size' else ''}.")
    out[key] = value
  targets = out["targets"]
  for pattern in [targets] if isinstance(targets, str) else (targets or []):
    if not isinstance(pattern, str):
      raise ValueError(f"config key 'quantize.targets': {short(pattern)} is not a regular "
                       "expression string.")
    compile_safe(pattern, "config key 'quantize.targets'")
  if out["kind"] not in ("nf4", "int8"):
    raise ValueError(f"config key 'quantize.kind': {short(out['kind'])} is not one of "
                     "['nf4', 'int8'].")
  return out


def _check_model(config: dict[str, Any], task: str) -> None:
  """Cross-key checks that a single key's range cannot express."""
  model, data = config["model"], config["data"]
  if task in ("textcls", "charlm") and model["d_model"] % model["heads"]:
    raise ValueError(f"config key 'model.heads': d_model {model['d_model']} must be a multiple "
                     f"of heads {model['heads']}.")
  for key in ("pretrain_packages", "finetune_packages"):
    for name in data.get(key, ()):
      if name not in TEXTCLS_PACKAGES:  # importing a package runs its code: an allow-list
        raise ValueError(f"config key 'data.{key}': {short(name)} is not one of the packages "
                         f"the textcls task reads ({', '.join(TEXTCLS_PACKAGES)}); a job "
                         "config never chooses which code is imported.")


def _batches(data: tuple[np.ndarray, np.ndarray], batch_size: int, seed: int):
  x, y = data
  rng = np.random.default_rng(seed)
  batch_size = min(batch_size, len(x))
  while True:
    order = rng.permutation(len(x))
    for start in range(0, len(x) - batch_size + 1, batch_size):
      idx = order[start:start + batch_size]
      yield x[idx], y[idx]


class TrainingDiverged(ValueError):
  """A training phase produced a non-finite loss or parameters."""


@dataclasses.dataclass(frozen=True)
class Resume:
  """Where ``fit`` saves its state every ``every`` steps and resumes from (RUN_DIR/state).

  The state holds the adapters, the leaves trained in full, the optimizer state, the data
  position (the input pipeline's iterator state) and the loss curve so far, so a resumed run
  ends with exactly the arrays an uninterrupted one does.
  """
  directory: pathlib.Path
  every: int
  config: LoraConfig


_DATA_STATE_BYTES = 1024  # the iterator state, JSON, in a fixed-size array


def _encode_position(state: Any) -> np.ndarray:
  raw = json.dumps(state, sort_keys=True).encode()
  if len(raw) > _DATA_STATE_BYTES:
    raise ValueError(f"the input pipeline's state is {len(raw)} bytes; at most "
                     f"{_DATA_STATE_BYTES} fit in the train state.")
  return np.frombuffer(raw.ljust(_DATA_STATE_BYTES, b"\0"), np.uint8).copy()


def _decode_position(array: Any) -> Any:
  return json.loads(bytes(np.asarray(array, np.uint8)).rstrip(b"\0").decode())


class _Replay:
  """The demo tasks' batches (``_batches``) with a position: batch ``i`` is the ``i``-th draw."""

  def __init__(self, data: tuple[np.ndarray, np.ndarray], batch_size: int, seed: int):
    self._args, self._done = (data, batch_size, seed), 0
    self._it = _batches(*self._args)

  def __next__(self):
    self._done += 1
    return next(self._it)

  def get_state(self) -> dict[str, int]:
    return {"batches": self._done}

  def set_state(self, state: dict[str, int]) -> None:
    self._it, self._done = _batches(*self._args), 0
    for _ in range(state["batches"]):
      next(self)


def fit(loss_fn: Callable[..., jax.Array], params: Any, tx: optax.GradientTransformation,
        data: Any, settings: Mapping[str, Any], desc: str,
        seed: int, put: Callable[[Any], Any] = lambda b: b, *,
        resume: Resume | None = None) -> tuple[Any, list[float]]:
  """A jitted training loop with live progress; returns the parameters and the loss curve.

  ``data`` is ``(x, y)`` arrays or a factory ``(batch_size, seed) -> iterator`` whose
  iterator has ``get_state`` / ``set_state`` (a grain dataset iterator). With ``resume``,
  ``params`` is a ``LoraParams`` and the run continues from the newest saved state.
  """

  @jax.jit
  def step(params, opt_state, x, y, key):
    # allow_int: a quantized base's codes get float0 gradients, which lj.optimizer zeroes
    loss, grads = jax.value_and_grad(loss_fn, allow_int=True)(params, x, y, key)
    # optax's Adam mixes Python floats with its int32 step count: trace it with standard
    # promotion so the job also runs where strict dtype promotion is switched on.
    with jax.numpy_dtype_promotion("standard"):
      updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  total = settings["steps"]
  every = max(1, settings.get("log_every", 25))
  logged = {step: i for i, step in enumerate(logged_steps(total, every))}
  curve_buffer = np.full(len(logged), np.nan, np.float32)
  batches = (data(settings["batch_size"], seed) if callable(data)
             else _Replay(data, settings["batch_size"], seed))
  base_key = jax.random.key(seed)
  start = 0
  if resume is not None:
    start, params, opt_state, curve_buffer = _restore(resume, params, opt_state, curve_buffer,
                                                      batches, total)
  # With several processes (lora-jax train --distributed) only process 0 reports.
  progress = Progress(total, desc, stream=None if _primary() else io.StringIO())
  if start:
    if _primary():
      print(f"{desc}: resumed from step {start} of {total} ({resume.directory})",
            file=sys.stderr, flush=True)
    progress.update(start)
  for i in range(start, total):
    x, y = put(next(batches))
    params, opt_state, loss = step(params, opt_state, x, y, jax.random.fold_in(base_key, i))
    if i + 1 in logged:
      curve_buffer[logged[i + 1]] = float(loss)
      if not math.isfinite(float(loss)):
        progress.close()
        raise TrainingDiverged(f"{desc}: the loss became {float(loss)} at step {i + 1}; "
                               "stopping before anything is saved. Lower the learning rate "
                               f"(now {settings['lr']}) or check the data and the base.")
      progress.update(i + 1, float(loss))
    else:
      progress.update(i + 1)
    if resume is not None and (i + 1) % resume.every == 0 and i + 1 < total:
      _save(resume, i + 1, params, opt_state, curve_buffer, batches)
  curve = [float(v) for v in curve_buffer]
  progress.close()
  # One program, dispatched after the last step has finished: on a CPU mesh, device threads
  # of several multi-device programs in flight at once (the last steps and one eager
  # isfinite per leaf) can starve each other's collectives until XLA aborts the process.
  params = jax.block_until_ready(params)
  floating = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.inexact)]
  finite = jax.jit(lambda leaves: jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.bool_(True)])))(floating)
  if not bool(finite):
    raise TrainingDiverged(f"{desc}: the parameters hold NaN or Inf after step {total}; "
                           "stopping before anything is saved. Lower the learning rate "
                           f"(now {settings['lr']}).")
  # Finish this phase before the next dispatches: on a CPU mesh, device threads of two
  # multi-device programs in flight at once can starve each other's collectives.
  return jax.block_until_ready(params), curve


def _state(lp: Any, opt_state: Any, curve: np.ndarray, position: np.ndarray,
           config: LoraConfig) -> dict[str, Any]:
  return {"adapters": lp.adapters, "trained": trained_leaves(lp.base, config.is_trainable),
          "opt_state": opt_state, "curve": curve, "data": position}


def _save(resume: Resume, step: int, lp: Any, opt_state: Any, curve: np.ndarray,
          batches: Any) -> None:
  state = _state(lp, opt_state, curve, _encode_position(batches.get_state()), resume.config)
  save_train_state(resume.directory, step, state, resume.config, max_to_keep=2)


def _restore(resume: Resume, lp: Any, opt_state: Any, curve: np.ndarray, batches: Any,
             total: int) -> tuple[int, Any, Any, np.ndarray]:
  target = jax.eval_shape(lambda: _state(lp, opt_state, curve,
                                         np.zeros(_DATA_STATE_BYTES, np.uint8), resume.config))
  found = load_train_state(resume.directory, target, config=resume.config)
  if found is None:
    return 0, lp, opt_state, curve
  step, state = found
  if step > total:
    raise ValueError(f"config key 'finetune.steps': {resume.directory} holds a state at step "
                     f"{step}, beyond the {total} steps asked for; raise finetune.steps or "
                     "use another run_dir.")
  batches.set_state(_decode_position(state["data"]))
  lp = overlay(LoraParams(lp.base, state["adapters"]), state["trained"])
  return step, lp, state["opt_state"], np.asarray(state["curve"], np.float32)


def evaluate(task: Task, apply: Callable[..., jax.Array], params: Any,
             data: tuple[np.ndarray, np.ndarray], batch_size: int = 256) -> float:
  """Accuracy (percent) or perplexity of ``apply(params, x)`` on ``data``."""
  @jax.jit
  def batch_stats(params, x, y):  # one program per batch: no stray eager collectives
    out = apply(params, x)
    counted = jnp.sum(y >= 0)  # labels < 0 are not targets (the hf task's prompts, padding)
    return (task.loss(out, y) * counted.astype(jnp.float32), jnp.sum(jnp.argmax(out, -1) == y),
            counted)

  x, y = data
  correct, nll, count = 0.0, 0.0, 0
  for start in range(0, len(x), batch_size):
    loss_sum, hits, counted = jax.device_get(batch_stats(params, x[start:start + batch_size],
                                                         y[start:start + batch_size]))
    nll += float(loss_sum)
    correct += float(hits)
    count += int(counted)
  return 100.0 * correct / count if task.metric == "accuracy" else math.exp(nll / count)


def _primary() -> bool:
  return jax.process_index() == 0


def _to_host(x: Any) -> np.ndarray:
  """An array's value on this host, also when it is spread over several processes."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _sharding(config: dict[str, Any]):
  """(put_batch, shard_params) for the configured mesh, or identity functions."""
  if not config["mesh"]:
    return (lambda b: b), (lambda p: p)
  from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  shape = (config["mesh"]["data"], config["mesh"]["model"])
  if math.prod(shape) > jax.device_count():
    raise ValueError(f"config key 'mesh': {shape} needs {math.prod(shape)} devices, JAX sees "
                     f"{jax.device_count()}. On CPU set XLA_FLAGS="
                     f"--xla_force_host_platform_device_count={math.prod(shape)} before JAX "
                     "starts.")
  mesh = jax.make_mesh(shape, ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)

  def spec(x):  # FSDP over "data" on the first axis, tensor-parallel "model" on the last
    if getattr(x, "ndim", 0) < 2:
      return P()
    first = "data" if x.shape[0] % shape[0] == 0 else None
    last = "model" if x.shape[-1] % shape[1] == 0 else None
    return P(first, *(None,) * (x.ndim - 2), last)

  def place(x):
    sharding = NamedSharding(mesh, spec(x))
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    # Several processes: each holds the whole value (every process loaded the same model) and
    # gives the shards its own devices hold; device_put cannot move a one-device array there.
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sharding)  # already global: a reshard
    return jax.make_array_from_callback(np.shape(x), sharding, lambda index: np.asarray(x[index]))

  put_batch = lambda b: jax.device_put(b, NamedSharding(mesh, P("data")))  # noqa: E731
  return put_batch, lambda p: jax.tree.map(place, p)


def run(config: dict[str, Any], *, echo: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs a job from ``load_job_config`` output; returns the metrics written to metrics.json.

  The run dir belongs to this job while it runs: a second job into the same run dir is
  refused at once (its metrics and adapters would mix with this one's). Every file the
  job writes is staged and committed whole (``atomic``).
  """
  run_dir = pathlib.Path(config["run_dir"])
  owner = (atomic.owned(run_dir.absolute(), "another lora-jax train job") if _primary()
           else contextlib.nullcontext())
  with owner:
    return _run(config, echo)


def _run(config: dict[str, Any], echo: Callable[[str], None]) -> dict[str, Any]:
  start = time.perf_counter()
  lora_config: LoraConfig = config["lora"]
  hf_model = None
  if config["task"] == "hf":
    from lora_jax._src.cli import hf_task  # pylint: disable=import-outside-toplevel

    task, lora_config, hf_model, _ = hf_task.build(config["model"], config["data"],
                                                    config["seed"], lora_config)
  else:
    task = TASKS[config["task"]](config["model"], config["data"], config["framework"],
                                 config["seed"])
  for name, (x, _) in (("fine-tuning", task.train), ("test", task.test)):
    if len(x) < 1:
      raise ValueError(f"config key 'data.test_fraction': {config['data']['test_fraction']} "
                       f"leaves no {name} examples.")
  run_dir = pathlib.Path(config["run_dir"])
  run_dir.mkdir(parents=True, exist_ok=True)
  put, shard = _sharding(config)
  key = jax.random.key(config["seed"])
  if config["quantize"]:  # refuse a config that cannot quantize before any training
    _quantized_base(jax.eval_shape(task.init, key), config["quantize"], lora_config)

  def full_loss(apply):
    return lambda p, x, y, key: task.loss(apply(p, x), y)

  curves: dict[str, list[float]] = {}
  if config["base_checkpoint"]:
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    abstract = jax.eval_shape(task.init, key)
    where = pathlib.Path(config["base_checkpoint"]).absolute()
    try:
      with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(where, abstract)
      recorded = checksums.read_folder_record(where)  # a base a job saved: verified whole
      if recorded is not None:
        checksums.check_record(dict(leaves_with_paths(params)), recorded,
                               f"config key 'base_checkpoint': {where}")
    except checksums.ChecksumError:
      raise
    except Exception as e:  # orbax raises many kinds for missing, damaged or other trees
      raise ValueError(f"config key 'base_checkpoint': cannot restore the base parameters of "
                       f"this task's model from {where} ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:300] if str(e) else ''}).") from e
  elif task.pretrain is None:  # the hf task: the folder's weights are the base
    params = task.init(key)
  else:
    params = shard(task.init(key))
    params, curves["pretrain"] = fit(full_loss(task.apply), params,
                                     optax.adam(config["pretrain"]["lr"]), task.pretrain,
                                     config["pretrain"], "pretrain", config["seed"], put)
    if config["save_base"]:  # a base an earlier run of this job saved is replaced, nothing else
      write_base((run_dir / "base").absolute(), params, kind="job base", overwrite=True,
                 ours=is_job_base, what="a base saved by lora-jax train (save_base)")
  params = shard(params)
  metrics: dict[str, Any] = {"task": config["task"], "metric": task.metric,
                             "base": evaluate(task, task.apply, params, task.test)}
  samples = {"base": task.sample(params, task.apply)} if task.sample else {}

  base = params
  if config["quantize"]:
    base = _quantized_base(params, config["quantize"], lora_config)
    s = summary(base, lora_config)
    metrics["quantize"] = {**config["quantize"], "targets": list(
        config["quantize"]["targets"] or lora_config.targets),
        "bits_per_param": 8 * s.quantized_bytes / s.quantized_params,
        "base_bytes": s.base_bytes, "full_precision_base_bytes": summary(
            params, lora_config).base_bytes}
    metrics["base_quantized"] = evaluate(task, task.apply, dequantize(base), task.test)
  lp = lift(base, lora_config, key=jax.random.fold_in(key, 1))
  apply = wrap(task.apply, lora_config)
  use_rng = config["finetune"]["dropout_rng"] and lora_config.dropout > 0

  def lora_loss(lp, x, y, key):
    return task.loss(apply(lp, x, lora_rng=key if use_rng else None), y)

  tx = optimizer(optax.adam(config["finetune"]["lr"]), lora_config,
                 lora_plus_ratio=config["finetune"]["lora_plus_ratio"],
                 freeze_a=config["finetune"]["freeze_a"])
  every = config["finetune"]["save_every"]
  resume = Resume(run_dir.absolute() / "state", every, lora_config) if every else None
  lp, curves["lora"] = fit(lora_loss, lp, tx, task.batches or task.train, config["finetune"],
                           "lora", config["seed"] + 1, put, resume=resume)
  metrics["lora"] = evaluate(task, apply, lp, task.test)
  merged = jax.block_until_ready(merge(lp, lora_config))
  probe = task.test[0][:64]
  merged_out = _to_host(jax.jit(task.apply)(merged, probe))
  adapted_out = _to_host(jax.jit(apply)(lp, probe))
  difference = float(np.max(np.abs(merged_out - adapted_out)))
  scale = float(np.max(np.abs(adapted_out))) + 1e-6
  metrics["merged_vs_adapted_max_abs_diff"] = difference
  if not difference <= 1e-3 * scale:  # NaN fails too
    raise RuntimeError(f"merged model differs from the adapted one by {difference:g} (outputs "
                       f"up to {scale:g}); nothing was saved.")
  # Everything this run trained: the adapters and the leaves trained in full.
  # (spread over several processes, the arrays are saved where they are, each process
  # writing its shards)
  save_adapters(run_dir / "adapters", lp if jax.process_count() > 1 else jax.device_get(lp),
                lora_config, overwrite=True)
  if task.sample:
    samples["lora"] = task.sample(lp, apply)
  if hf_model is not None:
    metrics["outputs"] = _hf_outputs(config, lp, lora_config, hf_model, run_dir)

  s = summary(lp, lora_config)
  metrics.update(trainable_params=s.trainable_params, base_params=s.base_params,
                 trainable_percent=s.trainable_percent)
  if config["full_finetune"]:
    full, curves["full"] = fit(full_loss(task.apply), params,
                               optax.adam(config["finetune"]["lr"] / 3), task.train,
                               config["finetune"], "full fine-tune", config["seed"] + 1, put)
    metrics["full"] = evaluate(task, task.apply, full, task.test)
  metrics.update(curves=curves, samples=samples, seconds=time.perf_counter() - start,
                 config={**config, "lora": lora_config.to_dict()})
  if _primary():
    metrics["tensorboard"] = write_events(curves, config, run_dir / "tensorboard")
    atomic.write_file(run_dir / "metrics.json", json.dumps(metrics, indent=2, default=str))
    write_loss_svg(curves, run_dir / "loss.svg", config["task"])
    _report(metrics, echo, run_dir)
  return metrics


def _hf_outputs(config: dict[str, Any], lp: Any, lora_config: LoraConfig, model: Any,
                run_dir: pathlib.Path) -> dict[str, str]:
  """The hf task's PEFT folder (names checked against the model folder) and merged folder."""
  from lora_jax._src.io.hf_merge import merge_hf  # pylint: disable=import-outside-toplevel
  from lora_jax._src.io.peft_format import save_peft  # pylint: disable=import-outside-toplevel

  outputs: dict[str, str] = {}
  if not (config["export"]["peft"] or config["export"]["merged"]):
    return outputs
  # Arrays spread over several processes are gathered by every process; process 0 writes.
  host_lp = jax.tree.map(_to_host, lp) if jax.process_count() > 1 else jax.device_get(lp)
  if not _primary():
    return outputs
  peft_dir = (run_dir / "peft").absolute()
  save_peft(peft_dir, host_lp, lora_config, module_name=model.name_map,
            target=model.folder, overwrite=True)
  outputs["peft"] = str(peft_dir)
  if config["export"]["merged"]:
    merge_hf(model.folder, peft_dir, (run_dir / "merged").absolute(), overwrite=True)
    outputs["merged"] = str((run_dir / "merged").absolute())
  return outputs


def logged_steps(total: int, every: int) -> list[int]:
  """The 1-based steps at which ``fit`` records the loss."""
  return [i + 1 for i in range(total) if i % max(1, every) == 0 or i == total - 1]


def write_events(curves: dict[str, list[float]], config: dict[str, Any],
                 folder: pathlib.Path) -> str:
  """TensorBoard event files of the loss curves (tensorboardX); what was done, in words."""
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  except ImportError:
    return 'not written: pip install tensorboardX (or "lora_jax[models]")'
  output = atomic.Output(folder.absolute(), overwrite=True,
                         ours=lambda p: all(f.name.startswith("events.out.tfevents.")
                                            for f in p.iterdir()),
                         what="TensorBoard event files written by lora-jax train")
  with output.staged() as stage:
    stage.path.mkdir()
    writer = SummaryWriter(str(stage.path))
    for phase, curve in curves.items():
      settings = config["pretrain"] if phase == "pretrain" else config["finetune"]
      every = settings.get("log_every", 25)
      for step, loss in zip(logged_steps(settings["steps"], every), curve):
        writer.add_scalar(f"loss/{phase}", loss, step)
    writer.close()
  return str(folder)


def _quantized_base(params: Any, settings: dict[str, Any], lora_config: LoraConfig) -> Any:
  try:
    return quantize(params, targets=settings["targets"] or lora_config.targets,
                    kind=settings["kind"], block_size=settings["block_size"],
                    double_quant=settings["double_quant"])
  except ValueError as e:
    why = str(e).removeprefix("quantize: ")
    raise ValueError(f"config key 'quantize': {why}\n(quantize.targets defaults to "
                     "lora.targets; set quantize.block_size or quantize.targets.)") from None


def run_job(config_path: str | pathlib.Path, overrides: list[str] | None = None
            ) -> dict[str, Any]:
  """Loads a job YAML (with ``key=value`` overrides) and runs it; see ``lora-jax train``."""
  return run(load_job_config(config_path, overrides))


def _report(metrics: dict[str, Any], echo: Callable[[str], None], run_dir: pathlib.Path) -> None:
  unit = "accuracy %" if metrics["metric"] == "accuracy" else "perplexity"
  rows = [("frozen base", f"{metrics['base']:.2f}", "0", "0")]
  lora = "LoRA"
  if "quantize" in metrics:
    q = metrics["quantize"]
    rows.append((f"{q['kind']} base ({q['bits_per_param']:.2f} bits/param)",
                 f"{metrics['base_quantized']:.2f}", "0", "0"))
    lora = f"QLoRA ({q['kind']} base)"
  rows.append((lora, f"{metrics['lora']:.2f}", f"{metrics['trainable_params']:,}",
               f"{metrics['trainable_percent']:.2f}"))
  if "full" in metrics:
    rows.append(("full fine-tune", f"{metrics['full']:.2f}", f"{metrics['base_params']:,}",
                 "100.00"))
  echo("")
  echo(format_table(("model", f"test {unit}", "trained params", "% of base"), rows,
                    right_from=1))
  for name, text in metrics["samples"].items():
    echo(f"\nsample ({name}): {text!r}")
  for name, where in metrics.get("outputs", {}).items():
    echo(f"{name}: {where}")
  echo(f"tensorboard: {metrics.get('tensorboard')}")
  echo(f"\nmerged vs adapted outputs: max |diff| = {metrics['merged_vs_adapted_max_abs_diff']:.2e}"
       f"; {metrics['seconds']:.0f} s; wrote {run_dir}/metrics.json, {run_dir}/loss.svg, "
       f"{run_dir}/adapters")
