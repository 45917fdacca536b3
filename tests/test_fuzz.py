"""Property-based tests of what comes from users and files (issue 24): safetensors headers,
PEFT folders, job configs and damaged checkpoints. Each property is the guarantee itself:
a clean ``ValueError`` (or ``OSError``) naming the problem, or the exact right result;
never a traceback, a hang or a silently different value."""

import json
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lora_jax as lj  # noqa: E402
from lora_jax._src.cli import job  # noqa: E402
from lora_jax._src.io.hf_merge import merge_hf  # noqa: E402
from lora_jax._src.io.safetensors_io import SafetensorsError, SafetensorsFile  # noqa: E402

# Reads of damaged checkpoints leave orbax coroutines that fail when garbage collected
# (orbax's clean-up, not ours), reported by pytest as unraisable: collected here.
pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.usefixtures("collect_orbax_leftovers")]


FAST = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

_NP = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8, "I64": np.int64,
       "BOOL": np.bool_}
_tensor = st.tuples(st.sampled_from(sorted(_NP)), st.lists(st.integers(0, 3), max_size=3))
_mutation = st.one_of(
    st.none(),
    st.tuples(st.just("offsets"), st.integers(0, 3), st.integers(-9, 9), st.integers(0, 1)),
    st.tuples(st.just("dtype"), st.integers(0, 3), st.sampled_from(["F32", "I8", "Q4", "F64"])),
    st.tuples(st.just("shape"), st.integers(0, 3), st.lists(st.integers(-1, 4), max_size=3)),
    st.tuples(st.just("data"), st.integers(-8, 8)),
    st.tuples(st.just("field"), st.integers(0, 3), st.sampled_from(["extra", "missing"])))


@FAST
@given(tensors=st.lists(_tensor, min_size=1, max_size=4), mutation=_mutation)
def test_safetensors_headers(tmp_path_factory, tensors, mutation):
  """A valid file, then at most one header or data mutation: the file reads back with every
  tensor exactly the bytes its header names inside the data section, or is refused with
  SafetensorsError. Unmutated, it reads back equal."""
  rng = np.random.default_rng(0)
  arrays, header, data = {}, {}, b""
  for i, (dtype, shape) in enumerate(tensors):
    value = (rng.integers(0, 2, size=shape) if dtype == "BOOL" else
             rng.integers(-100, 100, size=shape)).astype(_NP[dtype])
    arrays[f"t{i}"] = value
    header[f"t{i}"] = {"dtype": dtype, "shape": list(shape),
                       "data_offsets": [len(data), len(data) + value.nbytes]}
    data += value.tobytes()
  names = sorted(header)
  if mutation is not None:
    kind, *args = mutation
    if kind == "data":
      data = data[:args[0]] if args[0] < 0 else data + b"\0" * args[0]
    else:
      entry = header[names[args[0] % len(names)]]
      if kind == "offsets":
        entry["data_offsets"][args[2]] += args[1]
      elif kind == "dtype":
        entry["dtype"] = args[1]
      elif kind == "shape":
        entry["shape"] = args[1]
      elif args[1] == "extra":
        entry["extra"] = 1
      else:
        del entry["dtype"]
  raw = json.dumps(header).encode()
  path = tmp_path_factory.mktemp("st") / "x.safetensors"
  path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
  try:
    f = SafetensorsFile(path)
  except SafetensorsError:
    hypothesis.event("refused")
    assert mutation is not None
    return
  hypothesis.event("read")
  total = 0
  for name in f.names:
    value = f.read(name)
    info = header[name]
    assert list(value.shape) == info["shape"]
    begin, end = info["data_offsets"]
    assert 0 <= begin <= end <= len(data) and end - begin == value.nbytes
    assert value.tobytes() == data[begin:end]
    if mutation is None:
      np.testing.assert_array_equal(value, arrays[name])
    total += value.nbytes
  assert total == len(data)  # every byte belongs to exactly one tensor


def _hf(folder):
  from safetensors.numpy import save_file

  folder.mkdir(parents=True, exist_ok=True)
  save_file({"layer.weight": np.arange(12, dtype=np.float32).reshape(3, 4)},
            str(folder / "model.safetensors"), metadata={"format": "pt"})
  (folder / "config.json").write_text("{}")
  return folder


_peft_mutations = st.dictionaries(
    st.sampled_from(["peft_type", "r", "lora_alpha", "use_rslora", "use_dora",
                     "fan_in_fan_out", "rank_pattern", "alpha_pattern", "lora_bias", "bias"]),
    st.one_of(st.none(), st.booleans(), st.integers(-1, 5), st.floats(-2, 70),
              st.sampled_from(["true", "false", "1", "LORA", "IA3"]),
              st.dictionaries(st.sampled_from(["layer", "(a|aa)*", ".*", "["]),
                              st.integers(-1, 4), max_size=1)), max_size=2)
_shapes = st.sampled_from([(2, 4), (2, 4), (3, 2), (4, 2), (2, 3), (1,), (3,), (2, 4, 1)])


@FAST
@given(fields=_peft_mutations, a_shape=_shapes, b_shape=st.sampled_from([(3, 2), (3, 2), (2, 3)]),
       magnitude=st.sampled_from([None, None, (3,), (1,), (1, 3)]))
def test_peft_folders(tmp_path_factory, fields, a_shape, b_shape, magnitude):
  """A valid PEFT folder with up to two fields changed and maybe misshapen tensors: merged
  exactly as PEFT computes it (against the plain formula), or refused with ValueError and
  nothing written; never a traceback or another result."""
  from safetensors.numpy import save_file

  root = tmp_path_factory.mktemp("peft")
  base = _hf(root / "base")
  adapter = root / "adapter"
  adapter.mkdir()
  rng = np.random.default_rng(0)
  tensors = {"base_model.model.layer.lora_A.weight": rng.normal(size=a_shape).astype("f4"),
             "base_model.model.layer.lora_B.weight": rng.normal(size=b_shape).astype("f4")}
  if magnitude is not None:
    tensors["base_model.model.layer.lora_magnitude_vector"] = rng.uniform(
        1, 2, size=magnitude).astype("f4")
  save_file(tensors, str(adapter / "adapter_model.safetensors"))
  config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["layer"],
            **fields}
  (adapter / "adapter_config.json").write_text(json.dumps(config))
  try:
    merge_hf(base, adapter, root / "out")
  except ValueError:
    assert not (root / "out").exists()
    hypothesis.event("refused")
    return
  hypothesis.event("merged")
  # Accepted: it must be exactly what PEFT computes.
  assert a_shape == (2, 4) and b_shape == (3, 2) and config.get("use_dora") in (None, False, True)
  dora = config.get("use_dora") is True
  assert dora == (magnitude is not None) and magnitude in (None, (3,))
  pattern = {k: v for k, v in (config.get("rank_pattern") or {}).items()}
  r = next(iter(pattern.values())) if pattern else config["r"]
  alpha_pattern = config.get("alpha_pattern") or {}
  alpha = next(iter(alpha_pattern.values())) if alpha_pattern else config["lora_alpha"]
  scale = alpha / (np.sqrt(r) if config.get("use_rslora") else r)
  w = np.arange(12, dtype=np.float64).reshape(3, 4)
  b = tensors["base_model.model.layer.lora_B.weight"].astype(np.float64)
  a = tensors["base_model.model.layer.lora_A.weight"].astype(np.float64)
  want = w + scale * b @ a
  if config.get("fan_in_fan_out"):
    raise AssertionError("fan_in_fan_out=True does not fit a (3, 4) weight; should be refused")
  if dora:
    m = tensors["base_model.model.layer.lora_magnitude_vector"].astype(np.float64)
    want = want * (m / np.linalg.norm(want, axis=1))[:, None]
  got = SafetensorsFile(root / "out" / "model.safetensors").read("layer.weight")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


_job_values = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**40), st.floats(),
                        st.integers(1, 64), st.floats(1e-4, 1.0), st.sampled_from(
                            ["charlm", "digits", "textcls", "kernel$", "(a+)+$", "nf4", "["]),
                        st.text(max_size=8), st.lists(st.integers(-1, 3), max_size=3),
                        st.lists(st.sampled_from(["email", "xml", "antigravity"]), max_size=2),
                        st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
_job_keys = st.sampled_from(
    ["task", "seed", "run_dir", "save_base", "pretrain.lr", "pretrain.steps",
     "finetune.batch_size", "finetune.lora_plus_ratio", "finetune.freeze_a", "lora.rank",
     "lora.alpha", "lora.targets", "lora.rank_pattern", "mesh.data", "quantize",
     "quantize.targets", "quantize.block_size", "data.test_fraction", "model.hidden",
     "data.pretrain_packages", "model.heads", "unknown", "lora.use_dora"])


@settings(max_examples=150, deadline=None)
@given(items=st.dictionaries(_job_keys, _job_values, max_size=4))
def test_job_configs(items):
  """Any job config is validated into a config or refused with one ValueError naming a key."""
  overrides = [f"{k}={json.dumps(v)}" for k, v in items.items()]
  try:
    config = job.load_job_config(None, overrides)
  except ValueError as e:
    assert str(e) and "\n" not in str(e).split(":")[0]
    hypothesis.event("refused")
    return
  hypothesis.event("accepted")
  assert isinstance(config["lora"], lj.LoraConfig)
  assert config["seed"] is not None and 0 <= config["seed"] < 2**31
  for key in ("lr",):
    assert config["pretrain"][key] is not None and config["pretrain"][key] > 0


def _saved(tmp_path):
  config = lj.LoraConfig(rank=2, alpha=16.0, targets="kernel$", trainable="bias$")
  params = {"d": {"kernel": jnp.arange(32.0).reshape(4, 8) / 32, "bias": jnp.ones(8)}}
  lp = lj.lift(params, config, key=jax.random.key(0))
  lp = lj.LoraParams(lp.base, jax.tree.map(lambda v: v + 0.5, lp.adapters))
  path = lj.save_adapters(tmp_path / "pristine", lp, config)
  loaded, _ = lj.load_adapters(path)
  return path, loaded, config


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 10**6), offset=st.integers(0, 10**6), bit=st.integers(0, 7),
       truncate=st.booleans())
def test_damaged_checkpoints(tmp_path_factory, which, offset, bit, truncate):
  """One flipped bit or a cut file anywhere in a checkpoint: refused, or loaded equal."""
  root = tmp_path_factory.mktemp("ckpt")
  if not hasattr(test_damaged_checkpoints, "saved"):
    test_damaged_checkpoints.saved = _saved(tmp_path_factory.mktemp("orig"))
  pristine, want, config = test_damaged_checkpoints.saved
  path = root / "ckpt"
  shutil.copytree(pristine, path)
  files = sorted(p for p in path.rglob("*") if p.is_file() and p.stat().st_size)
  target = files[which % len(files)]
  data = bytearray(target.read_bytes())
  if truncate:
    data = data[:offset % len(data)]
  else:
    data[offset % len(data)] ^= 1 << bit
  target.write_bytes(bytes(data))
  try:
    got, got_config = lj.load_adapters(path)
  except (ValueError, OSError):
    hypothesis.event("refused")
    return
  hypothesis.event("loaded equal")
  assert got_config == config
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               got, want)
