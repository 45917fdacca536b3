"""Issue 24: the guarantees hold on every path (one staged writer, whole verified loads, one
checked safetensors reader, PEFT fields read as PEFT reads them, nothing run or hung by what a
file says, no traceback). Each test failed on main before the change."""

import json
import os
import pathlib
import re
import struct
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._src.cli import job
from lora_jax._src.cli.main import main as cli
from lora_jax._src.core.patterns import compile_safe
from lora_jax._src.core.yaml_io import load_yaml
from lora_jax._src.io import atomic
from lora_jax._src.io.hf_merge import merge_hf
from lora_jax._src.io.quantized_io import is_job_base, write_base
from lora_jax._src.io.safetensors_io import SafetensorsError, SafetensorsFile


def _lp(alpha=16.0, fill=None):
  config = lj.LoraConfig(rank=2, alpha=alpha, targets="kernel$")
  params = {"d": {"kernel": jnp.arange(32.0).reshape(4, 8) / 32}}
  lp = lj.lift(params, config, key=jax.random.key(0))
  if fill is not None:  # B filled with a tag, to tell two saves apart
    lp = lj.LoraParams(lp.base, {"d": {"kernel": {"a": lp.adapters["d"]["kernel"]["a"],
                                                  "b": jnp.full((2, 8), fill)}}})
  return lp, config


def _st_file(path, header, data=b""):
  raw = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
  return path


# --- 1. one staged writer ------------------------------------------------------------------


def test_job_base_never_replaces_a_users_folder(tmp_path):
  users = tmp_path / "base"
  users.mkdir()
  (users / "notes.txt").write_text("mine")
  params = {"w": jnp.ones(3)}
  with pytest.raises(FileExistsError, match="not a base saved by lora-jax train"):
    write_base(users, params, kind="job base", overwrite=True, ours=is_job_base,
               what="a base saved by lora-jax train")
  assert (users / "notes.txt").read_text() == "mine"
  ours = tmp_path / "ours"
  write_base(ours, params, kind="job base", overwrite=True, ours=is_job_base, what="x")
  write_base(ours, {"w": jnp.zeros(3)}, kind="job base", overwrite=True, ours=is_job_base,
             what="x")
  assert is_job_base(ours)


def test_train_state_refuses_a_folder_with_newer_steps(tmp_path):
  lp, config = _lp()
  for step in (100, 200, 300):
    lj.save_train_state(tmp_path / "run", step, {"a": lp.adapters}, config)
  with pytest.raises(FileExistsError, match=r"already holds step\(s\) \[100, 200, 300\], newer "
                     r"than step 10"):
    lj.save_train_state(tmp_path / "run", 10, {"a": lp.adapters}, config)
  assert sorted(int(p.name) for p in (tmp_path / "run").iterdir() if p.name.isdigit()) == [
      100, 200, 300]
  lj.save_train_state(tmp_path / "run", 400, {"a": lp.adapters}, config, max_to_keep=2)
  assert sorted(int(p.name) for p in (tmp_path / "run").iterdir() if p.name.isdigit()) == [
      300, 400]


def test_a_run_dir_is_owned_by_one_job(tmp_path):
  with atomic.owned(tmp_path / "run", "a lora-jax train job"):
    with pytest.raises(RuntimeError, match=r"in use by .* running as pid"):
      with atomic.owned(tmp_path / "run", "a lora-jax train job"):
        pass
  with atomic.owned(tmp_path / "run", "a lora-jax train job"):  # free again
    pass
  with atomic.owned((tmp_path / "run").absolute(), "a lora-jax train job"):
    # lora-jax train into a run dir another job holds: a one-line error, no traceback
    assert cli(["train", "--config", "configs/quickstart.yaml", "--set",
                f"run_dir={tmp_path / 'run'}"]) == 2


def test_write_file_is_atomic_and_never_replaces_a_folder(tmp_path):
  atomic.write_file(tmp_path / "m.json", "1")
  atomic.write_file(tmp_path / "m.json", "2")
  assert (tmp_path / "m.json").read_text() == "2"
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "x").write_text("keep")
  with pytest.raises(FileExistsError):
    atomic.write_file(tmp_path / "d", "3")
  assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
      "d", "m.json"]


# --- 2. a load returns one whole, verified version ------------------------------------------


def test_flipped_config_bit_is_refused(tmp_path):
  lp, config = _lp(alpha=16.0)
  path = lj.save_adapters(tmp_path / "ckpt", lp, config)
  stored = path / "config" / "metadata"
  text = stored.read_text()
  assert '"alpha": 16.0' in text
  stored.write_text(text.replace('"alpha": 16.0', '"alpha": 56.0'))  # one flipped bit
  with pytest.raises(lj.ChecksumError, match="config: its content changed"):
    lj.load_adapters(path)
  params = {"d": {"kernel": jnp.arange(32.0).reshape(4, 8) / 32}}
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as c:
    c.save(tmp_path / "base", params)
  assert cli(["merge", "--base", str(tmp_path / "base"), "--adapters", str(path), "--out",
              str(tmp_path / "out")]) == 2
  assert not (tmp_path / "out").exists()


def test_swapped_stack_names_and_null_fingerprint_are_refused(tmp_path):
  lp1, config = _lp(fill=1.0)
  lp2, _ = _lp(fill=2.0)
  stack, sconfig = lj.stack_adapters({"x": (lp1.adapters, config), "y": (lp2.adapters, config)})
  path = lj.save_adapters(tmp_path / "s", lj.LoraParams(lp1.base, stack), sconfig)
  names = path / "adapter_stack" / "metadata"
  names.write_text(names.read_text().replace('"x", "y"', '"y", "x"'))
  with pytest.raises(lj.ChecksumError, match="adapter_stack: its content changed"):
    lj.load_adapters(path)
  path = lj.save_adapters(tmp_path / "f", lp1, config)
  fp = path / "base_fingerprint" / "metadata"
  record = json.loads(fp.read_text())
  record["d/kernel"]["values"] = None
  fp.write_text(json.dumps(record))
  with pytest.raises(lj.ChecksumError, match="base_fingerprint: its content changed"):
    lj.load_adapters(path, base=lp1.base)


def test_quantized_base_codes_scales_and_record_are_verified(tmp_path):
  q = lj.quantize({"d": {"kernel": jnp.linspace(-1, 1, 4 * 128).reshape(4, 128)}},
                  targets="kernel")
  path = lj.save_quantized(tmp_path / "q", q)
  restored = lj.load_quantized(path)
  np.testing.assert_array_equal(restored["d"]["kernel"].codes, q["d"]["kernel"].codes)
  record = path / "lora_jax_quantization.json"
  text = record.read_text()
  record.write_text(text.replace('"block_size": 64', '"block_size": 32'))
  with pytest.raises(lj.ChecksumError, match="lora_jax_quantization.json: its content changed"):
    lj.load_quantized(path)
  record.write_text(text)
  # A doubled block scale: the arrays no longer match their recorded SHA-256.
  absmax = np.asarray(q["d"]["kernel"].arrays[1]).copy()
  absmax.reshape(-1)[0] = absmax.reshape(-1)[0] * 2 if absmax.dtype.kind == "f" else 7
  bad = q["d"]["kernel"].with_arrays((q["d"]["kernel"].codes, jnp.asarray(absmax),
                                      *q["d"]["kernel"].arrays[2:]))
  import orbax.checkpoint as ocp

  other = tmp_path / "tampered"
  with ocp.StandardCheckpointer() as c:  # same folder layout, the arrays written again
    c.save(other, {"d": {"kernel": bad}})
  for name in ("lora_jax_quantization.json", "lora_jax_checksums.json"):
    (other / name).write_bytes((path / name).read_bytes())
  with pytest.raises(lj.ChecksumError, match="d/kernel/absmax: its bytes changed"):
    lj.load_quantized(other)
  from lora_jax._src.io.streaming import open_base  # what lora-jax merge reads it with

  with pytest.raises(lj.ChecksumError, match="d/kernel/absmax: its bytes changed"):
    open_base(other).read(["d/kernel"])
  assert open_base(path).read(["d/kernel"])["d/kernel"].shape == (4, 128)


def test_reader_during_concurrent_overwrites_gets_one_whole_version(tmp_path):
  """A server reloading while a trainer saves: the config and arrays of one save."""
  versions = {16.0: 1.0, 32.0: 2.0}
  path = tmp_path / "ckpt"
  lp, config = _lp(alpha=16.0, fill=1.0)
  lj.save_adapters(path, lp.adapters, config)
  stop = threading.Event()

  def writer():
    i = 0
    while not stop.is_set():
      alpha = (16.0, 32.0)[i % 2]
      lp, config = _lp(alpha=alpha, fill=versions[alpha])
      lj.save_adapters(path, lp.adapters, config, overwrite=True)
      i += 1

  thread = threading.Thread(target=writer)
  thread.start()
  seen = set()
  try:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(seen) < 2 or len(seen) < 1:
      adapters, config = lj.load_adapters(path)
      fill = float(adapters["d"]["kernel"]["b"][0, 0])
      assert fill == versions[config.alpha], (config.alpha, fill)
      seen.add(config.alpha)
  finally:
    stop.set()
    thread.join()
  assert seen  # at least one whole version read (usually both)


def test_resume_with_another_config_is_refused(tmp_path):
  lp, config = _lp(alpha=16.0)
  lj.save_train_state(tmp_path / "run", 5, {"a": lp.adapters}, config)
  other = lj.LoraConfig(rank=2, alpha=32.0, targets="kernel$", use_rslora=True)
  with pytest.raises(lj.CheckpointMismatch, match=r"alpha: 32.0 given, 16.0 saved[\s\S]*"
                     r"use_rslora: True given, False saved"):
    lj.load_train_state(tmp_path / "run", {"a": lp.adapters}, config=other)
  with pytest.warns(UserWarning, match="another LoraConfig"):
    step, _ = lj.load_train_state(tmp_path / "run", {"a": lp.adapters}, config=other,
                                  allow_config_change=True)
  assert step == 5
  assert lj.load_train_state(tmp_path / "run", {"a": lp.adapters}, config=config)[0] == 5


def test_newest_step_missing_a_file_falls_back(tmp_path):
  lp, config = _lp()
  for step in (1, 2):
    lj.save_train_state(tmp_path / "run", step, {"a": lp.adapters}, config)
  (tmp_path / "run" / "2" / "checksums" / "metadata").unlink()
  with pytest.warns(UserWarning, match=r"resuming from step 1; skipped newer damaged step"):
    step, _ = lj.load_train_state(tmp_path / "run", {"a": lp.adapters}, config=config)
  assert step == 1


def test_lineage_says_what_it_could_not_compare(tmp_path):
  """Adapters trained on a float base, used over a quantized copy: said to be unchecked."""
  config = lj.LoraConfig(rank=2, targets="kernel$")
  params = {"d": {"kernel": jnp.linspace(-1, 1, 4 * 64).reshape(4, 64)}}
  lp = lj.lift(params, config, key=jax.random.key(0))
  path = lj.save_adapters(tmp_path / "ckpt", lp, config)
  quantized = lj.quantize(params, targets="kernel")
  with pytest.warns(UserWarning, match=r"could not be fully checked[\s\S]*d/kernel: shape only"):
    lj.load_adapters(path, base=quantized)
  lj.load_adapters(path, base=params)  # compared: no warning


# --- 3. one checked safetensors reader ------------------------------------------------------


@pytest.mark.parametrize("header, data, message", [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, b"", "data_offsets"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "v": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "shares bytes"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "data_offsets"),
    ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype 'Q4'"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "belong to no"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "non-negative"),
])
def test_bad_safetensors_headers_are_refused(tmp_path, header, data, message):
  path = _st_file(tmp_path / "x.safetensors", header, data)
  with pytest.raises(SafetensorsError, match=message):
    SafetensorsFile(path)


def test_duplicate_tensor_names_are_refused(tmp_path):
  raw = (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
         b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}')
  (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
  with pytest.raises(SafetensorsError, match="more than once"):
    SafetensorsFile(tmp_path / "x.safetensors")


def _hf_folder(folder, weight=None, dtype=np.float32):
  from safetensors.numpy import save_file

  folder.mkdir(parents=True, exist_ok=True)
  weight = np.arange(12, dtype=dtype).reshape(3, 4) if weight is None else weight
  save_file({"layer.weight": weight}, str(folder / "model.safetensors"),
            metadata={"format": "pt"})
  (folder / "config.json").write_text("{}")
  return folder


def _peft_folder(folder, **config):
  from safetensors.numpy import save_file

  folder.mkdir(parents=True, exist_ok=True)
  tensors = config.pop("tensors", None) or {
      "base_model.model.layer.lora_A.weight": np.ones((2, 4), np.float32),
      "base_model.model.layer.lora_B.weight": np.ones((3, 2), np.float32)}
  save_file(tensors, str(folder / "adapter_model.safetensors"))
  (folder / "adapter_config.json").write_text(json.dumps(
      {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["layer"], **config}))
  return folder


def test_index_entries_outside_the_folder_are_refused(tmp_path):
  base = _hf_folder(tmp_path / "base")
  (base / "model.safetensors").rename(tmp_path / "outside.safetensors")
  adapter = _peft_folder(tmp_path / "adapter")
  for shard in ("../outside.safetensors", str(tmp_path / "outside.safetensors")):
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"layer.weight": shard}}))
    with pytest.raises(ValueError, match="not a plain relative path"):
      merge_hf(base, adapter, tmp_path / "out")
  os.symlink(tmp_path / "outside.safetensors", base / "shard.safetensors")
  (base / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"layer.weight": "shard.safetensors"}}))
  with pytest.raises(ValueError, match="leads out of"):
    merge_hf(base, adapter, tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_merged_folder_holds_only_the_merged_model(tmp_path):
  base = _hf_folder(tmp_path / "base")
  adapter = _peft_folder(tmp_path / "adapter")
  (base / "pytorch_model.bin").write_bytes(b"unmerged")
  (base / "adapter_config.json").write_text("{}")  # transformers would load it on top
  (base / "original").mkdir()
  (base / "original" / "consolidated.00.pth").write_bytes(b"unmerged")
  (base / "original" / "params.json").write_text("{}")
  report = merge_hf(base, adapter, tmp_path / "out")
  assert sorted(report["not_copied"]) == ["adapter_config.json", "original/consolidated.00.pth",
                                          "pytorch_model.bin"]
  out = tmp_path / "out"
  assert not (out / "pytorch_model.bin").exists()
  assert not (out / "original" / "consolidated.00.pth").exists()
  assert (out / "original" / "params.json").exists()
  marker = (out / "lora_jax_merge.json").read_text()
  assert str(tmp_path) not in marker  # no local paths ship with an upload
  assert json.loads(marker)["adapters"]["sha256"]["adapter_model.safetensors"]
  # Both an index and a model.safetensors: refused, one of them would load instead.
  (base / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"layer.weight": "model.safetensors"}}))
  with pytest.raises(ValueError, match="holds both"):
    merge_hf(base, adapter, tmp_path / "out2")


def test_merge_overwrite_keeps_files_a_user_added(tmp_path):
  base = _hf_folder(tmp_path / "base")
  adapter = _peft_folder(tmp_path / "adapter")
  merge_hf(base, adapter, tmp_path / "out")
  merge_hf(base, adapter, tmp_path / "out", overwrite=True)  # our own output: replaced
  (tmp_path / "out" / "my_eval.txt").write_text("results")
  with pytest.raises(FileExistsError, match="holding only what that merge wrote"):
    merge_hf(base, adapter, tmp_path / "out", overwrite=True)
  assert (tmp_path / "out" / "my_eval.txt").read_text() == "results"


# --- 4. PEFT fields mean what they mean in PEFT, or are refused ----------------------------


@pytest.mark.parametrize("field, value", [("use_rslora", "true"), ("fan_in_fan_out", 1),
                                          ("use_dora", "false")])
def test_non_boolean_peft_flags_are_refused(tmp_path, field, value):
  base = _hf_folder(tmp_path / "base")
  adapter = _peft_folder(tmp_path / "adapter", **{field: value})
  with pytest.raises(ValueError, match=f"{field} is {value!r}, not true or false"):
    merge_hf(base, adapter, tmp_path / "out")
  with pytest.raises(ValueError, match=f"{field} is {value!r}, not true or false"):
    lj.load_peft(adapter, params={"layer": {"kernel": jnp.zeros((4, 3))}})


def test_peft_shapes_are_exact(tmp_path):
  base = _hf_folder(tmp_path / "base")
  tensors = {"base_model.model.layer.lora_A.weight": np.ones((2, 4), np.float32),
             "base_model.model.layer.lora_B.weight": np.ones((3, 2), np.float32),
             "base_model.model.layer.lora_magnitude_vector": np.ones((1,), np.float32)}
  adapter = _peft_folder(tmp_path / "dora", tensors=tensors, use_dora=True)
  with pytest.raises(ValueError, match=r"lora_magnitude_vector has shape \(1,\), expected "
                     r"\(3,\)"):
    merge_hf(base, adapter, tmp_path / "out")
  ints = _hf_folder(tmp_path / "ints", weight=np.ones((3, 4), np.int8))
  with pytest.raises(ValueError, match="int8, not floating point"):
    merge_hf(ints, _peft_folder(tmp_path / "plain"), tmp_path / "out")
  # A trained (modules_to_save) tensor stored transposed: refused, not reshaped into place.
  from safetensors.numpy import save_file

  save_file({"layer.weight": np.ones((3, 4), np.float32),
             "head.weight": np.arange(6, dtype=np.float32).reshape(2, 3)},
            str(base / "model.safetensors"), metadata={"format": "pt"})
  tensors = {"base_model.model.layer.lora_A.weight": np.ones((2, 4), np.float32),
             "base_model.model.layer.lora_B.weight": np.ones((3, 2), np.float32),
             "base_model.model.head.modules_to_save.weight":
                 np.zeros((3, 2), np.float32)}
  adapter = _peft_folder(tmp_path / "mts", tensors=tensors, modules_to_save=["head"])
  with pytest.raises(ValueError, match=r"shape \(3, 2\), base \(2, 3\)"):
    merge_hf(base, adapter, tmp_path / "out")


def test_hf_merge_flags(tmp_path):
  base = _hf_folder(tmp_path / "base")
  adapter = _peft_folder(tmp_path / "adapter")
  assert cli(["merge", "--base", str(base), "--adapters", str(adapter), "--out",
              str(tmp_path / "o"), "--format", "safetensors"]) == 2
  from safetensors.numpy import save_file

  save_file({"base_model.model.layer.lora_A.weight": np.full((2, 4), 1e30, np.float32),
             "base_model.model.layer.lora_B.weight": np.full((3, 2), 1e30, np.float32)},
            str(adapter / "adapter_model.safetensors"))
  assert cli(["merge", "--base", str(base), "--adapters", str(adapter), "--out",
              str(tmp_path / "o"), "--safe"]) == 2
  assert not (tmp_path / "o").exists()


# --- 5. nothing runs or hangs because of what a config or file says -------------------------


def test_job_config_cannot_choose_code_to_import():
  sys.modules.pop("antigravity", None)
  with pytest.raises(ValueError, match="'antigravity' is not one of the packages"):
    job.load_job_config(None, ["task=textcls", "data.pretrain_packages=[antigravity, email]"])
  assert "antigravity" not in sys.modules


@pytest.mark.parametrize("pattern", [r"(a+)+$", r"(a|aa)*$", r"(x*)*y", r"(.*)\1",
                                     r".*.*.*q_proj"])
def test_patterns_that_can_hang_are_refused(tmp_path, pattern):
  base = _hf_folder(tmp_path / "base")
  adapter = _peft_folder(tmp_path / "adapter", rank_pattern={pattern: 2})
  start = time.monotonic()
  with pytest.raises(ValueError, match="could take exponential time"):
    merge_hf(base, adapter, tmp_path / "out")
  with pytest.raises(ValueError, match="could take exponential time"):
    lj.LoraConfig(targets=pattern)
  assert time.monotonic() - start < 5


def test_ordinary_patterns_are_accepted():
  for pattern in (r"kernel$", r"layers_\d+/attn/(query|value)/kernel", r".*q_proj",
                  r"^params/Dense_[0-9]+/kernel$", r"(?:out|head)/kernel$"):
    compile_safe(pattern, "test")


# --- 7. no traceback for any input ----------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("pretrain.lr=null", r"'pretrain.lr': null is not a value here"),
    ("seed=18446744073709551616", r"'seed': must be an integer from 0 to 2\*\*31 - 1"),
    ("quantize.targets=['(kernel']", r"'quantize.targets': .* not a valid regular expression"),
])
def test_job_keys_give_one_line_errors(override, message):
  with pytest.raises(ValueError, match=message):
    job.load_job_config(None, [override])


def test_deep_yaml_is_refused():
  with pytest.raises(ValueError, match="nested 51 levels deep"):
    load_yaml("a: " + "[" * 10_000 + "]" * 10_000, "job.yaml")


def test_merge_of_a_name_the_stack_lacks(tmp_path, capsys):
  lp1, config = _lp(fill=1.0)
  stack, sconfig = lj.stack_adapters({"x": (lp1.adapters, config)})
  path = lj.save_adapters(tmp_path / "s", lj.LoraParams(lp1.base, stack), sconfig)
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as c:
    c.save(tmp_path / "base", lp1.base)
  for name in ("nope", "-1"):
    assert cli(["merge", "--base", str(tmp_path / "base"), "--adapters", str(path), "--out",
                str(tmp_path / "out"), f"--adapter={name}"]) == 2
    assert f"adapter={name!r} is not in the stack" in capsys.readouterr().err
  assert pathlib.Path(tmp_path / "out").exists() is False


def test_every_writer_goes_through_one_staged_commit():
  """Structural: locking, committing and replacing live in atomic.py alone; a writer that
  locked or committed by itself (or saved with orbax's force=True) would bypass the rule."""
  src = pathlib.Path(lj.__file__).parent / "_src"
  offenders = []
  for module in sorted(src.glob("*.py")):
    if module.name == "atomic.py":
      continue
    text = module.read_text()
    for needle in (r"atomic\.commit\(", r"atomic\.locked\(", r"atomic\.clean_stale\(",
                   r"\.save\([^)]*force=True", r"check_replaceable\(", r"os\.replace\(",
                   r"shutil\.rmtree\("):
      if re.search(needle, text):
        offenders.append(f"{module.name}: {needle}")
  assert not offenders, offenders


# --- 6. what we export is what PEFT computes ------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_tied_embedding_tables_are_not_exported_as_lookup_adapters(tmp_path, tied):
  """GPT-2/Gemma tie the token table to the output head; PEFT's embedding adapter changes the
  lookup only, so exporting it would give other logits: refused, where infer_axes saw the tie."""
  params = {"wte": {"embedding": jnp.ones((16, 8))}, "mid": {"kernel": jnp.ones((8, 8))},
            "head": {"kernel": jnp.ones((8, 16))}}

  def model(p, ids):
    h = p["wte"]["embedding"][ids] @ p["mid"]["kernel"]
    return h @ (p["wte"]["embedding"].T if tied else p["head"]["kernel"])

  ids = jax.ShapeDtypeStruct((2, 5), jnp.int32)
  config = lj.infer_axes(model, params, ids,
                         config=lj.LoraConfig(rank=2, targets=r"(embedding|mid/kernel)$"))
  assert config.head_tied_for("wte/embedding") is tied
  lp = lj.lift(params, config, key=jax.random.key(0))
  if tied:
    with pytest.raises(ValueError, match=r"wte/embedding: this embedding table is also the "
                       r"model's output head"):
      lj.save_peft(tmp_path / "peft", lp, config)
    assert not (tmp_path / "peft").exists()
  else:
    lj.save_peft(tmp_path / "peft", lp, config)  # known untied: exact, no warning
    lj.load_peft(tmp_path / "peft", params=params, head_tied=config.head_tied,
                 in_axes=config.in_axes)  # and back, no warning
    with pytest.raises(ValueError, match="applies an embedding adapter to the lookup only"):
      lj.load_peft(tmp_path / "peft", params=params, head_tied={"wte": True},
                   in_axes=config.in_axes)
    with pytest.warns(UserWarning, match="which PEFT applies to the lookup only"):
      lj.load_peft(tmp_path / "peft", params=params, in_axes=config.in_axes)
  plain = lj.LoraConfig(rank=2, targets=r"(embedding|mid/kernel)$", in_axes={"mid": 1})
  with pytest.warns(UserWarning, match="change the lookup only"):
    lj.save_peft(tmp_path / "p2", lj.lift(params, plain, key=jax.random.key(0)), plain)


@pytest.mark.parametrize("field, value, message", [
    ("init_lora_weights", "pissa_niter_4", "applies to the residual base"),
    ("init_lora_weights", "olora", "applies to the residual base"),
    ("use_bdlora", True, "block-diagonal LoRA"),
    ("ensure_weight_tying", True, "adapters tied across tied modules"),
])
def test_peft_variants_that_change_the_math_are_refused(tmp_path, field, value, message):
  base = _hf_folder(tmp_path / "base")
  adapter = _peft_folder(tmp_path / "adapter", **{field: value})
  with pytest.raises(ValueError, match=message):
    merge_hf(base, adapter, tmp_path / "out")
  with pytest.raises(ValueError, match=message):
    lj.load_peft(adapter, params={"layer": {"kernel": jnp.zeros((4, 3))}})


def test_two_modules_onto_one_tensor_are_refused(tmp_path):
  base = _hf_folder(tmp_path / "base")
  tensors = {f"base_model.model.{m}.lora_{x}.weight": np.ones(s, np.float32)
             for m in ("layer", "other") for x, s in (("A", (2, 4)), ("B", (3, 2)))}
  adapter = _peft_folder(tmp_path / "adapter", tensors=tensors)
  with pytest.raises(ValueError, match=r"both change the base tensor 'layer.weight'"):
    merge_hf(base, adapter, tmp_path / "out", tensor_name=lambda m: "layer")
  one = _peft_folder(tmp_path / "one")  # one module, two leaves named alike
  with pytest.raises(ValueError, match=r"module_name maps several leaves to it"):
    lj.load_peft(one, params={"layer": {"kernel": jnp.zeros((4, 3))},
                                "other": {"kernel": jnp.zeros((4, 3))}},
                   module_name=lambda path: "layer")


def test_an_adapter_and_a_full_weight_on_one_tensor_are_refused(tmp_path):
  base = _hf_folder(tmp_path / "base")
  tensors = {"base_model.model.layer.lora_A.weight": np.ones((2, 4), np.float32),
             "base_model.model.layer.lora_B.weight": np.ones((3, 2), np.float32),
             "base_model.model.layer.modules_to_save.weight": np.ones((3, 4), np.float32)}
  adapter = _peft_folder(tmp_path / "adapter", tensors=tensors)
  with pytest.raises(ValueError, match=r"both change the base tensor 'layer.weight'"):
    merge_hf(base, adapter, tmp_path / "out")
  with pytest.raises(ValueError, match=r"both map to the leaf layer/kernel"):
    lj.load_peft(adapter, params={"layer": {"kernel": jnp.zeros((4, 3))}},
                 in_axes={"layer": 1})
