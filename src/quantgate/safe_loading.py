"""Safe loading for the whole run: no network, no pickles beyond plain tensors.

- ``HF_HUB_OFFLINE=1``: huggingface_hub, diffusers and transformers refuse every HTTP request
  (quantgate also passes ``local_files_only=True`` where it calls them). huggingface_hub reads
  the variable once, at import, and diffusers copies the value into its modules
  (``from huggingface_hub.constants import HF_HUB_OFFLINE``), so modules already imported
  are updated too; the variable itself reaches later imports and subprocesses.
- ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``: every ``torch.load`` in the process, including those
  inside libraries (LPIPS backbones, torch.hub checkpoints), runs with ``weights_only=True``
  even where the caller asked otherwise.

Pipelines load with ``use_safetensors=True`` (quantgate.pipeline), so a directory holding
only ``.bin`` pickles is refused rather than unpickled.
"""

from __future__ import annotations

import os
import sys

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"}


def enforce_offline() -> None:
    """Make the rest of this process (and its children) offline and weights-only."""
    for name, value in OFFLINE_ENV.items():
        os.environ[name] = value
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # it would conflict with the forced mode
    for name, module in list(sys.modules.items()):
        if (name == "huggingface_hub.constants" or name.startswith(("diffusers.", "transformers."))) and \
                getattr(module, "HF_HUB_OFFLINE", None) is False:
            module.HF_HUB_OFFLINE = True
