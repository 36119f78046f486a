"""Offline word-level tokenizer of the embedded default model.

Text is NFKC-normalised and lower-cased; hyphens, quotes, brackets, ``!`` and ``;`` become spaces; ``? . , :`` are
split off as their own tokens. So "Is there a red circle in the image?" encodes without unknown tokens.
Decoding joins words with spaces and glues punctuation back ("red circle, blue star").
"""
from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from vlmkit.data.scenes import COLORS, SHAPES

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIAL = (PAD, UNK, BOS, EOS, IMAGE)

PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses",
           "heart": "hearts", "diamond": "diamonds", "hexagon": "hexagons"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve")
LOCATION_WORDS = ("top", "bottom", "left", "right", "center", "middle", "centre", "upper", "lower", "corner")
WORDS = (
    "user", "assistant", "system", "is", "are", "there", "a", "an", "the", "in", "on", "of", "this", "that", "image",
    "picture", "photo", "scene", "any", "some", "what", "which", "color", "colour", "colors", "shape", "shapes",
    "object", "objects", "thing", "things", "how", "many", "much", "do", "does", "you", "see", "can", "find",
    "where", "located", "describe", "shows", "show", "and", "with", "it", "its", "yes", "no", "not", "list", "all",
    "count", "number", "kind", "type", "me", "tell", "please", "s", "i", "to", "be", "at", "by", "here", "visible",
    "contain", "contains", "present", "name", "names", "region", "part", "side", "background", "other", "only",
    "one", "or", "each", "for", "give", "about", "question", "answer", "nothing", "none", "has", "have", "whats",
    "pink", "brown", "gray", "grey", "cyan", "rectangle", "oval", "pentagon", "ring", "dot", "line", "shown",
)
PUNCT = ("?", ".", ",", ":")


def vocabulary() -> list[str]:
    """The full token list, specials first (ids are list positions)."""
    words = list(SPECIAL) + list(PUNCT)
    for group in (WORDS, SHAPES, PLURALS.values(), COLORS, NUMBER_WORDS, LOCATION_WORDS,
                  [str(i) for i in range(13)]):
        for w in group:
            if w not in words:
                words.append(w)
    return words


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` (recorded as ``TokenizersBackend`` in transformers 5) over :func:`vocabulary`."""
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tk.normalizer = normalizers.Sequence([
        normalizers.NFKC(), normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[!;\"'`()\[\]{}\-_/\\*#&|~^+=@$%]"), " "),
    ])
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Punctuation(behavior="isolated")])
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token=UNK, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                  extra_special_tokens={"image_token": IMAGE}, model_max_length=512)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE]})
    return tok


def unknown_words(tokenizer, text: str) -> list[str]:
    """Words of ``text`` that ``tokenizer`` maps to the unknown token (empty list if none)."""
    enc = tokenizer(text, add_special_tokens=False)
    toks = tokenizer.convert_ids_to_tokens(enc["input_ids"])
    return [t for t, i in zip(toks, enc["input_ids"]) if i == tokenizer.unk_token_id]
