"""Layer 3, adapters: making, combining and folding adapters.

``lift`` and its initializations (``principal`` for PiSSA/OLoRA), ``merge``/``unmerge``,
``combine``, adapter stacks (``stack``), quantized bases (``quantize``), the optimizer
partition (``optim``) and ``summary``. Imports only the layers below.
"""
