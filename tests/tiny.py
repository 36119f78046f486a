"""Tiny random-weight models and offline processors of the real transformers classes, for tests and benches.

``build(family, **overrides) -> (model, processor)``; ``FAMILIES`` lists the supported names. Nothing is downloaded.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
WORDS = ("user assistant is there a an the red green blue circle square in image what color shape of how many "
         "? . , yes no : \n one two three describe where left right top bottom").split(" ")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def tiny_tokenizer(extra_special: list[str] = (), vocab_size: int = 128, image_token: str = "<image>"):
    """A WordLevel tokenizer; ids 0..4 are <pad> <unk> <s> </s> <image> (the image token's id is given by ``image_token``)."""
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL) + [t for t in extra_special if t not in SPECIAL]
    vocab: dict[str, int] = {}
    for w in specials + WORDS:
        vocab.setdefault(w, len(vocab))
    for i in range(len(vocab), vocab_size - 0):
        vocab[f"w{i}"] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", additional_special_tokens=specials[4:])
    return tok


def _txt(vocab: int = 128, layers: int = 2, heads: int = 4, kv: int = 2, hidden: int = 32):
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096, pad_token_id=0,
                bos_token_id=2, eos_token_id=3)


def build_llava(image_size: int = 16, patch: int = 4, layers: int = 2, processor_kwargs: dict | None = None,
                pad: bool = False, hidden: int = 32, heads: int = 4, kv: int = 2):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaImageProcessor, LlavaProcessor

    tok = tiny_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    cfg = LlavaConfig(
        text_config=dict(model_type="llama", **_txt(layers=layers, heads=heads, kv=kv, hidden=hidden)),
        vision_config=dict(model_type="clip_vision_model", image_size=image_size, patch_size=patch, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
        image_token_index=image_id, image_seq_length=(image_size // patch) ** 2, vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    ip_kwargs = dict(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                     do_center_crop=not pad, do_pad=pad)
    ip_kwargs.update(processor_kwargs or {})
    proc = LlavaProcessor(image_processor=LlavaImageProcessor(**ip_kwargs), tokenizer=tok, patch_size=patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)
    return model, proc


def build_qwen(version: str = "2", processor_kwargs: dict | None = None, layers: int = 2):
    from transformers import (Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    tok = tiny_tokenizer(extra_special=["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                      "<|vision_end|>"]}
    txt = dict(**_txt(layers=layers), rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1],
                                                        "rope_theta": 1e4})
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    if version == "2":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        cfg = Qwen2VLConfig(text_config=txt, vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4,
                                                                patch_size=2, spatial_merge_size=2,
                                                                temporal_patch_size=2), **common)
        model = Qwen2VLForConditionalGeneration(cfg).eval()
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        cfg = Qwen2_5_VLConfig(text_config=txt, vision_config=dict(depth=2, hidden_size=32, intermediate_size=64,
                                                                   out_hidden_size=32, num_heads=4, patch_size=2,
                                                                   spatial_merge_size=2, temporal_patch_size=2,
                                                                   window_size=8, fullatt_block_indexes=[1]),
                               **common)
        model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    ip_kwargs = dict(patch_size=2, merge_size=2, temporal_patch_size=2,
                     size={"shortest_edge": 16, "longest_edge": 64 * 64})
    ip_kwargs.update(processor_kwargs or {})
    template = (
        "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<|vision_start|> <|image_pad|> <|vision_end|> {% else %}{{ c['text'] }} "
        "{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**ip_kwargs), tokenizer=tok,
                            video_processor=Qwen2VLVideoProcessor(patch_size=2, merge_size=2, temporal_patch_size=2),
                            chat_template=template)
    return model, proc


# ---------------------------------------------------------------- LLaVA-NeXT, Idefics3, SmolVLM

TINY_PINPOINTS = [[16, 32], [32, 16], [32, 32], [16, 48], [48, 16]]  # the real list's shapes at crop 16
REAL_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
IDEFICS_SPECIAL = (["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
                   + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])
IDEFICS_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}<end_of_utterance> "
    "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
)


def _clip_vision(image_size: int, patch: int) -> dict:
    return dict(model_type="clip_vision_model", image_size=image_size, patch_size=patch, hidden_size=32,
                intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)


def llava_next_processor(tok, crop: int = 16, patch: int = 4, pinpoints=None):
    """A ``LlavaNextProcessor`` with crop-size tiles, the given pinpoints and the "default" (CLS-dropping) strategy."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    ip = LlavaNextImageProcessor(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop},
                                 image_grid_pinpoints=pinpoints or TINY_PINPOINTS)
    return LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=patch,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=CHAT_TEMPLATE)


def build_llava_next(image_size: int = 16, patch: int = 4, layers: int = 2, pinpoints=None):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    tok = tiny_tokenizer()
    cfg = LlavaNextConfig(text_config=dict(model_type="llama", **_txt(layers=layers)),
                          vision_config=_clip_vision(image_size, patch),
                          image_token_index=tok.convert_tokens_to_ids("<image>"),
                          image_grid_pinpoints=pinpoints or TINY_PINPOINTS, vision_feature_layer=-1,
                          vision_feature_select_strategy="default", image_seq_length=(image_size // patch) ** 2)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    return model, llava_next_processor(tok, image_size, patch, pinpoints)


def idefics_tokenizer():
    return tiny_tokenizer(extra_special=IDEFICS_SPECIAL)


def idefics_processor(family: str, tok, tile: int = 16, longest: int = 64, seq_len: int = 4):
    """``Idefics3Processor`` or ``SmolVLMProcessor``: ``tile``-px tiles, ``longest``-px resize, ``seq_len`` per tile."""
    kw = dict(size={"longest_edge": longest}, max_image_size={"longest_edge": tile}, do_image_splitting=True)
    if family == "idefics3":
        from transformers import Idefics3ImageProcessor, Idefics3Processor

        return Idefics3Processor(image_processor=Idefics3ImageProcessor(**kw), tokenizer=tok, image_seq_len=seq_len,
                                 chat_template=IDEFICS_TEMPLATE)
    from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    video = SmolVLMVideoProcessor(size={"longest_edge": longest}, max_image_size={"longest_edge": tile})
    return SmolVLMProcessor(image_processor=SmolVLMImageProcessor(**kw), tokenizer=tok, video_processor=video,
                            image_seq_len=seq_len, chat_template=IDEFICS_TEMPLATE)


def build_idefics(family: str = "idefics3", tile: int = 16, patch: int = 4, scale: int = 2, longest: int = 64,
                  layers: int = 2):
    """Tiny Idefics3 / SmolVLM: ``tile``-px tiles of ``(tile/patch/scale)**2`` tokens each."""
    tok = idefics_tokenizer()
    common = dict(text_config=dict(model_type="llama", **_txt(layers=layers)),
                  vision_config=dict(image_size=tile, patch_size=patch, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4),
                  scale_factor=scale, image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    if family == "idefics3":
        from transformers import Idefics3Config, Idefics3ForConditionalGeneration

        model = Idefics3ForConditionalGeneration(Idefics3Config(**common)).eval()
    else:
        from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

        model = SmolVLMForConditionalGeneration(SmolVLMConfig(**common)).eval()
    return model, idefics_processor(family, tok, tile, longest, (tile // patch // scale) ** 2)


def real_processor(family: str):
    """A processor with the real checkpoints' image settings (and the tiny tokenizer, so ids match ``build``).

    No weights: use it with the tiny model's config (token ids) and run only the processor. LLaVA-1.5: 336/14 = 576
    tokens; LLaVA-NeXT: 336 tiles, the real pinpoints; Qwen2(.5)-VL: patch 14, merge 2, min/max pixels
    56*56 / 28*28*1280; Idefics3: 364-px tiles, longest edge 4*364, 169 tokens; SmolVLM: 512-px tiles, longest edge
    4*512, 64 tokens.
    """
    if family == "llava":
        from transformers import LlavaImageProcessor, LlavaProcessor

        ip = LlavaImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
        return LlavaProcessor(image_processor=ip, tokenizer=tiny_tokenizer(), patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=CHAT_TEMPLATE)
    if family == "llava_next":
        return llava_next_processor(tiny_tokenizer(), 336, 14, REAL_PINPOINTS)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

        tiny = build_qwen("2" if family == "qwen2_vl" else "2.5", layers=1)[1]  # same tokenizer and template
        geo = dict(patch_size=14, merge_size=2, temporal_patch_size=2)
        ip = Qwen2VLImageProcessor(**geo, size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280})
        return Qwen2VLProcessor(image_processor=ip, tokenizer=tiny.tokenizer,
                                video_processor=Qwen2VLVideoProcessor(**geo), chat_template=tiny.chat_template)
    if family == "idefics3":
        return idefics_processor(family, idefics_tokenizer(), tile=364, longest=4 * 364, seq_len=169)
    if family == "smolvlm":
        return idefics_processor(family, idefics_tokenizer(), tile=512, longest=4 * 512, seq_len=64)
    raise KeyError(f"no real-size processor for family {family!r}; known: {', '.join(FAMILIES)}")


BUILDERS = {
    "llava": build_llava,
    "llava_next": build_llava_next,
    "qwen2_vl": lambda **kw: build_qwen("2", **kw),
    "qwen2_5_vl": lambda **kw: build_qwen("2.5", **kw),
    "idefics3": lambda **kw: build_idefics("idefics3", **kw),
    "smolvlm": lambda **kw: build_idefics("smolvlm", **kw),
}
FAMILIES = tuple(BUILDERS)


def build(family: str, **kwargs):
    """``(model, processor)`` for a tiny random-weight model of ``family``."""
    return BUILDERS[family](**kwargs)


def random_image(w: int, h: int, seed: int = 0):
    """A ``w x h`` RGB PIL image of uniform noise (seeded)."""
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))
