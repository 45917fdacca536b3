"""``python -m lora_jax``: the ``lora-jax`` command."""

import sys

from lora_jax._src.cli.main import main

sys.exit(main())
