"""V2P / GUI-Actor pointer head: labels, losses, head, read-out, and ``ground(image, instruction)``.

Design (see ``shared/reference/methods.md`` §4):

* **Keys** are the visual token embeddings as they enter the language model (read with a forward pre-hook on
  ``vlm.adapter.language_model()`` at the image-token positions of the adapter's layout, before any decoder layer).
  The screenshot is read in native-resolution **tiles** (``tile`` = the processor's input size, 96 px for the default
  model): a target of the generated GUI sets is >= 24 px, i.e. >= 2 image tokens of 12 px, which the default model's
  single 96-px view of a whole 480x288 screen could never give (there a token covers 60x36 px). Each tile contributes
  the finest view of its layout; tiles form one regular token grid over the screenshot, and every token carries its
  pixel box in the original image (tiling and reading: :mod:`vlmkit.grounding.screen_tokens`).
* **Query** is the last-layer hidden state at the last prompt position for the *whole* screenshot (the processor's
  own view, no centre crop) and the instruction. When the backbone's tokenizer cannot spell the instruction (the
  default model's word-level scene vocabulary maps every GUI word to ``<unk>``), the head adds its own trained
  instruction embedding (hashed words + character trigrams) to the query — the analogue of GUI-Actor's "new token
  embeddings" that are trained while the backbone stays frozen.
* **Head**: input projection + 2-D Fourier position code, a 3x3 depthwise-separable token mixer over the grid (our
  addition, so that neighbouring tokens of one word are combined), one self-attention block (8 heads, dropout 0.1,
  residual + LayerNorm), key and query 2-layer MLPs, ``logits = q . K^T / sqrt(d)``, softmax over tokens.
* **Labels**: ``binary`` (GUI-Actor), ``center``, ``gaussian`` (V2P, sigma = box side / k); **loss**
  ``KL(y || p) + suppress_weight * sum_{y=0} p``.
* **Read-out**: tokens above ``0.3 * max``, 4-connected regions ranked by their maximum (V2P), click = score-weighted
  mean of the region's token centres; top-k region points are the candidates.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlmkit.errors import InputError, ModelLoadError
from vlmkit.grounding.screen_tokens import ScreenFeatures, query_states, screen_features

LABEL_STYLES = ("binary", "center", "gaussian")
HEAD_FILE, CONFIG_FILE = "pointer_head.safetensors", "pointer_head.json"


# ------------------------------------------------------------------------------------------------- labels
def token_labels(boxes: np.ndarray, target, style: str = "gaussian", k: float = 4.1325) -> np.ndarray:
    """Target distribution over tokens.

    Args:
        boxes: ``[N, 4]`` token boxes ``(x0, y0, x1, y1)`` in image pixels (zero-area boxes get 0).
        target: ground-truth box ``(x1, y1, x2, y2)`` in the same pixels.
        style: ``binary`` (every token overlapping the box), ``center`` (the token holding the box centre) or
            ``gaussian`` (mass of N(centre, (side/k)^2) per axis over the part of the token inside the box).
    Returns:
        float64 ``[N]`` summing to 1, zero for tokens that do not overlap the box.
    """
    if style not in LABEL_STYLES:
        raise InputError(f"label style {style!r}; choose {', '.join(LABEL_STYLES)}")
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1, y1, x2, y2 = (float(v) for v in target)
    if not (x2 > x1 and y2 > y1):
        raise InputError(f"target box {tuple(target)} has no area")
    ix0, iy0 = np.maximum(b[:, 0], x1), np.maximum(b[:, 1], y1)
    ix1, iy1 = np.minimum(b[:, 2], x2), np.minimum(b[:, 3], y2)
    inside = (ix1 > ix0) & (iy1 > iy0)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    holds = (b[:, 0] <= cx) & (cx < b[:, 2]) & (b[:, 1] <= cy) & (cy < b[:, 3])
    if style == "binary":
        y = inside.astype(np.float64)
    elif style == "center" or not inside.any():
        y = np.zeros(len(b))
        if holds.any():
            y[np.flatnonzero(holds)[0]] = 1.0
        else:  # centre outside every token: the nearest token
            d = ((b[:, 0] + b[:, 2]) / 2 - cx) ** 2 + ((b[:, 1] + b[:, 3]) / 2 - cy) ** 2
            y[int(np.argmin(d))] = 1.0
    else:
        sx, sy = (x2 - x1) / k, (y2 - y1) / k
        cdf = lambda v: torch.special.ndtr(torch.as_tensor(v, dtype=torch.float64)).numpy()
        y = (cdf((ix1 - cx) / sx) - cdf((ix0 - cx) / sx)) * (cdf((iy1 - cy) / sy) - cdf((iy0 - cy) / sy))
        y = np.where(inside, np.clip(y, 0.0, None), 0.0)
    s = y.sum()
    if s <= 0:
        raise InputError(f"target box {tuple(target)} does not overlap any image token")
    return y / s


def pointer_losses(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None,
                   suppress_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """``kl`` = KL(labels || softmax(logits)), ``suppress`` = predicted mass on zero-label tokens, ``total``.

    Shapes: ``logits``, ``labels`` ``[B, N]`` (labels sum to 1 per row), ``valid`` bool ``[B, N]``. Batch means.
    """
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    logp = torch.log_softmax(logits.float(), -1)
    pos = labels > 0
    kl = torch.where(pos, labels * (torch.log(labels.clamp_min(1e-12)) - logp), torch.zeros_like(logp)).sum(-1)
    sup = torch.where(pos, torch.zeros_like(logp), logp.exp()).sum(-1)
    kl, sup = kl.mean(), sup.mean()
    return {"kl": kl, "suppress": sup, "total": kl + suppress_weight * sup}


# ------------------------------------------------------------------------------------------------- head
@dataclass
class HeadConfig:
    """Everything needed to rebuild a head and the features it reads (saved as ``pointer_head.json``)."""

    d_key: int
    d_query: int
    d_model: int = 128
    n_heads: int = 8
    dropout: float = 0.1
    text_buckets: int = 4096  # 0: no own instruction embedding (the backbone's tokenizer spells instructions)
    text_dim: int = 64
    pos_freqs: int = 0  # absolute position code: 6 memorised training layouts (held-out 21% vs 30% without)
    local_mix: bool = True
    window: tuple = (0, 0)  # self-attention window in tokens (rows, cols); (0, 0) = global (GUI-Actor)
    label_style: str = "gaussian"
    k: float = 4.1325
    suppress_weight: float = 1.0
    tile: int = 96
    max_tiles: int = 40
    prompt: str = "{instruction}"
    backbone: str = ""
    trained: dict = field(default_factory=dict)  # provenance: steps, data, seconds


def text_ids(instruction: str, buckets: int, max_len: int = 48) -> list[int]:
    """Hashed ids (1..buckets) of the lower-cased words and their character trigrams; 0 is padding."""
    words = [w for w in "".join(c if c.isalnum() else " " for c in instruction.lower()).split() if w]
    toks = [f"w:{w}" for w in words]
    for w in words:
        s = f"<{w}>"
        toks += [f"t:{s[i:i + 3]}" for i in range(len(s) - 2)]
    return [zlib.crc32(t.encode()) % buckets + 1 for t in toks][:max_len]


def fourier(pos: torch.Tensor, freqs: int) -> torch.Tensor:
    """``[..., 2]`` positions in [0, 1] -> ``[..., 4 * freqs]`` sin/cos features."""
    f = (2.0 ** torch.arange(freqs, dtype=pos.dtype, device=pos.device)) * math.pi
    a = pos[..., None] * f  # [..., 2, F]
    return torch.cat([a.sin(), a.cos()], -1).flatten(-2)


class PointerHead(nn.Module):
    """GUI-Actor action head (plus position code, token mixer and own instruction embedding; see module doc)."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.key_in = nn.Linear(cfg.d_key, d)
        if cfg.pos_freqs:
            self.pos_in = nn.Linear(4 * cfg.pos_freqs, d)
        if cfg.local_mix:
            self.mix_dw = nn.Conv2d(d, d, 3, padding=1, groups=d)
            self.mix_pw = nn.Conv2d(d, d, 1)
        self.attn = nn.MultiheadAttention(d, cfg.n_heads, dropout=cfg.dropout, batch_first=True)
        self.drop = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(d)
        self.key_mlp = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        dq = cfg.d_query + (cfg.text_dim if cfg.text_buckets else 0)
        if cfg.text_buckets:
            self.text = nn.Embedding(cfg.text_buckets + 1, cfg.text_dim, padding_idx=0)
        self.query_mlp = nn.Sequential(nn.Linear(dq, d), nn.GELU(), nn.Linear(d, d))

    def encode_keys(self, keys: torch.Tensor, pos: torch.Tensor, grid: tuple[int, int],
                    valid: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, N, d_model]`` pointer keys from ``keys [B, N, d_key]`` (row-major over ``grid``) and ``pos``."""
        B, N, _ = keys.shape
        if grid[0] * grid[1] != N:
            raise InputError(f"grid {grid} does not hold {N} tokens")
        x = self.key_in(keys)
        if self.cfg.pos_freqs:
            x = x + self.pos_in(fourier(pos, self.cfg.pos_freqs))
        if self.cfg.local_mix:
            g = x.transpose(1, 2).reshape(B, -1, *grid)
            x = x + self.mix_pw(torch.nn.functional.gelu(self.mix_dw(g))).flatten(2).transpose(1, 2)
        return self.key_mlp(self.norm(x + self.drop(self._attend(x, grid, valid))))

    def encode_query(self, query: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """``[M, d_model]`` from ``query [M, d_query]`` and hashed instruction ids ``text [M, L]`` (0 = padding)."""
        q_in = query
        if self.cfg.text_buckets:
            if text is None:
                raise InputError("this pointer head needs the instruction's text ids")
            e = self.text(text)
            m = (text > 0).float()[..., None]
            q_in = torch.cat([query, (e * m).sum(1) / m.sum(1).clamp_min(1.0)], -1)
        return self.query_mlp(q_in)

    def forward(self, keys: torch.Tensor, pos: torch.Tensor, query: torch.Tensor, grid: tuple[int, int],
                valid: torch.Tensor | None = None, text: torch.Tensor | None = None,
                image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[M, N]`` over tokens (invalid ones ``-inf``).

        ``keys [B, N, d_key]`` in row-major order of ``grid = (rows, cols)`` (N = rows*cols), ``pos [B, N, 2]``
        token centres in [0, 1], ``valid`` bool ``[B, N]``, ``query [M, d_query]``, ``text`` long ``[M, L]``;
        ``image_index [M]`` says which screenshot each query is about (default: query m <-> screenshot m).
        """
        K = self.encode_keys(keys, pos, grid, valid)
        q = self.encode_query(query, text)
        idx = image_index if image_index is not None else torch.arange(q.shape[0])
        logits = torch.einsum("mnd,md->mn", K[idx], q) / math.sqrt(K.shape[-1])
        return logits if valid is None else logits.masked_fill(~valid[idx], float("-inf"))

    def _attend(self, x: torch.Tensor, grid: tuple[int, int], valid: torch.Tensor | None) -> torch.Tensor:
        """Self-attention over all tokens, or within ``cfg.window`` blocks of the grid (CPU-affordable)."""
        B, N, d = x.shape
        wr, wc = self.cfg.window or (0, 0)
        pad = None if valid is None else ~valid
        if not wr or not wc or (wr, wc) == tuple(grid):
            a, _ = self.attn(x, x, x, key_padding_mask=pad, need_weights=False)
            return a
        R, C = grid
        if R % wr or C % wc:
            raise InputError(f"attention window {(wr, wc)} does not divide the token grid {grid}")

        def blocks(t):  # [B, R*C, ...] -> [B*nw, wr*wc, ...]
            t = t.reshape(B, R // wr, wr, C // wc, wc, *t.shape[2:]).transpose(2, 3)
            return t.reshape(B * (R // wr) * (C // wc), wr * wc, *t.shape[5:])

        xb = blocks(x)
        pb = None if pad is None else blocks(pad)
        if pb is not None:
            pb = pb & ~pb.all(-1, keepdim=True)  # a window with no image: attend anyway (masked later)
        a, _ = self.attn(xb, xb, xb, key_padding_mask=pb, need_weights=False)
        a = a.reshape(B, R // wr, C // wc, wr, wc, d).transpose(2, 3)
        return a.reshape(B, N, d)


def save_head(head: PointerHead, directory: str | Path) -> Path:
    """Write ``pointer_head.safetensors`` + ``pointer_head.json`` into ``directory``."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(out / HEAD_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(asdict(head.cfg), indent=1), encoding="utf-8")
    return out


def load_head(directory: str | Path) -> PointerHead:
    """Rebuild a head saved by :func:`save_head` (eval mode)."""
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / HEAD_FILE).is_file() or not (d / CONFIG_FILE).is_file():
        raise ModelLoadError(f"{d}: no pointer head here (needs {HEAD_FILE} and {CONFIG_FILE})")
    cfg = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
    cfg["window"] = tuple(cfg.get("window", (0, 0)))
    head = PointerHead(HeadConfig(**cfg))
    head.load_state_dict(load_file(str(d / HEAD_FILE)))
    return head.eval()


def head_dir_for(vlm) -> Path | None:
    """The head directory beside ``vlm``'s checkpoint (``<checkpoint>-pointer``), or ``None``."""
    src = getattr(getattr(vlm.model, "config", None), "_name_or_path", "") or ""
    if not src or not Path(src).exists():
        return None
    p = Path(src).resolve()
    return p.parent / f"{p.name}-pointer"


# ------------------------------------------------------------------------------------------------- read-out
def click_from_scores(scores: np.ndarray, grid: tuple[int, int], centres: np.ndarray, threshold: float = 0.3,
                      rank: str = "max", top_k: int = 3) -> list[tuple[float, float, float]]:
    """Candidate clicks ``(x, y, region score)``, best first.

    ``scores [rows*cols]`` (row-major), ``centres [rows*cols, 2]`` token centres. Tokens above ``threshold * max``
    are grouped into 4-connected regions; a region's score is its ``max`` (V2P) or ``mean`` (GUI-Actor); its click
    is the score-weighted mean of its token centres.
    """
    if rank not in ("max", "mean"):
        raise InputError(f"rank {rank!r}: use max or mean")
    R, C = grid
    s = np.asarray(scores, dtype=np.float64).reshape(R, C)
    keep = s > threshold * s.max() if s.max() > 0 else s >= s.max()
    seen = np.zeros_like(keep)
    regions = []
    for r0, c0 in zip(*np.nonzero(keep)):
        if seen[r0, c0]:
            continue
        stack, cells = [(r0, c0)], []
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            cells.append(r * C + c)
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < R and 0 <= cc < C and keep[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        w = s.reshape(-1)[cells]
        xy = (centres[cells] * w[:, None]).sum(0) / max(w.sum(), 1e-12)
        regions.append((float(xy[0]), float(xy[1]), float(w.max() if rank == "max" else w.mean())))
    regions.sort(key=lambda t: -t[2])
    return regions[:top_k]


def paint(values: np.ndarray, boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HxW float32 map: each token's value painted over its pixel box (``size`` = (W, H))."""
    W, H = size
    out = np.zeros((H, W), np.float32)
    for v, (x0, y0, x1, y1) in zip(values, boxes):
        if x1 > x0 and y1 > y0:
            out[int(y0):math.ceil(y1), int(x0):math.ceil(x1)] = v
    return out


# ------------------------------------------------------------------------------------------------- grounding
@dataclass
class GroundingResult:
    """``point`` (x, y) px in the original image; ``candidates`` [(x, y, score)] best first; ``heatmap`` HxW float32
    over the original image; ``source`` = "pointer-head" or "attention" (fallback: last-token attention arg-max)."""

    point: tuple[float, float]
    candidates: list[tuple[float, float, float]]
    heatmap: np.ndarray
    source: str
    size: tuple[int, int]

    @property
    def point_norm(self) -> tuple[float, float]:
        return (self.point[0] / self.size[0], self.point[1] / self.size[1])

    def action(self) -> dict:
        """pyautogui-style action: ``{"action": "click", "x": int, "y": int}``."""
        return {"action": "click", "x": round(self.point[0]), "y": round(self.point[1])}


class Grounder:
    """A VLM plus (optionally) a pointer head. ``ask_batch`` answers "[x, y]" (normalised) so that the eval runner
    (``vlmkit eval screenspot --model vlmkit.grounding.v2p:default_grounder --prompt '{instruction}'``) can use it."""

    def __init__(self, vlm, head: PointerHead | None = None, *, top_k: int = 3, rank: str = "max") -> None:
        self.vlm, self.head, self.top_k, self.rank = vlm, head, top_k, rank
        self._features: dict[str, tuple] = {}  # a few recent screenshots (eval asks several per screen)
        self.name = f"{getattr(vlm, 'name', 'vlm')}+{'pointer' if head is not None else 'attention'}"

    def prompt(self, question: str) -> str:
        return self.vlm.prompt(self._prompt(question))

    def _prompt(self, instruction: str) -> str:
        return self.head.cfg.prompt.format(instruction=instruction) if self.head is not None else instruction

    def ground(self, image, instruction: str, features: ScreenFeatures | None = None) -> GroundingResult:
        from vlmkit.io import load_image

        if not isinstance(instruction, str) or not instruction.strip():
            raise InputError("ground() needs a non-empty instruction")
        image = load_image(image)
        if self.head is None:
            return attention_grounding(self.vlm, image, instruction, self.top_k)
        cfg = self.head.cfg
        f, K = self._screen(image) if features is None else (features, None)
        valid = torch.as_tensor(f.valid)
        q = query_states(self.vlm, [image], [instruction], cfg.prompt)
        text = torch.as_tensor([text_ids(instruction, cfg.text_buckets) or [0]]) if cfg.text_buckets else None
        with torch.no_grad():
            if K is None:
                K = self.head.encode_keys(f.keys[None], f.pos()[None], f.grid, valid[None])[0]
            logits = (K @ self.head.encode_query(q, text)[0]) / math.sqrt(K.shape[-1])
        p = torch.softmax(logits.masked_fill(~valid, float("-inf")), -1).numpy()
        cands = click_from_scores(p, f.grid, f.centres, rank=self.rank, top_k=self.top_k)
        return GroundingResult(cands[0][:2], cands, paint(p, f.boxes, f.size), "pointer-head", f.size)

    def _screen(self, image) -> tuple[ScreenFeatures, torch.Tensor]:
        """Features and encoded pointer keys ``[N, d_model]`` of a screenshot (cached for a few screenshots)."""
        import hashlib

        key = hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()
        if key not in self._features:
            if len(self._features) >= 4:
                self._features.pop(next(iter(self._features)))
            f = screen_features(self.vlm, image, self.head.cfg.tile, self.head.cfg.max_tiles)
            with torch.no_grad():
                K = self.head.encode_keys(f.keys[None], f.pos()[None], f.grid, torch.as_tensor(f.valid)[None])[0]
            self._features[key] = (f, K)
        return self._features[key]

    def ask_batch(self, images: list, questions: list[str], **gen) -> list[str]:
        out = []
        for im, q in zip(images, questions):
            x, y = self.ground(im, q).point_norm
            out.append(f"[{x:.4f}, {y:.4f}]")
        return out


def attention_grounding(vlm, image, instruction: str, top_k: int = 3) -> GroundingResult:
    """Fallback without a head: the last prompt row's attention to image tokens (all layers and heads averaged),
    arg-max token centre as the click, the next-best tokens as candidates."""
    with vlm.capture(rows="last") as rec:
        vlm.forward([image], [instruction])
    maps = rec.maps
    vals = maps.prefill.float().mean((0, 1))[-1].numpy()  # [image_tokens]
    lay = maps.layout
    view = max(lay.images[0].views, key=lambda v: v.positions.size)
    cols = lay.column_index(view.positions)
    v, boxes = vals[cols], view.boxes
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)
    order = np.argsort(-np.where(view.valid, v, -np.inf))[:top_k]
    cands = [(float(centres[i, 0]), float(centres[i, 1]), float(v[i])) for i in order]
    size = image.size
    return GroundingResult(cands[0][:2], cands, paint(v, boxes, size), "attention", size)


def default_head_dir() -> Path:
    from vlmkit.default import CHECKPOINT_DIR

    return CHECKPOINT_DIR.parent / f"{CHECKPOINT_DIR.name}-pointer"


def make_grounder(vlm=None, head: str | Path | PointerHead | None = None, fallback: bool = True, **kw) -> Grounder:
    """A :class:`Grounder` for ``vlm`` (default model if ``None``) with ``head`` (a directory or a head; default:
    the directory beside the checkpoint). Without a head: attention-only if ``fallback`` else ``ModelLoadError``."""
    import vlmkit

    vlm = vlm if vlm is not None else vlmkit.load()
    if head is None:
        d = head_dir_for(vlm)
        head = d if d is not None and (d / HEAD_FILE).is_file() else None
    if isinstance(head, (str, Path)):
        head = load_head(head)
    if head is None and not fallback:
        raise ModelLoadError(f"{getattr(vlm, 'name', 'this model')} has no trained pointer head; train one with "
                             "`vlmkit train-grounding` or allow the attention-only fallback")
    if head is not None:
        dk = vlm.adapter.language_model().config.hidden_size if hasattr(vlm.adapter.language_model(), "config") \
            else None
        if dk is not None and dk not in (head.cfg.d_key,):
            raise ModelLoadError(f"pointer head expects {head.cfg.d_key}-d tokens but {vlm.name} gives {dk}-d")
    return Grounder(vlm, head, **kw)


def default_grounder() -> Grounder:
    """Factory for the eval runner (``--model vlmkit.grounding.v2p:default_grounder``)."""
    return make_grounder()


def ground(image, instruction: str, *, vlm=None, head=None, top_k: int = 3) -> GroundingResult:
    """Click point, top-k candidates and heat map for ``instruction`` on ``image`` (see :class:`GroundingResult`).

    Uses the pointer head beside ``vlm``'s checkpoint (the default model ships one); models without a head fall back
    to attention-only grounding, reported as ``result.source == "attention"``.
    """
    return make_grounder(vlm, head, top_k=top_k).ground(image, instruction)
