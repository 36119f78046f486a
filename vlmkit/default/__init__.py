"""The embedded default model: a ~1.3 M-parameter LLaVA trained by vlmkit on its own generated scenes.

``checkpoint_dir()`` is the packaged checkpoint (a plain Hugging Face directory: ``AutoModelForImageTextToText`` +
``AutoProcessor`` load it). ``vlmkit train-default`` (:mod:`vlmkit.default.cli`) reproduces it; see MODEL_CARD.md.
"""
from __future__ import annotations

from pathlib import Path

from vlmkit.errors import ModelLoadError

CHECKPOINT_NAME = "scenes-llava"
CHECKPOINT_DIR = Path(__file__).parent / "checkpoints" / CHECKPOINT_NAME
# Checkpoints shipped inside the package, by the name ``vlmkit.load(name)`` / ``--model name`` accepts:
# "default" is the embedded default; "gui" is that model with its vision tower + projector fine-tuned for GUI
# grounding together with its pointer head (``vlmkit train-grounding --finetune-backbone``; see MODEL_CARD.md).
SHIPPED = {"default": CHECKPOINT_NAME, "gui": "gui-llava"}


def shipped_dir(name: str) -> Path:
    """Directory of a checkpoint shipped inside the package (a key of ``SHIPPED``)."""
    return CHECKPOINT_DIR.parent / SHIPPED[name]


def checkpoint_dir() -> Path:
    """Directory of the shipped default checkpoint; raises ``ModelLoadError`` if the package lacks it."""
    if not (CHECKPOINT_DIR / "config.json").is_file():
        raise ModelLoadError(f"default checkpoint missing at {CHECKPOINT_DIR}; reinstall vlmkit or run "
                             "`vlmkit train-default` to rebuild it")
    return CHECKPOINT_DIR
