"""Every bad input raises an error that names the path, the value and the fix."""

import re

import jax
import jax.numpy as jnp
import pytest

import lora_jax as lj

PARAMS = {"params": {
    "dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.ones(4)},
    "head": {"kernel": jnp.ones((4, 2))},
    "ids": {"kernel": jnp.ones((4, 4), jnp.int32)},
    "stack": {"kernel": jnp.ones((3, 8, 4))},
}}


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), r"rank must be a positive integer, got 0"),
    (dict(rank=2.5), r"rank must be a positive integer, got 2.5"),
    (dict(alpha=0.0), r"alpha must be a positive finite number, got 0.0"),
    (dict(alpha=float("nan")), r"alpha must be a positive finite number"),
    (dict(dropout=1.0), r"dropout must be a probability in \[0, 1\), got 1.0"),
    (dict(dropout=-0.1), r"dropout must be a probability in \[0, 1\)"),
    (dict(targets="(query"), r"targets: '\(query' is not a valid regular expression"),
    (dict(rank_pattern={"[": 2}), r"rank_pattern: '\[' is not a valid regular expression"),
    (dict(rank_pattern={"q": 0}), r"rank_pattern\['q'\] must be a positive integer"),
    (dict(alpha_pattern={"q": -1.0}), r"alpha_pattern\['q'\] must be a positive"),
    (dict(init="xavier"), r"init must be one of \('default', 'gaussian', 'pissa', 'olora'\), "
                          r"got 'xavier' \('pissa' takes pissa_niter=N"),
    (dict(dtype="int8"), r"dtype must name a floating dtype .* got 'int8'"),
    (dict(in_axes={"k": -1}), r"in_axes\['k'\] must be a number of axes"),
    (dict(targets=()), r"targets is empty"),
    (dict(targets=3), r"targets must be a regular expression string"),
])
def test_bad_config_values(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    lj.LoraConfig(**kwargs)


def _lift(**kwargs):
  return lj.lift(PARAMS, lj.LoraConfig(**kwargs), key=jax.random.key(0))


def test_target_matching_nothing_lists_paths():
  with pytest.raises(ValueError, match=r"targets pattern 'query/kernel\$' matches no parameter "
                     r"path\. Existing paths include \['params/dense/bias'.*lora_jax\.paths"):
    _lift(targets=r"query/kernel$")


def test_trainable_matching_nothing():
  with pytest.raises(ValueError, match=r"trainable pattern 'norm/scale' matches no parameter"):
    _lift(targets=r"dense/kernel$", trainable="norm/scale")


def test_target_not_floating():
  with pytest.raises(ValueError, match=r"params/ids/kernel: a LoRA target must be a "
                     r"floating-point array, found dtype int32.*exclude"):
    _lift(targets=r"ids/kernel$")


def test_target_with_too_few_axes():
  with pytest.raises(ValueError, match=r"params/dense/bias: a LoRA target needs at least 2 "
                     r"axes .* found shape \(4,\).*trainable"):
    _lift(targets=r"dense/(kernel|bias)$")


def test_rank_too_large_names_path_and_limit():
  with pytest.raises(ValueError, match=re.escape(
      "params/head/kernel: rank 3 is larger than the kernel's input size 4 or output size 2")
      + r".*rank_pattern=\{'params/head/kernel': 2\}"):
    _lift(rank=3, targets=r"(dense|head)/kernel$")


def test_all_errors_reported_together():
  with pytest.raises(ValueError) as info:
    _lift(rank=3, targets=(r"(dense|head|ids)/kernel$", "nothing_here"))
  message = str(info.value)
  assert "params/head/kernel: rank 3" in message
  assert "params/ids/kernel" in message
  assert "'nothing_here' matches no parameter path" in message


@pytest.mark.parametrize("kwargs, match", [
    (dict(targets=r"stack/kernel$", stack_axes={"stack": 2}),
     r"params/stack/kernel: a LoRA target needs at least 2 axes besides its 2 stacked axes"),
    (dict(targets=r"stack/kernel$", stack_axes={"stack": 1}, in_axes={"stack": 2}),
     r"params/stack/kernel: LoraConfig.in_axes gives 2 input axes, but the kernel of shape "
     r"\(3, 8, 4\) has 2 axes after its 1 stacked axes; use a value from 1 to 1"),
    (dict(targets=r"dense/kernel$", in_axes={"dense": 0}),
     r"in_axes gives 0 input axes"),
    (dict(targets=r"stack/kernel$", in_axes={"stack": (3,)}),
     r"params/stack/kernel: LoraConfig.in_axes gives axis positions \(3,\), but the leaf of "
     r"shape \(3, 8, 4\) has axes 0 to 2"),
    (dict(targets=r"stack/kernel$", stack_axes={"stack": (0,)}, in_axes={"stack": (0, 1)}),
     r"in_axes positions \(0, 1\) do not fit the kernel of shape \(3, 8, 4\) with stacked "
     r"axes \(0,\): axes \[0\] are also stacked axes"),
    (dict(targets=r"dense/kernel$", in_axes={"dense": (0, -1)}),
     r"in_axes positions \(0, -1\) do not fit[^$]*no output axis would be left"),
    (dict(targets=r"stack/kernel$", in_axes={"stack": (1, -2)}),
     r"names the same axis twice in \(1, -2\)"),
])
def test_axes_out_of_range(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _lift(**kwargs)


def test_target_and_trainable_overlap():
  with pytest.raises(ValueError, match=r"params/dense/kernel: matched by both "
                     r"LoraConfig.targets and LoraConfig.trainable"):
    _lift(targets=r"dense/kernel$", trainable=r"dense/")


def test_unused_rank_pattern():
  with pytest.raises(ValueError, match=r"rank_pattern pattern 'value' matches none of the "
                     r"adapted paths \['params/dense/kernel'\]"):
    _lift(rank=2, targets=r"dense/kernel$", rank_pattern={"value": 2})


def test_mismatched_adapters_at_merge():
  config = lj.LoraConfig(rank=2, targets=r"dense/kernel$")
  lp = lj.lift(PARAMS, config, key=jax.random.key(0))
  bad = lj.LoraParams(PARAMS, {"params": {"dense": {"kernel": {
      "a": jnp.ones((8, 3)), "b": jnp.ones((2, 4))}}, "other": {"kernel": lp.adapters[
          "params"]["dense"]["kernel"]}}})
  with pytest.raises(ValueError) as info:
    lj.merge(bad, config)
  message = str(info.value)
  assert ("params/dense/kernel/a: shape (8, 3) does not fit the base leaf of shape (8, 4); "
          "expected (8, 2)") in message
  assert "params/other/kernel: unexpected adapter" in message
  with pytest.raises(ValueError, match=r"params/dense/kernel: missing adapter"):
    lj.merge(lj.LoraParams(PARAMS, {}), config)


def test_wrap_and_optimizer_need_lora_params():
  config = lj.LoraConfig(rank=2, targets=r"dense/kernel$")
  with pytest.raises(TypeError, match=r"takes lora_jax.LoraParams .* got dict.*lora_jax.lift"):
    lj.wrap(lambda p, x: x, config)(PARAMS, 1.0)
  with pytest.raises(TypeError, match=r"Expected lora_jax.LoraParams"):
    lj.optimizer(__import__("optax").sgd(0.1), config).init(PARAMS)


def test_lift_needs_a_key():
  with pytest.raises(TypeError, match=r"key must be a PRNG key"):
    lj.lift(PARAMS, lj.LoraConfig(targets=r"dense/kernel$", rank=2), key=jnp.ones(3))
