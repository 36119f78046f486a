"""Promptable segmenters behind one small protocol: ``set_image`` once, then ``predict`` from point prompts.

Backends:

* :class:`SamSegmenter` wraps ``segment_anything.SamPredictor`` around any ``Sam``: the official ViT-B/L/H from a
  local ``.pth`` / ``.safetensors`` file (:func:`load_segmenter`), or the small ``Sam`` vlmkit trains on generated
  scenes (``vlmkit train-sam``; shipped in ``vlmkit/default/checkpoints/sam-tiny``).
* :class:`HFSamSegmenter` wraps transformers' ``SamModel`` + ``SamProcessor`` from a local directory.

Checkpoints are read as safetensors or with ``torch.load(map_location="cpu", weights_only=True)``: a pickle that
carries code is refused. Nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from vlmkit.errors import InputError, ModelLoadError

#: Architecture of the default small SAM (``Sam`` from segment-anything with small widths); the shipped
#: ``config.json`` repeats it, so a checkpoint always says how to build itself.
TINY_SAM_CONFIG = {
    "format": "vlmkit-sam", "img_size": 128, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3,
    "window_size": 0, "global_attn_indexes": [0, 1, 2, 3], "prompt_dim": 64, "mask_in_chans": 8,
    "decoder_depth": 2, "decoder_mlp_dim": 256, "decoder_heads": 4, "iou_hidden": 64,
}
_OFFICIAL = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}  # patch-embedding width -> registry name


def default_sam_path() -> Path:
    """Directory of the small SAM shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "default" / "checkpoints" / "sam-tiny"


@dataclass
class Segmentation:
    """Output of one :meth:`Segmenter.predict` call.

    Attributes:
        masks: bool ``[C, H, W]`` at the size of the image given to ``set_image`` (C = 3 multimask, else 1).
        scores: float ``[C]``, the model's predicted IoU of each mask.
        logits: float ``[C, h, w]`` low-resolution mask logits; pass one back as ``mask_input`` (``[1, h, w]``).
    """

    masks: np.ndarray
    scores: np.ndarray
    logits: np.ndarray

    def best(self) -> int:
        return int(np.argmax(self.scores))


@runtime_checkable
class Segmenter(Protocol):
    """What VL-SAM needs from a promptable segmenter."""

    def set_image(self, image: np.ndarray) -> None:
        """Encode an RGB uint8 ``[H, W, 3]`` image; later ``predict`` calls refer to it."""

    def predict(self, points: np.ndarray, labels: np.ndarray, *, mask_input: np.ndarray | None = None,
                multimask: bool = True) -> Segmentation:
        """Masks from ``points [N, 2]`` (x, y pixels of the set image) with ``labels [N]`` (1 fg, 0 bg)."""


def _check_image(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise InputError(f"segmenter image must be uint8 [H, W, 3]; got {arr.dtype} {list(arr.shape)}")
    if min(arr.shape[:2]) < 1:
        raise InputError(f"segmenter image is empty ({arr.shape[1]}x{arr.shape[0]})")
    return np.ascontiguousarray(arr)


# ------------------------------------------------------------------------------------------- segment-anything
def build_tiny_sam(config: dict | None = None):
    """A randomly initialised ``segment_anything`` ``Sam`` with the widths of ``config`` (default
    :data:`TINY_SAM_CONFIG`; missing keys fall back to it)."""
    try:
        from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    except ImportError as e:
        raise ModelLoadError("the segment-anything backend needs `pip install segment-anything`") from e
    c = {**TINY_SAM_CONFIG, **(config or {})}
    grid = c["img_size"] // c["patch_size"]
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=c["img_size"], patch_size=c["patch_size"], embed_dim=c["embed_dim"], depth=c["depth"],
            num_heads=c["num_heads"], mlp_ratio=4.0, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            qkv_bias=True, use_rel_pos=True, window_size=c["window_size"],
            global_attn_indexes=tuple(c["global_attn_indexes"]), out_chans=c["prompt_dim"]),
        prompt_encoder=PromptEncoder(embed_dim=c["prompt_dim"], image_embedding_size=(grid, grid),
                                     input_image_size=(c["img_size"], c["img_size"]),
                                     mask_in_chans=c["mask_in_chans"]),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=c["decoder_depth"], embedding_dim=c["prompt_dim"],
                                          mlp_dim=c["decoder_mlp_dim"], num_heads=c["decoder_heads"]),
            transformer_dim=c["prompt_dim"], iou_head_depth=3, iou_head_hidden_dim=c["iou_hidden"]),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    return sam.eval()


def load_state_dict(path, what: str = "SAM checkpoint") -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: safetensors, or a ``torch.save`` file read with ``weights_only=True``.

    Raises :class:`ModelLoadError` for a missing file and for a pickle that would run code.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelLoadError(f"{what} {path}: no such file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except Exception as e:  # noqa: BLE001  (safetensors raises several kinds)
            raise ModelLoadError(f"{what} {path}: not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (UnpicklingError, RuntimeError, EOFError ...)
        raise ModelLoadError(f"{what} {path}: refused - not a plain tensor checkpoint (vlmkit loads "
                             f"with weights_only=True, so pickles that carry code are rejected): "
                             f"{str(e).splitlines()[0][:200]}") from e
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{what} {path}: expected a state dict of tensors, got {type(obj).__name__}")
    return obj


def _build_for_state(state: dict, model_type: str | None, config: dict | None):
    """Build the ``Sam`` that ``state`` belongs to: an official registry model or a vlmkit config."""
    if config is not None:
        return build_tiny_sam(config)
    if model_type is None:
        w = state.get("image_encoder.patch_embed.proj.weight")
        model_type = _OFFICIAL.get(int(w.shape[0])) if w is not None else None
        if model_type is None:
            raise ModelLoadError("cannot tell which SAM this checkpoint is: pass model_type='vit_b'|'vit_l'|'vit_h' "
                                 "or put the vlmkit config.json next to it")
    from segment_anything import sam_model_registry

    if model_type not in sam_model_registry:
        raise ModelLoadError(f"model_type={model_type!r}: use one of {sorted(sam_model_registry)}")
    return sam_model_registry[model_type](checkpoint=None)


class SamSegmenter:
    """``segment_anything.SamPredictor`` around a ``Sam`` module (official or vlmkit's small one)."""

    def __init__(self, sam, *, device: str = "cpu") -> None:
        from segment_anything import SamPredictor

        self.sam = sam.to(device).eval()
        self.predictor = SamPredictor(self.sam)

    @property
    def mask_input_size(self) -> int:
        """Side of the low-resolution mask logits (4x the image-embedding grid)."""
        return 4 * self.sam.prompt_encoder.image_embedding_size[0]

    def set_image(self, image: np.ndarray) -> None:
        with torch.inference_mode():
            self.predictor.set_image(_check_image(image), image_format="RGB")

    def predict(self, points, labels, *, mask_input=None, multimask: bool = True) -> Segmentation:
        pts = np.asarray(points, np.float32).reshape(-1, 2)
        lab = np.asarray(labels, np.int64).reshape(-1)
        with torch.inference_mode():
            masks, scores, logits = self.predictor.predict(
                point_coords=pts, point_labels=lab, multimask_output=multimask,
                mask_input=None if mask_input is None else np.asarray(mask_input, np.float32).reshape(
                    1, self.mask_input_size, self.mask_input_size))
        return Segmentation(masks.astype(bool), scores.astype(np.float32), logits.astype(np.float32))


# ------------------------------------------------------------------------------------------------ transformers
class HFSamSegmenter:
    """transformers ``SamModel`` + ``SamProcessor`` (image embedding cached between ``predict`` calls)."""

    def __init__(self, model, processor) -> None:
        self.model = model.eval()
        self.processor = processor
        self._emb = None
        self._inputs = None

    @classmethod
    def from_pretrained(cls, path, *, device: str = "cpu") -> "HFSamSegmenter":
        from transformers import SamModel, SamProcessor

        p = Path(path).expanduser()
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{path}: not a transformers SAM directory (no config.json)")
        try:
            model = SamModel.from_pretrained(str(p), local_files_only=True, use_safetensors=True)
            proc = SamProcessor.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{path}: failed to load SamModel ({str(e).splitlines()[0]})") from e
        return cls(model.to(device), proc)

    @property
    def mask_input_size(self) -> int:
        pc = self.model.config.prompt_encoder_config
        return int(pc.image_size // pc.patch_size * 4)

    def set_image(self, image: np.ndarray) -> None:
        img = _check_image(image)
        self._inputs = self.processor(images=img, return_tensors="pt")
        with torch.inference_mode():
            self._emb = self.model.get_image_embeddings(self._inputs["pixel_values"].to(self.model.device))

    def predict(self, points, labels, *, mask_input=None, multimask: bool = True) -> Segmentation:
        if self._emb is None:
            raise RuntimeError("call set_image before predict")
        pts = np.asarray(points, np.float32).reshape(-1, 2)
        lab = np.asarray(labels, np.int64).reshape(-1)
        orig = self._inputs["original_sizes"]
        reshaped = self._inputs["reshaped_input_sizes"]
        h, w = (int(v) for v in orig[0])
        nh, nw = (int(v) for v in reshaped[0])
        scaled = pts * np.array([nw / w, nh / h], np.float32)  # the processor's coordinate normalisation
        kw = dict(image_embeddings=self._emb, multimask_output=multimask,
                  input_points=torch.as_tensor(scaled)[None, None].to(self.model.device),
                  input_labels=torch.as_tensor(lab)[None, None].to(self.model.device))
        if mask_input is not None:
            kw["input_masks"] = torch.as_tensor(np.asarray(mask_input, np.float32)).reshape(
                1, 1, self.mask_input_size, self.mask_input_size).to(self.model.device)
        with torch.inference_mode():
            out = self.model(**kw)
        logits = out.pred_masks[0, 0].float().cpu()  # [C, h, w]
        masks = self.processor.post_process_masks(out.pred_masks.cpu(), orig, reshaped)[0][0]
        return Segmentation(masks.numpy().astype(bool), out.iou_scores[0, 0].float().cpu().numpy(), logits.numpy())


# -------------------------------------------------------------------------------------------------- loading
def load_segmenter(path=None, *, model_type: str | None = None, device: str = "cpu"):
    """A segmenter from a local path (``None``: vlmkit's shipped small SAM).

    * a directory with a transformers SAM ``config.json`` (``model_type: "sam"``) -> :class:`HFSamSegmenter`;
    * a directory with vlmkit's ``config.json`` (``format: "vlmkit-sam"``) and ``model.safetensors`` -> small SAM;
    * a ``.pth`` / ``.pt`` / ``.safetensors`` file -> official SAM (``model_type`` vit_b/l/h, inferred from the
      weights if omitted), or a small SAM when a vlmkit ``config.json`` sits next to the file.
    """
    p = default_sam_path() if path is None else Path(path).expanduser()
    if not p.exists():
        hint = (" (the shipped small SAM is missing: run `vlmkit train-sam`)" if path is None else "")
        raise ModelLoadError(f"SAM checkpoint {p}: no such file or directory{hint}")
    if p.is_dir():
        cfg_file = p / "config.json"
        if not cfg_file.is_file():
            raise ModelLoadError(f"{p}: a SAM directory needs config.json")
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("model_type") == "sam":
            return HFSamSegmenter.from_pretrained(p, device=device)
        if cfg.get("format") != "vlmkit-sam":
            raise ModelLoadError(f"{cfg_file}: neither a transformers SAM config nor a vlmkit-sam config")
        weights = p / "model.safetensors"
        sam = build_tiny_sam(cfg)
        _load_into(sam, load_state_dict(weights), weights)
        return SamSegmenter(sam, device=device)
    side = p.parent / "config.json"
    config = None
    if side.is_file():
        c = json.loads(side.read_text())
        config = c if c.get("format") == "vlmkit-sam" else None
    state = load_state_dict(p)
    sam = _build_for_state(state, model_type, config)
    _load_into(sam, state, p)
    return SamSegmenter(sam, device=device)


def _load_into(sam, state: dict, path) -> None:
    try:
        sam.load_state_dict(state)
    except RuntimeError as e:
        raise ModelLoadError(f"SAM checkpoint {path}: weights do not fit the model "
                             f"({str(e).splitlines()[0][:200]})") from e
