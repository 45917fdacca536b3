"""``python -m lora_jax``: the ``lora-jax`` command."""

import sys

from lora_jax._src.cli import main

sys.exit(main())
