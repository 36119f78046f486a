"""The family adapter: everything vlmkit needs to know about one transformers VLM family.

An adapter builds the prompt for an image + question, finds the language model's attention modules, and computes the
image-token :class:`~vlmkit.models._layout.Layout` of every sample. Methods talk to adapters, never to model classes.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import torch

from vlmkit.errors import InputError, LayoutError, VlmkitError
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

    @contextmanager
    def reuse_processed_image(self, image, store: dict):
        """Inside the block, a processor call whose only image has ``image``'s pixels (a PIL image, compared byte for
        byte) reuses the image processor's output kept in ``store["processed"]`` (computed by the first such call).
        ``store`` must belong to these pixels (e.g. a cache entry keyed by a pixel hash). Always restored."""
        proc = self.processor
        real = proc.image_processor
        size, mode, pixels = image.size, image.mode, image.tobytes()

        def same(x) -> bool:
            return getattr(x, "size", None) == size and getattr(x, "mode", None) == mode and x.tobytes() == pixels

        class _Reuse:
            def __getattr__(self, name):
                return getattr(real, name)

            def __call__(self, images, *args, **kw):
                flat = images if isinstance(images, (list, tuple)) else [images]
                if len(flat) != 1 or not same(flat[0]):
                    return real(images, *args, **kw)
                if "processed" not in store:
                    store["processed"] = real(images, *args, **kw)
                out = store["processed"]
                return type(out)(data=dict(out))        # a fresh container: callers may pop or move fields

        proc.image_processor = _Reuse()
        try:
            yield store
        finally:
            proc.image_processor = real

    @contextmanager
    def reuse_image_features(self, store: dict):
        """Inside the block the vision encoder runs at most once per distinct image.

        Wraps the base model's ``get_image_features`` (the one call generate and forward make for pixels) for
        ``[B, C, H, W]`` pixel batches (LLaVA-style; other layouts run as usual): ``store`` keeps one image's pixels
        and its per-image ``pooler_output`` (nothing else); rows equal to the kept pixels reuse it, a batch of one
        new image repeated is encoded once (and kept), and only the remaining distinct rows are encoded. Always
        restored.
        """
        base = self.model.base_model
        original = base.get_image_features          # bound method (or an earlier instance override)
        had_own = "get_image_features" in vars(base)

        def rows(kw: dict, n: int, sel: torch.Tensor) -> dict:  # per-image kwargs (e.g. image_sizes) of rows sel
            return {k: (v[sel] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v)
                    for k, v in kw.items()}

        @functools.wraps(original)  # generate() reads the encoder's parameter names from its signature
        def wrapped(*args, **kw):
            pv = kw.pop("pixel_values", None)
            if args or not isinstance(pv, torch.Tensor) or pv.dim() != 4:
                return original(*args, pixel_values=pv, **kw) if pv is not None else original(*args, **kw)
            n = pv.shape[0]
            kept = store.get("pixel_values")
            if kept is None or kept.shape != pv.shape[1:] or kept.device != pv.device:
                kept = None
            reuse = torch.tensor([kept is not None and torch.equal(kept, pv[i]) for i in range(n)])
            if not reuse.any() and all(torch.equal(pv[0], pv[i]) for i in range(1, n)):  # one new image, kept
                out = original(pixel_values=pv[:1], **rows(kw, n, torch.tensor([0])))
                if not hasattr(out, "pooler_output") or len(out.pooler_output) != 1:
                    return original(pixel_values=pv, **kw)
                store.clear()
                store.update(pixel_values=pv[0].detach().clone(), pooler=list(out.pooler_output), type=type(out))
                return type(out)(pooler_output=store["pooler"] * n)
            if not reuse.any():
                return original(pixel_values=pv, **kw)
            if reuse.all():
                return store["type"](pooler_output=store["pooler"] * n)
            new = original(pixel_values=pv[~reuse], **rows(kw, n, ~reuse))
            fresh = iter(new.pooler_output)
            return type(new)(pooler_output=[store["pooler"][0] if r else next(fresh) for r in reuse.tolist()])

        base.get_image_features = wrapped
        try:
            yield store
        finally:
            if had_own:
                base.get_image_features = original
            else:
                del base.get_image_features

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

    # ------------------------------------------------------------------ vision-tower attention (methods: PAINT)
    #: True when the vision tower prepends a CLS token whose attention row can score patches (CLIP).
    has_cls_token: ClassVar[bool] = False
    #: name under which the vision-attention tap is registered with transformers' ``AttentionInterface``
    VISION_TAP: ClassVar[str] = "vlmkit_vision"

    def vision_attention_modules(self) -> list[torch.nn.Module]:
        """The vision tower's self-attention modules, in layer order (families with a vision read override it)."""
        raise VlmkitError(f"{self.config.model_type}: reading the vision tower's attention is not implemented for "
                          f"this family (families with it: llava, qwen2_vl, qwen2_5_vl)")

    def vision_feature_layer(self) -> int:
        """Index of the vision layer whose output feeds the language model (non-negative)."""
        raise VlmkitError(f"{self.config.model_type}: the vision feature layer is not known for this family")

    def vision_token_scores(self, inputs: dict, layers, kind: str = "auto") -> dict:
        """Per-image scores of the LLM image tokens read from the vision tower's attention.

        Args:
            inputs: processor outputs of one batch (pixel values and, for Qwen, ``image_grid_thw``).
            layers: a vision-layer index (negative from the end) or ``"feature"`` (:meth:`vision_feature_layer`),
                or a sequence of them; the tower runs once for all of them.
            kind: ``"cls"`` (attention of the CLS query row), ``"received"`` (mean attention each patch receives
                over all query rows of its attention block) or ``"auto"`` (``"cls"`` when the tower has a CLS token,
                else ``"received"``).
        Returns:
            ``{layer_spec: [scores per image]}``; each entry is a float32 ``[image_tokens]`` tensor (summed over
            heads) in the row-major order of the image's LLM token grid (patch scores pooled to LLM tokens).
        """
        raise VlmkitError(f"{self.config.model_type}: reading the vision tower's attention is not implemented for "
                          f"this family (families with it: llava, qwen2_vl, qwen2_5_vl)")

    def _vision_kind(self, kind: str) -> str:
        if kind == "auto":
            return "cls" if self.has_cls_token else "received"
        if kind not in ("cls", "received"):
            raise InputError(f"vision score kind {kind!r}: use 'cls', 'received' or 'auto'")
        if kind == "cls" and not self.has_cls_token:
            raise InputError(f"{self.config.model_type}: the vision tower has no CLS token; use kind='received' "
                             "(mean attention received per patch) or 'auto'")
        return kind

    def _vision_layer_index(self, spec, depth: int) -> int:
        if spec == "feature":
            return self.vision_feature_layer()
        if not isinstance(spec, int) or not -depth <= spec < depth:
            raise InputError(f"vision layer {spec!r} out of range for a {depth}-layer vision tower "
                             "(use an int in [-depth, depth) or 'feature')")
        return spec % depth

    @staticmethod
    def _vision_tap_attention(module, query, key, value, attention_mask, **kwargs):
        """Attention function used while a tap is attached: hands ``query/key [B, H, L, D]`` to the tap, then SDPA."""
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        tap = getattr(module, "_vlmkit_vision_tap", None)
        if tap is not None:
            tap(query, key, attention_mask, kwargs.get("scaling"))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    @staticmethod
    def _attention_scores(query: torch.Tensor, key: torch.Tensor, mask, scaling, kind: str) -> torch.Tensor:
        """float32 ``[B, H, Lk]``: the CLS row (query 0) of softmax(QK^T), or its column sums over all query rows
        divided by the number of rows (``"received"``). Computed in row blocks to bound memory."""
        q, k = query.float(), key.float()
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scaling = scaling if scaling is not None else q.shape[-1] ** -0.5
        lq = 1 if kind == "cls" else q.shape[2]
        block = max(1, (1 << 24) // max(1, q.shape[0] * q.shape[1] * k.shape[2]))
        out = torch.zeros(q.shape[0], q.shape[1], k.shape[2], dtype=torch.float32, device=q.device)
        for start in range(0, lq, block):
            s = torch.matmul(q[:, :, start:min(start + block, lq)], k.transpose(-1, -2)) * scaling
            if mask is not None:
                m = mask[..., start:min(start + block, lq), :] if mask.shape[-2] > 1 else mask
                s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
            out += torch.softmax(s, dim=-1).sum(2)
        return out / lq

    @contextmanager
    def _vision_tap(self, modules: list[torch.nn.Module], wanted: dict[int, str]):
        """Record attention scores of the vision layers ``wanted`` (index -> kind) for the calls inside the block.

        Yields ``{layer: [float32 [B, H, Lk] per attention call]}`` (Qwen calls once per image or window). The
        tower's attention implementation is switched to the tap and always restored, taps always removed.
        """
        from transformers import AttentionInterface

        AttentionInterface.register(self.VISION_TAP, FamilyAdapter._vision_tap_attention)
        records: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
        configs = {id(m.config): m.config for m in modules}
        old = {k: c._attn_implementation_internal for k, c in configs.items()}

        def tap_for(i: int, kind: str):
            def tap(query, key, mask, scaling):
                records[i].append(self._attention_scores(query, key, mask, scaling, kind))
            return tap

        try:
            for i, kind in wanted.items():
                modules[i]._vlmkit_vision_tap = tap_for(i, kind)
            for c in configs.values():
                c._attn_implementation_internal = self.VISION_TAP
            yield records
        finally:
            for k, c in configs.items():
                c._attn_implementation_internal = old[k]
            for m in modules:
                if hasattr(m, "_vlmkit_vision_tap"):
                    del m._vlmkit_vision_tap

    # ------------------------------------------------------------------ text-only prompts and branches (PAI, VCD)
    def text_prompt(self, question: str) -> str:
        """Prompt text for ``question`` with no image (same template as :meth:`prompt`)."""
        return self.prompt(messages=[{"role": "user", "content": [{"type": "text", "text": question}]}])

    def text_only_inputs(self, questions) -> dict:
        """Tokenised text-only prompts (no image), left-padded: ``input_ids``/``attention_mask`` ``[B, N]``."""
        qs = [questions] if isinstance(questions, str) else list(questions)
        tok = self.processor.tokenizer
        old_side = tok.padding_side
        tok.padding_side = "left"
        try:
            return dict(tok([self.text_prompt(q) for q in qs], return_tensors="pt", padding=True))
        finally:
            tok.padding_side = old_side

    #: config fields / processor attributes that name tokens wrapping an image in the prompt
    _WRAPPER_CONFIG_IDS: ClassVar[tuple[str, ...]] = ("vision_start_token_id", "vision_end_token_id", "boi_token_id",
                                                      "eoi_token_id", "image_start_token_id", "image_end_token_id")
    _WRAPPER_PROCESSOR_TOKENS: ClassVar[tuple[str, ...]] = ("fake_image_token", "global_image_token",
                                                            "global_image_tag", "image_start_token",
                                                            "image_end_token", "boi_token", "eoi_token")

    def image_wrapper_token_ids(self) -> tuple[int, ...]:
        """Ids of the tokens that surround image tokens in a prompt (dropped with them for a text-only branch):
        the config's vision start/end ids, the processor's wrapper tokens and Idefics-style ``<row_i_col_j>``."""
        import re

        tok = self.processor.tokenizer
        ids: set[int] = set()
        for name in self._WRAPPER_CONFIG_IDS:
            v = getattr(self.config, name, None)
            if isinstance(v, int):
                ids.add(v)
        for name in self._WRAPPER_PROCESSOR_TOKENS:
            t = getattr(self.processor, name, None)
            if isinstance(t, str):
                i = tok.convert_tokens_to_ids(t)
                if isinstance(i, int) and i != tok.unk_token_id:
                    ids.add(i)
        for t, i in tok.get_added_vocab().items():
            if re.fullmatch(r"<row_\d+_col_\d+>", t):
                ids.add(i)
        ids.discard(self.image_token_id)
        return tuple(sorted(ids))

    def strip_image(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        """The text-only version of a left-padded prompt batch: image tokens and their wrapper tokens removed, rows
        re-left-padded. Returns ``input_ids``/``attention_mask`` ``[B, N']`` on the input's device."""
        drop = torch.tensor([self.image_token_id, *self.image_wrapper_token_ids()], device=input_ids.device)
        mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        keep = mask & ~torch.isin(input_ids, drop)
        rows = [input_ids[b][keep[b]] for b in range(input_ids.shape[0])]
        n = max(int(r.numel()) for r in rows)
        tok = self.processor.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(rows), n), pad, dtype=input_ids.dtype, device=input_ids.device)
        out_mask = torch.zeros(len(rows), n, dtype=torch.long, device=input_ids.device)
        for b, r in enumerate(rows):
            ids[b, n - r.numel():] = r
            out_mask[b, n - r.numel():] = 1
        return {"input_ids": ids, "attention_mask": out_mask}

    def swap_state(self, state: dict | None) -> dict:
        """Install per-sequence model state (``None``: fresh) and return the state that was there.

        Lets a second decoding branch over the same model (VCD's noised image, PAI's text-only prompt) keep its own
        cached state (Qwen's ``rope_deltas``) without disturbing the main generation.
        """
        inner = getattr(self.model, "model", self.model)
        if not hasattr(inner, "rope_deltas"):
            return {}
        old = {"rope_deltas": inner.rope_deltas}
        inner.rope_deltas = (state or {}).get("rope_deltas")
        return old

    def branch_position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Position ids for one decode token of a branch (``attention_mask [B, N+1]`` includes it); ``None`` lets
        the model count from its cache length, which matches its default prefill positions."""
        return None
