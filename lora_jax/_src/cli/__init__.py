"""Layer 6, jobs and the command line: ``lora-jax train``, ``merge``, ``generate``, ``inspect``.

The job runner (``job``), its demo tasks (``tasks``) and the Hugging Face task (``hf_task``)
with its text data (``textdata``), progress lines (``progress``) and loss plots (``plot``);
``adapt`` for zoo models, the ``lora-jax`` commands (``main``) and the names kept for one
release (``deprecated``). Imports the layers below; its function-level imports only keep the
command line quick to start.
"""
