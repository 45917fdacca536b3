"""Real models: HF checkpoint -> Tunix loader -> lift -> export -> PyTorch PEFT, and back.

Each family is a tiny random model built and saved by transformers itself; the names, layouts
and fused kernels are checked against the real transformers and peft packages, never against
our reading of them. Skipped where google-tunix (``pip install "lora_jax[models]"``) or torch is
not installed.
"""

from __future__ import annotations

import functools
import json
import re

import hf_tiny
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj

pytest.importorskip("tunix.models")
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.slow  # Tunix, transformers and PEFT interop; whole jobs in subprocesses

TARGETS = r"(q_proj|k_proj|v_proj|o_proj|q_einsum|kv_einsum|qkv_einsum|attn_vec_einsum|" \
          r"gate_proj|up_proj|down_proj)/(w|kernel)$"
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = np.random.RandomState(0).randint(0, hf_tiny.SMALL["vocab_size"], (2, 7))
# float32 on both sides. The two frameworks sum in other orders; Tunix's Gemma 2 forward differs
# from transformers' by up to 5e-5 where attention logits grow (the base model alone shows it),
# so PEFT-vs-ours uses this bound, and the conversion itself is checked exactly (EXACT) through
# PEFT's merged weights loaded back into Tunix.
ATOL = {"gemma2": 1e-4, "gemma2_gqa": 1e-4}
EXACT = 1e-5


@pytest.fixture(scope="module", params=hf_tiny.FAMILIES)
def family(request, tmp_path_factory):
  folder = tmp_path_factory.mktemp(request.param)
  torch_model = hf_tiny.save(request.param, folder)
  model = lj.load_hf(folder)
  return request.param, folder, torch_model, model, _lora_config(model)


def _lora_config(model) -> lj.LoraConfig:
  """LoRA on every attention and MLP projection, axes read from the model."""
  return lj.infer_axes(lambda p, t: model.apply(p, t)[0], model.params,
                       jax.ShapeDtypeStruct(TOKENS.shape, jnp.int32),
                       config=lj.LoraConfig(rank=4, alpha=8.0, targets=TARGETS))


def _randomized(lp: lj.LoraParams, key) -> lj.LoraParams:
  """Nonzero B everywhere, so every adapter changes the output."""
  leaves, treedef = jax.tree.flatten(lp.adapters)
  keys = jax.random.split(key, len(leaves))
  leaves = [0.05 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  return lj.LoraParams(lp.base, jax.tree.unflatten(treedef, leaves))


def _ours(model, config, lp) -> np.ndarray:
  apply = lj.wrap(lambda p, t: model.apply(p, t)[0], config)
  return np.asarray(jax.jit(apply)(lp, jnp.asarray(TOKENS)))


def _fresh_torch(name: str, folder):
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def _assert_same_weights(torch_model, ours: np.ndarray, folder) -> None:
  """The conversion, exactly: Tunix running PEFT's merged weights computes our logits."""
  torch_model.save_pretrained(folder, safe_serialization=True)
  tunix_model = lj.load_hf(folder)
  logits = np.asarray(tunix_model.apply(tunix_model.params, jnp.asarray(TOKENS))[0])
  np.testing.assert_allclose(logits, ours, atol=EXACT, rtol=0)


def test_loader_equals_transformers(family):
  name, _, torch_model, model, _ = family
  ours = np.asarray(model.apply(model.params, jnp.asarray(TOKENS))[0])
  np.testing.assert_allclose(ours, hf_tiny.torch_logits(torch_model, TOKENS), atol=2e-5, rtol=0)


def test_export_loads_in_peft_equal(family, tmp_path):
  name, folder, _, model, config = family
  lp = _randomized(lj.lift(model.params, config, key=jax.random.key(0)), jax.random.key(1))
  ours = _ours(model, config, lp)
  assert np.abs(ours - np.asarray(model.apply(model.params, jnp.asarray(TOKENS))[0])).max() > 0.1
  out = lj.save_peft(tmp_path / "peft", lp, config, module_name=model.name_map, target=folder)
  written = json.loads((out / "adapter_config.json").read_text())["target_modules"]
  assert all(m.split(".")[-1] in HF_TARGETS for m in written), written
  peft_model = peft.PeftModel.from_pretrained(_fresh_torch(name, folder), out).eval()
  atol = ATOL.get(name, 2e-5)
  np.testing.assert_allclose(hf_tiny.torch_logits(peft_model, TOKENS), ours, atol=atol, rtol=0)
  merged = peft_model.merge_and_unload()
  np.testing.assert_allclose(hf_tiny.torch_logits(merged, TOKENS), ours, atol=atol, rtol=0)
  _assert_same_weights(merged, ours, tmp_path / "merged")
  # ... and reads back as the same adapter (fused kernels joined over their shared A).
  adapters, back = lj.load_peft(out, params=model.params, module_name=model.name_map,
                                in_axes=dict(config.in_axes))
  assert back.rank_pattern == ()
  np.testing.assert_allclose(_ours(model, back, lj.LoraParams(model.params, adapters)), ours,
                             atol=EXACT, rtol=0)


def test_peft_made_adapter_imports_equal(family, tmp_path):
  name, folder, _, model, config = family
  torch.manual_seed(0)
  peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=HF_TARGETS,
                                init_lora_weights=False)
  peft_model = peft.get_peft_model(_fresh_torch(name, folder), peft_config).eval()
  peft_model.save_pretrained(tmp_path / "made")
  adapters, imported = lj.load_peft(tmp_path / "made", params=model.params,
                                    module_name=model.name_map, in_axes=dict(config.in_axes))
  ours = _ours(model, imported, lj.LoraParams(model.params, adapters))
  np.testing.assert_allclose(ours, hf_tiny.torch_logits(peft_model, TOKENS),
                             atol=ATOL.get(name, 2e-5), rtol=0)
  _assert_same_weights(peft_model.merge_and_unload(), ours, tmp_path / "merged")


def test_default_names_are_refused_against_the_model(family, tmp_path):
  """The silent failure this replaces: Flax-style default names PEFT would skip with a warning."""
  _, folder, _, model, config = family
  lp = lj.lift(model.params, config, key=jax.random.key(0))
  with pytest.raises(ValueError, match="match nothing in the target model"):
    lj.save_peft(tmp_path / "peft", lp, config, target=folder)
  assert not (tmp_path / "peft").exists()


def test_map_without_a_rule_is_refused(tmp_path):
  lp = lj.LoraParams({"odd": {"kernel": jnp.ones((4, 3))}},
                     {"odd": {"kernel": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 3))}}})
  config = lj.LoraConfig(rank=2, targets=r"kernel$", in_axes={r"kernel$": (0,)})
  with pytest.raises(ValueError, match="tunix/llama3 name map gives no PyTorch module"):
    lj.save_peft(tmp_path / "p", lp, config, module_name=lj.name_map("tunix/llama3"))


def test_unsupported_config_is_refused(tmp_path):
  """google-tunix 0.1.6's Llama 3 ignores rope_theta; loading would differ from transformers."""
  import transformers
  config = transformers.LlamaConfig(**dict(hf_tiny.SMALL, num_key_value_heads=2,
                                           rope_theta=500000.0))
  transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
  from lora_jax._src.io import zoo
  applied = zoo._rope_base_applied(zoo._tunix("llama3.model"), "rope_theta")
  if applied in (None, 500000.0):
    pytest.skip("this google-tunix release applies the config's rope_theta")
  with pytest.raises(ValueError, match="rope_theta is 500000"):
    lj.load_hf(tmp_path)


def test_stray_weight_file_is_refused(family, tmp_path):
  import shutil
  _, folder, _, _, _ = family
  copy = tmp_path / "copy"
  shutil.copytree(folder, copy)
  shutil.copy(copy / "model.safetensors", copy / "adapter_model.safetensors")
  with pytest.raises(ValueError, match="adapter_model.safetensors"):
    lj.load_hf(copy)


def test_readme_recipe_runs(family, tmp_path):
  """docs/huggingface.md's training-loop block, on each family's folder."""
  import pathlib
  import re
  _, folder, _, _, _ = family
  text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "huggingface.md").read_text()
  (block,) = re.findall(r"```python tunix\n(.*?)```", text, flags=re.S)
  namespace = {"HF_FOLDER": folder, "PEFT_FOLDER": tmp_path / "peft"}
  with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes float and int32
    exec(compile(block, "docs/huggingface.md", "exec"), namespace)  # noqa: S102
  assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_sampler_greedy_equals_merged_and_mixed_ids_equal_alone(name, tmp_path):
  hf_tiny.save(name, tmp_path)
  model = lj.load_hf(tmp_path)
  config = _lora_config(model)
  adapters = [_randomized(lj.lift(model.params, config, key=jax.random.key(i)),
                          jax.random.key(10 + i)) for i in range(2)]
  prompts = [[5, 9, 3, 7, 2, 11], [4, 8], [1, 2, 3]]
  lp = adapters[0]
  ours = lj.generate(model, lp, prompts, config=config, max_new_tokens=6)
  with jax.numpy_dtype_promotion("standard"):
    merged = lj.merge(lp, config)
  np.testing.assert_array_equal(ours, lj.generate(model, merged, prompts, max_new_tokens=6))
  # Left padding is invisible: a prompt alone generates what it generates in the batch.
  np.testing.assert_array_equal(ours[1:2], lj.generate(model, lp, prompts[1:2], config=config,
                                                       max_new_tokens=6))
  # ... and the first token is the full forward pass's argmax.
  logits = np.asarray(_ours_on(model, config, lp, np.asarray([prompts[0]])))
  assert ours[0, 0] == logits[0, -1].argmax()
  # Mixed batch: each sequence with its own adapter (or the base) equals that adapter alone.
  stack, stack_config = lj.stack_adapters({"a": (adapters[0].adapters, config),
                                           "b": (adapters[1].adapters, config)})
  mixed = lj.generate(model, lj.LoraParams(model.params, stack), prompts, config=stack_config,
                      adapter_ids=[1, 0, -1], max_new_tokens=6)
  np.testing.assert_array_equal(mixed[0], lj.generate(model, adapters[1], prompts[:1],
                                                      config=config, max_new_tokens=6)[0])
  np.testing.assert_array_equal(mixed[1], ours[1])
  np.testing.assert_array_equal(mixed[2], lj.generate(model, model.params, prompts[2:],
                                                      max_new_tokens=6)[0])
  sampled = lj.generate(model, lp, prompts, config=config, max_new_tokens=4, temperature=0.8,
                        top_k=5, top_p=0.9, key=jax.random.key(3))
  assert sampled.shape == (3, 4) and sampled.min() >= 0


class _DigitTokenizer:
  """What Tunix's Sampler asks of a tokenizer: one token per character."""

  def encode(self, text, **_):
    return [3 + ord(c) % 40 for c in text]

  def decode(self, ids, **_):
    return " ".join(map(str, ids))

  def bos_id(self):
    return 1

  def eos_id(self):
    return 2

  def pad_id(self):
    return 0


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_tunix_sampler_runs_the_adapters_unmerged(name, tmp_path):
  """docs/huggingface.md's recipe: Tunix's Sampler on lj.nnx_module equals the merged model."""
  from tunix.generate import sampler as tunix_sampler
  hf_tiny.save(name, tmp_path)
  model = lj.load_hf(tmp_path)
  config = _lora_config(model)
  lp = _randomized(lj.lift(model.params, config, key=jax.random.key(0)), jax.random.key(1))
  cache = tunix_sampler.CacheConfig(cache_size=32, num_layers=model.config.num_layers,
                                    num_kv_heads=model.config.num_kv_heads,
                                    head_dim=model.config.head_dim)
  prompts = ["31415926", "27"]

  def sample(module):
    with jax.numpy_dtype_promotion("standard"):  # Tunix's models need it
      # (No return_logits: Tunix's Llama 3 reports embed_dim as num_embed, which sizes it.)
      return tunix_sampler.Sampler(module, _DigitTokenizer(), cache)(
          prompts, max_generation_steps=6, eos_tokens=[]).tokens

  with jax.numpy_dtype_promotion("standard"):
    merged = lj.merge(lp, config)
  tokens = sample(lj.nnx_module(model, lp, config))
  base_tokens = sample(model.module(model.params))
  for ours, merged_tokens in zip(tokens, sample(model.module(merged))):
    np.testing.assert_array_equal(ours, merged_tokens)
  assert all(len(t) == 6 for t in tokens)
  assert any(not np.array_equal(o, b) for o, b in zip(tokens, base_tokens))
  if name == "llama":  # the recipe in docs/huggingface.md, as written
    import pathlib
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "huggingface.md").read_text()
    (block,) = re.findall(r"```python tunix-sampler\n(.*?)```", text, flags=re.S)
    namespace = {"model": model, "lp": lp, "config": config, "lj": lj,
                 "TOKENIZER": _DigitTokenizer()}
    with jax.numpy_dtype_promotion("standard"):
      exec(compile(block, "docs/huggingface.md", "exec"), namespace)  # noqa: S102
    assert isinstance(namespace["module"], lj.LoraModule)


def _ours_on(model, config, lp, tokens):
  apply = lj.wrap(lambda p, t: model.apply(p, t)[0], config)
  return jax.jit(apply)(lp, jnp.asarray(tokens))


# --- lora-jax train on a Hugging Face folder and a JSONL file -------------------------------

def test_textdata_targets_are_completions_and_assistant_turns(tmp_path):
  from lora_jax._src.cli import textdata
  hf_tiny.save_tokenizer(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
  tokenizer = textdata.Tokenizer(tmp_path)

  def targets(record):
    ids, target = textdata.tokenize({"where": "t", **record}, tokenizer)
    return "".join(tokenizer.tokenizer.id_to_token(i) if t else "_" for i, t in zip(ids, target))

  assert targets({"prompt": "Q: hi ", "completion": "A: yo"}).endswith("A: yo</s>")
  assert targets({"prompt": "Q: hi ", "completion": "A: yo"}).startswith("_______A")
  chat = targets({"messages": [{"role": "user", "content": "2+2?"},
                               {"role": "assistant", "content": "4"},
                               {"role": "user", "content": "3+3?"},
                               {"role": "assistant", "content": "6"}]})
  assert chat.replace("_", "") == "4</s>6</s>", chat
  assert targets({"text": "ab"}) == "_ab</s>"  # BOS is context; every text token a target
  x, y = textdata.pack([textdata.tokenize({"where": "t", "text": "abcdef"}, tokenizer)], 4)
  assert x.shape == y.shape == (2, 4) and (y[x == 0] == -1).all()
  np.testing.assert_array_equal(y[0], x.reshape(-1)[1:5])


@pytest.mark.parametrize("line, match", [
    ('{"text": "a", "prompt": "b"}', "exactly one of"),
    ('{"prompt": "a"}', "exactly one of"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"text": 3}', "must be strings"),
    ("[1, 2]", "exactly one of"),
    ("{oops", "not a JSON object"),
])
def test_bad_records_are_refused_with_their_line(tmp_path, line, match):
  from lora_jax._src.cli import textdata
  path = tmp_path / "data.jsonl"
  path.write_text('{"text": "fine"}\n' + line + "\n")
  with pytest.raises(ValueError, match=match) as info:
    textdata.read_jsonl(path)
  assert "data.jsonl:2" in str(info.value)


def test_train_job_on_a_hugging_face_folder(tmp_path):
  import yaml
  folder = tmp_path / "model"
  hf_tiny.save("qwen3", folder)
  hf_tiny.save_tokenizer(folder)
  data = tmp_path / "data.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in hf_tiny.records()))
  job = {"model": {"hf": str(folder)}, "data": {"jsonl": str(data), "seq_len": 32,
                                                 "max_new_tokens": 8},
         "finetune": {"steps": 30, "batch_size": 4, "lr": 1e-2, "log_every": 5},
         "lora": {"rank": 4, "alpha": 8.0}, "export": {"merged": True},
         "run_dir": str(tmp_path / "run")}
  (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
  lines: list[str] = []
  config = lj.load_job_config(tmp_path / "job.yaml")
  assert config["task"] == "hf" and not config["full_finetune"]
  from lora_jax._src.cli.job import run
  metrics = run(config, echo=lines.append)
  assert metrics["lora"] < 0.7 * metrics["base"], metrics  # held-out perplexity
  run_dir = tmp_path / "run"
  peft_dir = pathlib_path(metrics["outputs"]["peft"])
  assert (peft_dir / "adapter_model.safetensors").is_file()
  assert sorted((run_dir / "tensorboard").iterdir())[0].name.startswith("events.out.tfevents")
  assert set(metrics["samples"]) == {"base", "lora"}
  # The exported adapter, loaded by PEFT, equals the trained one; so does the merged folder.
  adapters = lj.load_adapters(run_dir / "adapters")
  model = lj.load_hf(folder)
  tokens = np.asarray(TOKENS)
  ours = np.asarray(jax.jit(lj.wrap(lambda p, t: model.apply(p, t)[0], adapters[1]))(
      lj.LoraParams(model.params, adapters[0]), jnp.asarray(tokens)))
  peft_model = peft.PeftModel.from_pretrained(_fresh_torch("qwen3", folder), peft_dir).eval()
  np.testing.assert_allclose(hf_tiny.torch_logits(peft_model, tokens), ours, atol=2e-5, rtol=0)
  merged = lj.load_hf(metrics["outputs"]["merged"])
  np.testing.assert_allclose(np.asarray(merged.apply(merged.params, jnp.asarray(tokens))[0]),
                             ours, atol=1e-5, rtol=0)


def pathlib_path(text):
  import pathlib
  return pathlib.Path(text)


def test_train_job_resumes_bitwise_after_sigkill(tmp_path):
  """Killed mid-run and rerun, the job ends with the arrays of an uninterrupted run: the
  adapters, the optimizer state and the data position (grain's iterator state) resume."""
  import re
  import signal
  import subprocess
  import sys
  import time

  import yaml
  from child_env import child_env

  folder = tmp_path / "model"
  hf_tiny.save("llama", folder)
  hf_tiny.save_tokenizer(folder)
  data = tmp_path / "data.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in hf_tiny.records()))

  def job(name: str) -> list[str]:
    config = {"model": {"hf": str(folder)}, "data": {"jsonl": str(data), "seq_len": 16,
                                                      "samples": 0},
              "finetune": {"steps": 40, "batch_size": 4, "lr": 1e-2, "log_every": 5,
                           "save_every": 5},
              "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.1}, "export": {"peft": False},
              "run_dir": str(tmp_path / name)}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return [sys.executable, "-c", "import sys; from lora_jax._src.cli.main import main; "
            "sys.exit(main(sys.argv[1:]))", "train", "--config", str(tmp_path / f"{name}.yaml")]

  subprocess.run(job("whole"), env=child_env(), check=True, capture_output=True)
  child = subprocess.Popen(job("killed"), env=child_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 300
  while not (tmp_path / "killed" / "state" / "15").is_dir():
    assert child.poll() is None and time.monotonic() < deadline, "the job ended before step 15"
    time.sleep(0.02)
  child.send_signal(signal.SIGKILL)
  child.wait()
  assert not (tmp_path / "killed" / "metrics.json").exists()
  rerun = subprocess.run(job("killed"), env=child_env(), check=True, capture_output=True,
                         text=True)
  assert re.search(r"lora: resumed from step (15|20|25|30|35) of 40", rerun.stderr), rerun.stderr
  hf_tiny.assert_runs_equal(tmp_path / "whole", tmp_path / "killed")


def test_guessed_axes_fallback_says_to_infer_them(tmp_path):
  """Tunix's einsum kernels without infer_axes: the warning names infer_axes and in_axes."""
  hf_tiny.save("llama", tmp_path)
  model = lj.load_hf(tmp_path)
  config = lj.LoraConfig(rank=4, targets=r"attn/q_proj/w$")
  lp = lj.lift(model.params, config, key=jax.random.key(0))
  import re
  import warnings
  with warnings.catch_warnings(record=True) as caught:  # Tunix's own deprecations pass by
    warnings.simplefilter("always")
    lj.wrap(lambda p, t: model.apply(p, t)[0], config)(lp, jnp.zeros((1, 4), jnp.int32))
  fallbacks = [str(w.message) for w in caught if issubclass(w.category, lj.FallbackWarning)]
  assert fallbacks and all(re.search(r"guessed from its shape.*lj\.infer_axes", m, re.S)
                           for m in fallbacks), fallbacks


def test_generate_cli_with_an_adapter_stack(tmp_path, capsys):
  from lora_jax._src.cli.main import main
  folder = tmp_path / "model"
  hf_tiny.save("qwen2", folder)
  hf_tiny.save_tokenizer(folder)
  model = lj.load_hf(folder)
  config = _lora_config(model)
  trees = [_randomized(lj.lift(model.params, config, key=jax.random.key(i)),
                       jax.random.key(20 + i)) for i in range(2)]
  stack, stack_config = lj.stack_adapters({"x": (trees[0].adapters, config),
                                           "y": (trees[1].adapters, config)})
  lj.save_adapters(tmp_path / "stack", stack, stack_config)
  prompts = ["2 plus 3 is", "7 plus"]
  args = ["generate", "--model", str(folder), "--adapters", str(tmp_path / "stack"),
          "--max-new-tokens", "5"] + [a for p in prompts for a in ("--prompt", p)]
  assert main(args + ["--adapter-ids", "1,-1"]) == 0
  lines = capsys.readouterr().out.splitlines()
  tokenizer_ids = [[1] + [ord(c) - 28 for c in p] for p in prompts]  # <s> + characters
  want = [lj.generate(model, trees[1], tokenizer_ids[:1], config=config, max_new_tokens=5),
          lj.generate(model, model.params, tokenizer_ids[1:], max_new_tokens=5)]
  from lora_jax._src.cli.textdata import Tokenizer
  tokenizer = Tokenizer(folder)
  for line, prompt, tokens in zip(lines, prompts, want):
    ids = tokens[0].tolist()
    ids = ids[:ids.index(tokenizer.eos_id)] if tokenizer.eos_id in ids else ids
    assert line == prompt + tokenizer.decode(ids)
  assert main(args + ["--adapter", "z"]) == 2
  assert "no adapter 'z'" in capsys.readouterr().err
  assert main(args) == 2
  assert "--adapter-ids 0,1,-1" in capsys.readouterr().err


def test_end_to_end_example_runs_small(tmp_path):
  """examples/hf_end_to_end.py at a tiny size: pretrain, save, train job, PEFT == sampler."""
  import pathlib
  import subprocess
  import sys

  from child_env import child_env
  script = pathlib.Path(__file__).resolve().parents[1] / "examples" / "hf_end_to_end.py"
  out = subprocess.run([sys.executable, str(script), str(tmp_path), "--small"],
                       env=child_env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["same_tokens"] == summary["generated"] == 48


def test_scanned_layers_export_per_layer_and_restack(tmp_path):
  """Stacked (scanned) leaves, as nn.scan or MaxText hold them, export as one PEFT module per
  layer: the same tensors, bit for bit, as the per-layer model's export (which PEFT loads
  equal, above), and read back restacked."""
  from safetensors.numpy import load_file
  hf_tiny.save("llama", tmp_path / "model")
  model = lj.load_hf(tmp_path / "model")
  config = _lora_config(model)
  lp = _randomized(lj.lift(model.params, config, key=jax.random.key(0)), jax.random.key(1))
  lj.save_peft(tmp_path / "layers", lp, config, module_name=model.name_map,
               target=tmp_path / "model")
  # The same model with its layers stacked along a leading axis.
  layers = lp.base["layers"]
  n = len(layers)
  leaf = lambda tree, path: functools.reduce(lambda t, k: t[k], path.split("/"), tree)  # noqa: E731
  kernels = [f"{m}/{p}/{w}" for m, ps, w in (("attn", ("q_proj", "k_proj", "v_proj", "o_proj"),
                                              "w"), ("mlp", ("gate_proj", "up_proj",
                                                             "down_proj"), "kernel"))
             for p in ps]
  base, adapters, in_axes = {}, {}, {}
  for k in kernels:
    base[k] = np.stack([np.asarray(leaf(layers[i], k)) for i in range(n)])
    entry = [leaf(lp.adapters["layers"][str(i)], k) for i in range(n)]
    adapters[k] = {x: np.stack([np.asarray(e[x]) for e in entry]) for x in ("a", "b")}
    ins = config.in_axes_for(f"layers/0/{k}")
    in_axes[f"^layers/{re.escape(k)}$"] = tuple(p + 1 for p in ins)
  from lora_jax._src.core.tree import nest as nest_paths
  nest = lambda flat: {"layers": nest_paths(flat)}  # noqa: E731
  scanned_config = lj.LoraConfig(rank=4, alpha=8.0, targets=r"^layers/", in_axes=in_axes,
                                 stack_axes={r"^layers/": 1})
  scanned = lj.LoraParams(nest(base), nest(adapters))
  name_map = lj.NameMap("test/scanned-llama", (
      lj.NameRule(r"layers/attn/(q_proj|k_proj|v_proj|o_proj)/w",
                  (r"model.layers.{layer}.self_attn.\1",), stacked=True),
      lj.NameRule(r"layers/mlp/(gate_proj|up_proj|down_proj)/kernel",
                  (r"model.layers.{layer}.mlp.\1",), stacked=True)))
  with pytest.raises(ValueError, match="stacked=True"):  # default names: refused, not guessed
    lj.save_peft(tmp_path / "refused", scanned, scanned_config)
  lj.save_peft(tmp_path / "scanned", scanned, scanned_config, module_name=name_map,
               target=tmp_path / "model")
  want = load_file(str(tmp_path / "layers" / "adapter_model.safetensors"))
  got = load_file(str(tmp_path / "scanned" / "adapter_model.safetensors"))
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])
  back, back_config = lj.load_peft(tmp_path / "scanned", params=scanned.base,
                                   module_name=name_map, in_axes=in_axes,
                                   stack_axes={r"^layers/": 1})
  assert back_config.stack_axes_for("layers/mlp/up_proj/kernel") == (0,)
  for k in kernels:
    for x in ("a", "b"):
      np.testing.assert_array_equal(np.asarray(leaf(back["layers"], k)[x]), adapters[k][x])



def test_gemma3_recomputation_stays_within_each_layer(monkeypatch):
  """Gemma 3's post-norms make its residual stream elementwise from layer to layer; the
  adapters' input recomputation must not follow it back (at the benchmark's size it cost 13%
  more FLOPs, and more memory, than not recomputing at all). Against recomputation switched
  off: at most 2% more FLOPs, and less temporary memory."""
  from flax import nnx
  from tunix.models.gemma3 import model as gemma3

  from lora_jax._src.factored import recompute
  config = gemma3.ModelConfig(num_layers=3, embed_dim=256, hidden_dim=1024, num_heads=4,
                              head_dim=64, num_kv_heads=2, num_embed=256,
                              sliding_window_size=32, param_dtype=jnp.float32)
  graphdef, params, rest = nnx.split(gemma3.Gemma3(config, rngs=nnx.Rngs(params=0)),
                                     nnx.Param, ...)
  leaves, treedef = jax.tree.flatten(params)
  params = jax.tree.unflatten(treedef, [0.02 * jax.random.normal(jax.random.key(i), x.shape)
                                        for i, x in enumerate(leaves)])
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, 256, (4, 65)))
  positions = jnp.broadcast_to(jnp.arange(64), (4, 64))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((64, 64), bool)), (4, 64, 64))

  def logits(p, t):
    with jax.numpy_dtype_promotion("standard"):
      return nnx.merge(graphdef, p, rest)(t, positions, None, mask)[0]

  lora = lj.infer_axes(logits, params, tokens[:, :-1], config=lj.LoraConfig(
      rank=8, targets=r"(q_einsum|kv_einsum|attn_vec_einsum)/w$|mlp/\w+_proj/kernel$"))
  lp = lj.lift(params, lora, key=jax.random.key(0))

  def cost():
    apply = lj.wrap(logits, lora)

    def loss(lp):
      logp = jax.nn.log_softmax(apply(lp, tokens[:, :-1]))
      return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    compiled = jax.jit(jax.grad(loss)).lower(lp).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return analysis["flops"], compiled.memory_analysis().temp_size_in_bytes

  flops, temp = cost()
  monkeypatch.setattr(recompute, "MAX_EQUATIONS", 0)  # no recomputation
  flops_off, temp_off = cost()
  assert flops <= 1.02 * flops_off, (flops, flops_off)
  assert temp < temp_off, (temp, temp_off)
