"""lora-jax train: config validation, and every example's config run at a tiny size."""

import json
import pathlib

import jax
import pytest

import lora_jax as lj
from lora_jax._src.cli.job import run
from lora_jax._src.cli.main import main as cli

pytestmark = pytest.mark.slow  # whole lora-jax train jobs

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_LM = ["model.d_model=16", "model.heads=2", "model.mlp=32", "model.max_len=16",
           "model.layers=2"]
TINY = ["pretrain.steps=3", "finetune.steps=3", "pretrain.batch_size=8",
        "finetune.batch_size=8"]


@pytest.mark.parametrize("name, extra", [
    pytest.param("digits", [], marks=pytest.mark.oldest), ("digits_nnx", []),
    ("textcls", TINY_LM), ("charlm", TINY_LM),
    ("digits", ["finetune.lora_plus_ratio=16", "finetune.freeze_a=true"]),
    ("digits", ["lora.init=pissa"]), ("digits", ["lora.use_dora=true"]),
    ("charlm_scan", TINY_LM), pytest.param("charlm_mesh", TINY_LM, marks=pytest.mark.oldest)])
def test_example_configs_run_tiny(tmp_path, name, extra, capsys):
  config = lj.load_job_config(ROOT / "configs" / f"{name}.yaml",
                              [*TINY, *extra, f"run_dir={tmp_path}"])
  metrics = run(config)
  written = json.loads((tmp_path / "metrics.json").read_text())
  assert written["lora"] == pytest.approx(metrics["lora"])
  assert {"base", "lora", "full", "trainable_params", "curves"} <= set(written)
  assert (tmp_path / "loss.svg").stat().st_size > 1000
  # Everything the run trained is in its checkpoint: adapters and leaves trained in full.
  loaded, _ = lj.load_adapters(tmp_path / "adapters")
  saved = sum(x.size for x in jax.tree.leaves(loaded))
  assert saved == written["trainable_params"]
  assert written["merged_vs_adapted_max_abs_diff"] < 1e-3
  out = capsys.readouterr().out
  assert "frozen base" in out and "LoRA" in out and "full fine-tune" in out


def test_variants_example_shares_one_base(tmp_path, capsys):
  """examples/lora_variants.py at a tiny size: one pretraining, the others fine-tune from it."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("lora_variants",
                                                ROOT / "examples" / "lora_variants.py")
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  assert list(example.VARIANTS) == ["LoRA", "DoRA", "PiSSA", "LoRA+ (ratio 16)",
                                    "LoRA+ (ratio 16, lr / 4)"]
  rows = example.main([*TINY, *TINY_LM, f"run_dir={tmp_path}"],
                      names=["LoRA", "DoRA", "LoRA+ (ratio 16, lr / 4)"])
  assert [r[0] for r in rows] == ["LoRA", "DoRA", "LoRA+ (ratio 16, lr / 4)"]
  assert (tmp_path / "variants" / "LoRA" / "base").is_dir()
  curves = {name: json.loads((tmp_path / "variants" / name / "metrics.json").read_text())
            for name in ("DoRA", "LoRAplusratio16lr_over_4")}
  assert all("pretrain" not in m["curves"] for m in curves.values())  # the saved base reused
  assert curves["DoRA"]["config"]["lora"]["use_dora"] is True
  assert int(rows[1][2].replace(",", "")) > int(rows[0][2].replace(",", ""))  # + magnitudes
  assert "variant" in capsys.readouterr().out


def test_quickstart_lora_beats_frozen_base(tmp_path):
  """The README's main command, at full size: LoRA clearly beats the frozen base."""
  metrics = lj.run_job(ROOT / "configs" / "quickstart.yaml", [f"run_dir={tmp_path}"])
  assert metrics["base"] < 30.0
  assert metrics["lora"] > 85.0
  assert metrics["seconds"] < 180


@pytest.mark.parametrize("override, match", [
    ("finetune.stepz=3", r"unknown config key 'finetune.stepz'; allowed keys here: "
                         r"\['batch_size', 'dropout_rng', 'freeze_a', 'log_every', "
                         r"'lora_plus_ratio', 'lr', 'save_every', 'steps'\]"),
    ("finetune.lora_plus_ratio=0",
     r"config key 'finetune.lora_plus_ratio': must be a finite number > 0, got 0"),
    ("task=vision", r"config key 'task': 'vision' is not one of \['digits', 'charlm', "
                    r"'textcls', 'hf'\]"),
    ("data.shift=mirror", r"config key 'data.shift': 'mirror' is not one of"),
    ("pretrain.steps=many", r"config key 'pretrain.steps': expected int, got 'many'"),
    ("lora.rank=0", r"LoraConfig.rank must be a positive integer, got 0"),
    ("lora.ranks=4", r"Unknown LoraConfig key\(s\) \['ranks'\]"),
    ("model.width=3", r"unknown config key 'model.width'; allowed keys here: \['hidden'\]"),
    ("framework=torch", r"config key 'framework': 'torch' is not one of \['linen', 'nnx'\]"),
    ("steps", r"--set expects key=value, got 'steps'"),
    ("quantize=int4", r"config key 'quantize.kind': 'int4' is not one of \['nf4', 'int8'\]"),
    ("quantize.block_size=0", r"config key 'quantize.block_size': got 0; expected int >= 1"),
    ("quantize.bits=4", r"unknown config key 'quantize.bits'; allowed keys here"),
    ("quantize=[nf4]", r"config key 'quantize': expected nf4, int8 or a mapping"),
])
def test_bad_config_values_name_the_key(override, match):
  with pytest.raises(ValueError, match=match):
    lj.load_job_config(ROOT / "configs" / "quickstart.yaml", [override])


def test_cli_reports_config_errors(capsys):
  assert cli(["train", "--config", str(ROOT / "configs" / "quickstart.yaml"),
              "--set", "finetune.lr=fast"]) == 2
  assert "config key 'finetune.lr': expected float, got 'fast'" in capsys.readouterr().err


def test_mesh_needs_devices_message():
  config = lj.load_job_config(ROOT / "configs" / "charlm_mesh.yaml", ["mesh.model=64"])
  with pytest.raises(ValueError, match=r"needs 128 devices, JAX sees 8\. On CPU set XLA_FLAGS"):
    run(config)


def test_quickstart_checkpoint_holds_everything_trained(tmp_path, capsys):
  """Before: the checkpoint held 5,632 of the 7,306 parameters the quickstart trains."""
  lj.run_job(ROOT / "configs" / "quickstart.yaml",
             ["pretrain.steps=2", "finetune.steps=2", f"run_dir={tmp_path}"])
  table = capsys.readouterr().out
  assert "LoRA" in table and "7,306" in table
  assert cli(["inspect", str(tmp_path / "adapters")]) == 0
  out = capsys.readouterr().out
  assert "5,632 adapter parameters" in out
  assert "7,306 trained parameters in all" in out
  assert "params/head/kernel" in out and "params/Dense_0/bias" in out


def test_cli_version_help_and_required_config(capsys):
  with pytest.raises(SystemExit) as done:
    cli(["--version"])
  assert done.value.code == 0 and capsys.readouterr().out.startswith("lora-jax 0.")
  with pytest.raises(SystemExit) as done:
    cli(["train"])
  assert done.value.code == 2
  assert "the following arguments are required: --config" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli(["--help"])
  assert "lora-jax train --config configs/quickstart.yaml" in capsys.readouterr().out


def test_qlora_config_runs_tiny(tmp_path, capsys):
  """configs/charlm_qlora.yaml at a tiny size: an NF4 base trains, merges and is reported."""
  config = lj.load_job_config(ROOT / "configs" / "charlm_qlora.yaml",
                              [*TINY, *TINY_LM, "quantize.block_size=8", f"run_dir={tmp_path}"])
  metrics = run(config)
  q = metrics["quantize"]
  assert q["kind"] == "nf4" and q["targets"] == list(config["lora"].targets)
  assert 4.0 < q["bits_per_param"] < 5.5  # 4 + 8/8 (double-quantized scales) + groups
  assert q["base_bytes"] < q["full_precision_base_bytes"]
  assert metrics["merged_vs_adapted_max_abs_diff"] < 1e-3
  loaded, _ = lj.load_adapters(tmp_path / "adapters")
  assert sum(x.size for x in jax.tree.leaves(loaded)) == metrics["trainable_params"]
  out = capsys.readouterr().out
  assert "nf4 base (" in out and "QLoRA (nf4 base)" in out


def test_quantize_key_refused_before_training(tmp_path):
  """A quantization that cannot apply fails at the start, naming the leaf and the key."""
  config = lj.load_job_config(ROOT / "configs" / "quickstart.yaml",
                              ["quantize.block_size=48", f"run_dir={tmp_path}"])
  with pytest.raises(ValueError, match=r"(?s)config key 'quantize': cannot.*Dense_0/kernel: shape "
                                       r"\(64, 256\); blocks of 48"):
    run(config)
  assert not (tmp_path / "metrics.json").exists()


def test_hf_task_without_the_zoo_says_what_to_install(tmp_path, monkeypatch, capsys):
  """The plain install: the hf task names the extra instead of a traceback."""
  import json
  import sys

  from lora_jax._src.cli.main import main
  for name in ("tunix", "tunix.models"):
    monkeypatch.setitem(sys.modules, name, None)  # any import of them now raises ImportError
  folder = tmp_path / "model"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
  data = tmp_path / "data.jsonl"
  data.write_text('{"text": "hello"}\n')
  config = tmp_path / "job.yaml"
  config.write_text(f"model: {{hf: {folder}}}\ndata: {{jsonl: {data}}}\n"
                    f"run_dir: {tmp_path / 'run'}\n")
  assert main(["train", "--config", str(config)]) == 2
  assert 'pip install "lora_jax[models]"' in capsys.readouterr().err


def test_previous_quantize_dtype_key_still_works():
  from lora_jax._src.cli.job import _quantize_config
  with pytest.warns(FutureWarning, match="quantize.kind"):
    assert _quantize_config({"dtype": "int8"})["kind"] == "int8"
  with pytest.raises(ValueError, match="both set"):
    _quantize_config({"dtype": "int8", "kind": "nf4"})
