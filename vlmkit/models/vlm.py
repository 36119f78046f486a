"""The :class:`VLM` wrapper: load a transformers VLM, ask it questions, capture its attention."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlmkit.errors import InputError, ModelLoadError
from vlmkit.models._adapter import FamilyAdapter, adapter_class, supported_model_types


@dataclass
class Generation:
    """Generation settings. Always explicit: nothing is taken from a checkpoint's ``generation_config`` except the
    stop tokens (``eos_token_id``), which are part of the model's vocabulary contract."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1
    repetition_penalty: float = 1.0

    def replace(self, **kw) -> "Generation":
        unknown = set(kw) - set(self.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown generation settings {sorted(unknown)}; known: {sorted(self.__dataclass_fields__)}")
        return Generation(**{**self.__dict__, **kw})


@dataclass
class Answer:
    """Result of :meth:`VLM.generate` for one sample."""

    text: str
    token_ids: list[int]
    tokens: list[str]
    prompt: str
    prompt_ids: list[int] = field(default_factory=list)


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[str(dtype)]
    except KeyError:
        raise ValueError(f"dtype {dtype!r}: use float32, float16 or bfloat16") from None


class VLM:
    """A transformers VLM with its processor and family adapter.

    Use :func:`vlmkit.load` to build one. ``ask`` answers one question; ``capture`` records exact attention maps.
    Capture state lives on this object and a lock serialises calls, so two threads never mix their captures.
    """

    def __init__(self, model, processor, *, name: str | None = None, generation: Generation | None = None) -> None:
        from transformers import GenerationConfig

        from vlmkit.attention.backend import AttentionState, register_backend

        model_type = model.config.model_type
        cls = adapter_class(model_type)
        if cls is None:
            raise ModelLoadError(f"unsupported architecture {model_type!r}; vlmkit supports "
                                 f"{', '.join(supported_model_types())}")
        self.model = model.eval()
        self.processor = processor
        self.adapter: FamilyAdapter = cls(model, processor)
        self.name = name or getattr(model.config, "_name_or_path", "") or model_type
        self.generation = generation or Generation()
        self._lock = threading.RLock()
        self._state = AttentionState()
        tok = processor.tokenizer
        eos = self._stop_ids(model, tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
        self._token_ids = {"eos_token_id": eos, "pad_token_id": pad, "bos_token_id": tok.bos_token_id}
        # Replace whatever the checkpoint shipped: settings come from self.generation only.
        self.model.generation_config = GenerationConfig(**self._token_ids)
        register_backend()
        self.model.set_attn_implementation({"text_config": "vlmkit"})

    @staticmethod
    def _stop_ids(model, tok) -> list[int]:
        ids = []
        shipped = getattr(model, "generation_config", None)
        for src in (tok.eos_token_id, getattr(shipped, "eos_token_id", None)):
            for i in ([src] if isinstance(src, int) else (src or [])):
                if i not in ids:
                    ids.append(int(i))
        return ids

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def family(self) -> str:
        return self.model.config.model_type

    # ------------------------------------------------------------------ prompting
    def prompt(self, question: str | None = None, *, messages: list[dict] | None = None) -> str:
        """The exact prompt text ``ask`` sends (image placeholder unexpanded)."""
        return self.adapter.prompt(question, messages=messages)

    def encode(self, images: list, prompts: list[str]):
        """Processor outputs for one image per prompt (left padding), the layouts and each row's padding."""
        from vlmkit.io import load_image

        pil = [load_image(im) for im in images]
        try:
            inputs = self.adapter.encode(pil, prompts)
        except ValueError as e:  # processors reject e.g. aspect ratios > 200 or images too small to patch
            names = ", ".join(f"{im.width}x{im.height}" for im in pil)
            raise InputError(f"image ({names}) cannot be processed by {self.family}: {e}") from e
        layouts, pads = self.adapter.layouts(inputs, [[im.size] for im in pil])
        return inputs.to(self.device), layouts, pads, pil

    # ------------------------------------------------------------------ generation
    def generate(self, images: list, questions: list[str] | None = None, *, messages: list[list[dict]] | None = None,
                 **gen) -> list[Answer]:
        """Answer a batch (one image per question), greedy unless asked. Returns one :class:`Answer` per sample."""
        if messages is not None:
            prompts = [self.prompt(messages=m) for m in messages]
        else:
            if questions is None or len(questions) != len(images):
                raise ValueError("generate() needs one question per image")
            prompts = [self.prompt(q) for q in questions]
        settings = self.generation.replace(**gen)
        with self._lock:
            inputs, layouts, pads, _ = self.encode(images, prompts)
            tok = self.processor.tokenizer
            ids = inputs["input_ids"]
            with self._session(inputs, layouts, pads) as processors, torch.inference_mode():
                out = self.model.generate(**inputs, **self._generate_kwargs(settings),
                                          logits_processor=processors or None)
                answers = []
                stops = set(self._token_ids["eos_token_id"])
                for b in range(out.shape[0]):
                    new = out[b, ids.shape[1]:].tolist()
                    for i, t in enumerate(new):
                        if t in stops:
                            new = new[:i + 1]
                            break
                    text = tok.decode(new, skip_special_tokens=True).strip()
                    answers.append(Answer(text, new, tok.convert_ids_to_tokens(new), prompts[b],
                                          ids[b, pads[b]:].tolist()))
                if self._state.recorder is not None:
                    self._state.recorder.finish([a.tokens for a in answers])
            return answers

    def forward(self, images: list, questions: list[str] | None = None, *,
                prompts: list[str] | None = None) -> torch.Tensor:
        """Logits ``[B, N, vocab]`` of one forward pass (left-padded), with any active capture (prompt rows only)
        and interventions applied. ``questions`` are wrapped by :meth:`prompt`; ``prompts`` are full texts used
        as they are (e.g. a prompt followed by an answer, to read the attention of the answer's tokens)."""
        if (questions is None) == (prompts is None):
            raise ValueError("VLM.forward takes either questions or prompts=")
        prompts = list(prompts) if prompts is not None else [self.prompt(q) for q in questions]
        with self._lock:
            inputs, layouts, pads, _ = self.encode(images, prompts)
            with self._session(inputs, layouts, pads), torch.inference_mode():
                logits = self.model(**inputs).logits
                if self._state.recorder is not None:
                    self._state.recorder.finish([[] for _ in prompts])
            return logits

    @contextmanager
    def session(self, images: list | None = None, questions: list[str] | None = None, *,
                prompts: list[str] | None = None, encoded: tuple | None = None):
        """Encode a batch and hold this VLM for a custom forward: yields ``(inputs, layouts, pads)`` with any active
        capture and interventions applied to calls of ``vlm.model(**inputs)`` made inside the block.

        ``encoded``: ``(inputs, layouts, pads)`` made earlier by :meth:`encode` (or merged from several such with
        :func:`vlmkit.models.vlm.merge_encoded`); the images and prompts are then not encoded again.
        Gradients are allowed (this is how saliency methods run); the lock is held for the whole block.
        """
        with self._lock:
            if encoded is not None:
                inputs, layouts, pads = encoded
            else:
                prompts = prompts if prompts is not None else [self.prompt(q) for q in questions]
                inputs, layouts, pads, _ = self.encode(images, prompts)
            with self._session(inputs, layouts, pads):
                yield inputs, layouts, pads

    @contextmanager
    def _session(self, inputs, layouts, pads):
        """Per-call context: the :class:`Batch` the backend sees, recorder planning, interventions' setup.
        Yields the logits processors that interventions contribute."""
        from vlmkit.attention.hooks import Batch

        state = self._state
        processors = []
        ids = inputs["input_ids"]
        self.adapter.reset_state()
        try:
            if state.active:
                state.batch = Batch(ids, pads, layouts)
                if state.recorder is not None:
                    tok = self.processor.tokenizer
                    state.recorder.begin(ids.cpu(), layouts, pads, [tok.convert_ids_to_tokens(ids[b, p:].tolist())
                                                                    for b, p in enumerate(pads)])
                for iv in state.interventions:
                    iv.setup(self, state.batch, inputs)
                    processors += iv.processors(self, state.batch, inputs)
            yield processors
        finally:
            self.adapter.reset_state()
            state.batch = None

    def _generate_kwargs(self, s: Generation) -> dict:
        from transformers import GenerationConfig

        cfg = dict(max_new_tokens=s.max_new_tokens, do_sample=s.do_sample, num_beams=s.num_beams,
                   repetition_penalty=s.repetition_penalty, **self._token_ids)
        if s.do_sample:
            cfg.update(temperature=s.temperature, top_p=s.top_p)
        return {"generation_config": GenerationConfig(**cfg)}

    def ask(self, image, question: str | None = None, *, messages: list[dict] | None = None, **gen) -> str:
        """Answer one question about one image (path, PIL image or array). Greedy unless ``do_sample=True``."""
        msgs = [messages] if messages is not None else None
        return self.generate([image], None if msgs else [question], messages=msgs, **gen)[0].text

    def ask_batch(self, images: list, questions: list[str], **gen) -> list[str]:
        """Answer a batch; left padding makes every answer the same as asking alone."""
        return [a.text for a in self.generate(images, questions, **gen)]

    # ------------------------------------------------------------------ attention
    @contextmanager
    def capture(self, layers=None, rows="last"):
        """Record exact text-to-image attention of the calls made inside the block.

        ``with vlm.capture(layers=None, rows="last") as rec: vlm.ask(...)``; then ``rec.maps`` (one sample) or
        ``rec.samples``. Holds this VLM's lock for the whole block; the model is restored on exit.
        """
        from vlmkit.attention.capture import Recorder

        with self._lock:
            if self._state.recorder is not None:
                raise RuntimeError("a capture is already active on this VLM")
            rec = Recorder(self.adapter.num_layers, layers=layers, rows=rows)
            with self._activate(recorder=rec):
                yield rec

    @contextmanager
    def intervene(self, *interventions):
        """Apply interventions (objects or registered names) to the calls made inside the block; they compose.

        ``with vlm.intervene(vlmkit.methods.PAINT(alpha=0.7)): vlm.ask(...)``. The model is restored on exit.
        """
        from vlmkit.attention.hooks import make_intervention

        ivs = [make_intervention(iv) if isinstance(iv, str) else iv for iv in interventions]
        with self._lock:
            for iv in ivs:
                iv.bind(self)
            with self._activate(interventions=ivs):
                yield ivs

    @contextmanager
    def isolated(self, interventions=(), batch=None):
        """For side forwards run from inside another call (an intervention's ``setup``, a second decoding branch):
        the backend sees only ``interventions`` and ``batch`` (no recorder) for the block; all is restored after.
        With the defaults the model runs plain (no capture, no edits). Model state such as Qwen's ``rope_deltas`` is
        the caller's to save and restore (``adapter.swap_state``)."""
        state = self._state
        saved = (state.recorder, state.interventions, state.batch)
        state.recorder, state.interventions, state.batch = None, list(interventions), batch
        try:
            yield
        finally:
            state.recorder, state.interventions, state.batch = saved

    @contextmanager
    def _activate(self, recorder=None, interventions=()):
        state = self._state
        was_active = state.active
        old_rec, old_ivs = state.recorder, list(state.interventions)
        state.recorder = recorder if recorder is not None else old_rec
        state.interventions = old_ivs + list(interventions)
        residual_before = was_active and any(iv.needs_residual for iv in old_ivs)
        residual_now = any(iv.needs_residual for iv in state.interventions)
        try:
            with state.attached([] if was_active else self.adapter.attention_modules(),
                                self.adapter.decoder_layers() if residual_now and not residual_before else None):
                yield
        finally:
            state.recorder, state.interventions = old_rec, old_ivs


def merge_encoded(parts: list[tuple], pad_id: int) -> tuple:
    """One batch from several :meth:`VLM.encode` results ``(inputs, layouts, pads)``: rows are re-padded on the
    left to the longest (``pad_id`` for ``input_ids``, 0 for the mask and other integer ``[rows, L]`` tensors) and
    every other tensor is concatenated along dim 0; layouts are concatenated and pads shifted by the added padding.
    """
    L = max(p[0]["input_ids"].shape[1] for p in parts)
    merged, layouts, pads = {}, [], []
    for key in parts[0][0].keys():
        ts = []
        for inputs, _, _ in parts:
            t, ids = inputs[key], inputs["input_ids"]
            if t.dim() == 2 and t.shape == ids.shape and not t.is_floating_point() and t.shape[1] < L:
                fill = pad_id if key == "input_ids" else 0
                t = torch.cat([t.new_full((t.shape[0], L - t.shape[1]), fill), t], 1)
            ts.append(t)
        merged[key] = torch.cat(ts, 0)
    for inputs, lay, pad in parts:
        extra = L - inputs["input_ids"].shape[1]
        layouts += list(lay)
        pads += [int(p) + extra for p in pad]
    return merged, layouts, pads


def default_model_path() -> Path:
    """Directory of the embedded default model shipped inside the package."""
    from vlmkit.default import shipped_dir

    return shipped_dir("default")


def _resolve(path) -> str:
    if path is None:
        p = default_model_path()
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"the embedded default model is missing from this install ({p}); "
                                 "run `vlmkit train-default` or pass a checkpoint with --model PATH")
        return str(p)
    p = Path(os.path.expanduser(str(path)))
    from vlmkit.default import SHIPPED, shipped_dir

    if not p.exists() and str(path) in SHIPPED:  # a shipped checkpoint by name ("default", "gui")
        p = shipped_dir(str(path))
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"the shipped checkpoint {path!r} is missing from this install ({p})")
        return str(p)
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise ModelLoadError(f"{path}: not a model directory (no config.json); pass the folder that "
                                 "save_pretrained wrote")
        return str(p)
    if str(path).count("/") != 1 or str(path).startswith((".", "/", "~")):
        raise ModelLoadError(f"{path}: no such directory; pass a local checkpoint directory or a hub id already "
                             "in the local Hugging Face cache")
    return str(path)


def load(path=None, *, device: str = "cpu", dtype=None, trust_remote_code: bool = False,
         generation: Generation | None = None) -> VLM:
    """Load a VLM and its processor from a local directory or the local HF cache (``None``: the embedded default;
    a name of a checkpoint shipped in the package: ``"default"``, ``"gui"``, see ``vlmkit.default.SHIPPED``).

    Only safetensors weights are read, ``trust_remote_code`` is off unless asked, and nothing is downloaded.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    src = _resolve(path)
    kw = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(src, **kw)
    except (OSError, ValueError) as e:
        if Path(src).exists():
            raise ModelLoadError(f"{src}: cannot read the model config ({str(e).splitlines()[0]})") from e
        raise ModelLoadError(f"{src}: not a local directory and not in the local Hugging Face cache "
                             f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}); download it where the "
                             f"hub is reachable (`hf download {src}`) or pass a local directory") from e
    if adapter_class(config.model_type) is None:
        raise ModelLoadError(f"{src}: unsupported architecture {config.model_type!r}; vlmkit supports "
                             f"{', '.join(supported_model_types())}")
    try:
        model = AutoModelForImageTextToText.from_pretrained(src, dtype=_dtype(dtype) or torch.float32,
                                                            attn_implementation="sdpa", use_safetensors=True, **kw)
        processor = AutoProcessor.from_pretrained(src, **kw)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{src}: failed to load ({str(e).splitlines()[0]}); vlmkit reads safetensors "
                             "checkpoints only") from e
    model.to(device)
    return VLM(model, processor, name=str(path) if path is not None else "vlmkit-default", generation=generation)
