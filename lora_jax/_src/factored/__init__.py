"""Layer 4, factored execution: running a model with its adapted weights kept low rank.

The jaxpr interpreter (``interpreter``: one rule per primitive in its ``RULES`` table), the
jaxpr walk it shares with axis inference (``walk``), its recompute analysis (``recompute``),
the MoE rules (``experts``), axis inference (``infer``), ``wrap`` and what is built on it
(``sampling``, ``nnx_module``). Imports only the layers below.
"""
