"""Layer 2, core: what an adapted parameter tree is.

Parameter paths (``tree``), path patterns (``patterns``), the configuration (``config``, read
from YAML by ``yaml_io``), the adapter entry schema (``kinds``), the plan of targets and
their shapes (``plan``), the ``LoraParams`` pair (``params``) and the adapted-weight value
with the one merge formula (``lowrank``). Imports only ``numerics``.
"""
