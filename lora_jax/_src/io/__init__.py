"""Layer 5, input and output: files, checkpoints and other libraries' formats.

Staged atomic writes (``atomic``) and their multi-process barriers (``multihost``), content
digests (``checksums``), base fingerprints (``lineage``), adapter checkpoints
(``checkpoint``, which keeps shared arrays drawn from the config's seed as that seed:
``drawn``), training states (``train_state``), quantized bases (``quantized_io``),
safetensors files (``safetensors_io``), PEFT folders (``peft_format``, with the module name
maps of ``names``), the streaming merges (``streaming``, ``hf_merge``) and Hugging Face models
(``zoo``). Imports only the layers below.
"""
