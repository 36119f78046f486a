"""Architecture, processor and geometry of the embedded default model.

LLaVA (``LlavaForConditionalGeneration``): a CLIP vision tower (96 px input, 12 px patches -> 8 x 8 = 64 patch
tokens + CLS, 3 layers x 128) whose last layer (``vision_feature_layer=-1``) feeds a 2-layer MLP projector, with the
CLS token dropped (``vision_feature_select_strategy="default"``, ``num_additional_image_tokens=1``), into a Llama
language model (3 layers x 128, 4 heads). The processor pads the image to a square with the mean colour, then resizes
it to 96 x 96 (no centre crop), so the 64 image tokens cover the whole image.
"""
from __future__ import annotations

import numpy as np

IMAGE_SIZE = 96
PATCH = 12
GRID = IMAGE_SIZE // PATCH          # 8
N_IMAGE_TOKENS = GRID * GRID        # 64
VISION_LAYERS = 3                   # transformer layers of the vision tower
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def prompt_text(question: str, history: list[tuple[str, str]] = (), with_image_token: bool = True) -> str:
    """The exact prompt the chat template produces: ``USER: <image>\\n{q} ASSISTANT:`` (earlier turns first)."""
    turns = list(history) + [(question, None)]
    out = []
    for i, (q, a) in enumerate(turns):
        img = "<image>\n" if (i == 0 and with_image_token) else ""
        out.append(f"USER: {img}{q} ASSISTANT:" + (f" {a}</s>" if a is not None else ""))
    return "".join(out)


def build_config(vocab_size: int, image_token_id: int, pad_id: int, bos_id: int, eos_id: int, *,
                 vision_layers: int = VISION_LAYERS):
    """``LlavaConfig`` of the default model (about 1.1 M parameters with the default 3 tower layers)."""
    from transformers import LlavaConfig

    text = dict(model_type="llama", vocab_size=vocab_size, hidden_size=128, intermediate_size=384,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id, tie_word_embeddings=True,
                rms_norm_eps=1e-5)
    vision = dict(model_type="clip_vision_model", image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=128,
                  intermediate_size=384, num_hidden_layers=vision_layers, num_attention_heads=4, projection_dim=128,
                  num_channels=3)
    return LlavaConfig(text_config=text, vision_config=vision, image_token_index=image_token_id,
                       image_seq_length=N_IMAGE_TOKENS, vision_feature_layer=-1,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       tie_word_embeddings=True)


def build_processor(tokenizer):
    """``LlavaProcessor`` with pad-to-square (mean colour) + resize to 96 px, no crop, and the chat template."""
    from transformers import LlavaImageProcessor, LlavaProcessor

    ip = LlavaImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_pad=True, do_center_crop=False,
                             crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE, image_token="<image>")


def build_model_and_processor(seed: int = 0, *, vision_layers: int = VISION_LAYERS):
    """Fresh (random-weight) model and its processor (``vision_layers``: depth of the vision tower)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from vlmkit.default.tokenizer import build_tokenizer

    tok = build_tokenizer()
    cfg = build_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, tok.bos_token_id,
                       tok.eos_token_id, vision_layers=vision_layers)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.max_new_tokens = 40
    model.generation_config.do_sample = False
    return model, build_processor(tok)


# ------------------------------------------------------------------------------------------------- geometry

def pad_geometry(width: int, height: int) -> tuple[int, int, int]:
    """(side, off_x, off_y): the square the processor pads a W x H image into, and where the image sits in it."""
    side = max(width, height)
    return side, (side - width) // 2, (side - height) // 2


def token_boxes(width: int, height: int) -> np.ndarray:
    """Pixel box (x0, y0, x1, y1) in the original image of each of the 64 image tokens, float [64, 4], row-major.

    Boxes of tokens that fall (partly) on padding are clipped to the image; fully-padding tokens get empty boxes.
    """
    side, ox, oy = pad_geometry(width, height)
    step = side / GRID
    out = np.zeros((N_IMAGE_TOKENS, 4), np.float32)
    for k in range(N_IMAGE_TOKENS):
        r, c = divmod(k, GRID)
        x0, y0 = c * step - ox, r * step - oy
        out[k] = [max(0, x0), max(0, y0), min(width, x0 + step), min(height, y0 + step)]
    return out


def patch_coverage(mask: np.ndarray) -> np.ndarray:
    """Fraction of each of the 64 token cells covered by a bool [H, W] mask, float [64] (row-major)."""
    from PIL import Image

    h, w = mask.shape
    side, ox, oy = pad_geometry(w, h)
    sq = np.zeros((side, side), np.float32)
    sq[oy:oy + h, ox:ox + w] = mask
    small = np.asarray(Image.fromarray(sq, mode="F").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX))
    return small.reshape(GRID, PATCH, GRID, PATCH).mean(axis=(1, 3)).reshape(-1)
