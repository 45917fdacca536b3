"""Layer 1, numerics: array math with no notion of configs or parameter paths.

The low-rank products and their custom VJPs (``lowrank_dot``, ``lowrank_conv``), DoRA's
column norms (``dora``), quantized arrays (``qarray``) and products that decode them inside
(``dequantized``). Imports nothing from lora_jax.
"""
