"""The family adapter: everything vlmkit needs to know about one transformers VLM family.

An adapter builds the prompt for an image + question, finds the language model's attention modules, and computes the
image-token :class:`~vlmkit.models._layout.Layout` of every sample. Methods talk to adapters, never to model classes.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from vlmkit.errors import LayoutError
from vlmkit.models._layout import ImageLayout, Layout, image_token_positions

_ADAPTERS: dict[str, type["FamilyAdapter"]] = {}


def register_adapter(*model_types: str):
    """Class decorator: register an adapter for one or more ``config.model_type`` values."""

    def wrap(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
        for t in model_types:
            _ADAPTERS[t] = cls
        cls.model_types = tuple(model_types)
        return cls

    return wrap


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_class(model_type: str) -> type["FamilyAdapter"] | None:
    return _ADAPTERS.get(model_type)


class FamilyAdapter:
    """Base adapter. Subclasses set ``fallback_template`` and implement ``_num_tokens`` and ``_image_layout``."""

    model_types: ClassVar[tuple[str, ...]] = ()
    #: used when the processor has no chat template; ``{question}`` and ``{image}`` are filled in.
    fallback_template: ClassVar[str] = "USER: {image}\n{question} ASSISTANT:"

    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        self.model = model
        self.processor = processor
        self.config = model.config
        self.image_token_id = int(getattr(self.config, "image_token_id", None)
                                  if getattr(self.config, "image_token_id", None) is not None
                                  else self.config.image_token_index)

    # ------------------------------------------------------------------ prompt
    @property
    def image_token(self) -> str:
        tok = getattr(self.processor, "image_token", None)
        return tok if tok is not None else self.processor.tokenizer.convert_ids_to_tokens(self.image_token_id)

    def messages(self, question: str) -> list[dict]:
        """The chat for one image followed by one question."""
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]

    def prompt(self, question: str | None = None, *, messages: list[dict] | None = None) -> str:
        """Prompt text (with the processor's image placeholder) ending where the answer starts."""
        if messages is None:
            if question is None:
                raise ValueError("prompt() needs a question or messages")
            messages = self.messages(question)
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if len(messages) != 1 or messages[0].get("role") != "user":
            raise ValueError("this processor has no chat template; only a single user turn is supported")
        text = " ".join(c["text"] for c in messages[0]["content"] if c.get("type") == "text")
        n_img = sum(1 for c in messages[0]["content"] if c.get("type") == "image")
        return self.fallback_template.format(image=self.image_token * n_img, question=text)

    def encode(self, images: list, prompts: list[str]) -> dict:
        """Run the processor on one image per prompt, left-padded. Returns the model inputs."""
        tok = self.processor.tokenizer
        old_side = tok.padding_side
        tok.padding_side = "left"
        try:
            inputs = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        finally:
            tok.padding_side = old_side
        return inputs

    # ------------------------------------------------------------------ model structure
    def language_model(self) -> torch.nn.Module:
        inner = getattr(self.model, "model", self.model)
        lm = getattr(inner, "language_model", None)
        if lm is None:
            raise LayoutError(f"{type(self.model).__name__}: cannot find the language model")
        return lm

    def decoder_layers(self) -> list[torch.nn.Module]:
        """The language model's decoder layers, in order."""
        return list(self.language_model().layers)

    def attention_modules(self) -> list[torch.nn.Module]:
        """The language model's self-attention modules, in layer order."""
        return [layer.self_attn for layer in self.decoder_layers()]

    @property
    def num_layers(self) -> int:
        return len(self.language_model().layers)

    def reset_state(self) -> None:
        """Forget state cached on the model between unrelated calls (Qwen's ``rope_deltas``)."""
        inner = getattr(self.model, "model", self.model)
        if hasattr(inner, "rope_deltas"):
            inner.rope_deltas = None

    # ------------------------------------------------------------------ layout
    def image_info(self, inputs: dict, index: int) -> Any:
        """Per-image processor output the layout needs (e.g. Qwen's ``image_grid_thw`` row). Default: none."""
        return None

    def _num_tokens(self, size: tuple[int, int], info: Any) -> int:
        raise NotImplementedError

    def _image_layout(self, size: tuple[int, int], positions: np.ndarray, info: Any) -> ImageLayout:
        raise NotImplementedError

    def layouts(self, inputs: dict, sizes: list[list[tuple[int, int]]]) -> tuple[list[Layout], list[int]]:
        """Layouts of every sample, with positions relative to the sample's unpadded sequence.

        Args:
            inputs: processor output (``input_ids [B, N]``, optional ``attention_mask [B, N]``, image tensors).
            sizes: for each sample, the ``(width, height)`` of each of its images, in prompt order.
        Returns:
            ``(layouts, pad)``: one :class:`Layout` per sample and each sample's number of left-padding positions.
        """
        ids = inputs["input_ids"].cpu().numpy()
        mask = inputs.get("attention_mask")
        mask = mask.cpu().numpy() if mask is not None else np.ones_like(ids)
        layouts, pads, img_index = [], [], 0
        for b in range(ids.shape[0]):
            pad = int(np.argmax(mask[b] != 0)) if mask[b].any() else ids.shape[1]
            row = ids[b, pad:]
            found = image_token_positions(row, self.image_token_id)
            images, used = [], 0
            for size in sizes[b]:
                info = self.image_info(inputs, img_index)
                n = self._num_tokens(size, info)
                images.append(self._image_layout(size, found[used:used + n], info))
                used += n
                img_index += 1
            layout = Layout(images)
            layout.check(found)
            layouts.append(layout)
            pads.append(pad)
        return layouts, pads
