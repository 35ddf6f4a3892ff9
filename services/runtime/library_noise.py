"""What the model libraries print on their own that tells whoever reads a log nothing to act on, kept out of it:

- transformers' warning, as diffusers imports CLIP's image processors, that they fall back to PIL because
  torchvision is not installed: this project installs no torchvision on purpose (PIL is the backend it wants), so
  every command and every server started with those two lines;
- diffusers' warning, at each load of the clip and sound pipelines, that they are deprecated upstream (no fixes
  after diffusers 0.33.1): known and handled where it can be (pyproject.toml pins diffusers for that reason), and
  nothing a reader of a server's log can change;
- transformers' FutureWarning that ``is_gradient_checkpointing`` will go in its v6, which peft sets off by asking
  for it as it wraps the LLM in its LoRA adapters (once per engine start);
- the progress bars of loading weights (transformers' "Loading weights", diffusers' "Loading pipeline
  components"): a bundle loads in under a second here, and a server's log file gets each bar as a line of
  carriage returns. Long work keeps its own bars (training's, ours); diffusers' bar is turned off where a serving
  process loads its pipelines (``services.decoders.pipelines``), as diffusers reads no setting for it.

Stdlib only: the gateway's slim environment has none of these libraries, and the fork server of the model
children runs this before it imports them."""

from __future__ import annotations

import logging
import os
import warnings

# Logger (where the library logs it) -> the words of the warning it drops there.
_DROPPED = {
    "transformers.utils.import_utils": "requires torchvision (not installed)",
    "diffusers.pipelines.pipeline_utils": "has been deprecated and will not receive bug fixes",
}


class _DropLibraryNote(logging.Filter):
    def __init__(self, words: str) -> None:
        super().__init__()
        self.words = words

    def filter(self, record: logging.LogRecord) -> bool:
        return self.words not in record.getMessage()


def quiet_model_libraries() -> None:
    """Before transformers is imported (it reads the progress-bar switch at import); idempotent. An operator who
    set HF_HUB_DISABLE_PROGRESS_BARS keeps their value."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name, words in _DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLibraryNote) for f in logger.filters):
            logger.addFilter(_DropLibraryNote(words))
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
