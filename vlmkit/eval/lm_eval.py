"""lm-eval (EleutherAI lm-evaluation-harness 0.4.13) adapter: run lm-eval tasks through a vlmkit VLM.

lm-eval 0.4.13 discovers no plugins, so importing this module registers :class:`VlmkitLM` in lm-eval's model
registry as ``"vlmkit"`` (after lm-eval's own models, which its registry only loads lazily when empty).

* Python: ``lm_eval.simple_evaluate(model=VlmkitLM(pretrained=PATH, method="paint", alpha=0.5), tasks=[...])``,
  or ``model="vlmkit", model_args="pretrained=PATH,method=paint,alpha=0.5"`` once this module is imported.
* Command line: ``vlmkit lm-eval --model vlmkit --model_args pretrained=PATH,method=paint,alpha=0.5 --tasks T``
  (:func:`run_cli`: registers the model, then runs lm-eval's own command line; ``--model vlmkit`` is the default).

Requests must carry one image each (task YAML ``doc_to_image``); the task text (``doc_to_text``, its ``<image>``
placeholders removed) is the question, and vlmkit wraps it in the model's own chat prompt (``vlm.prompt``), so
``--apply_chat_template`` is not needed. ``generate_until`` goes through :meth:`VLM.generate` and ``loglikelihood``
through one forward pass in :meth:`VLM.session`, both inside ``vlm.intervene(method)``: attention/head edits apply
to both, a method's logits processors (second-branch methods such as VCD) to ``generate_until`` only.
``loglikelihood_rolling`` (text perplexity) is not supported.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models first: its get_model() fills the registry only if empty)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from vlmkit.errors import InputError
from vlmkit.eval import runner

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
GENERATION_KEYS = {"do_sample", "temperature", "top_p", "num_beams", "repetition_penalty"}


def _question(context: str) -> str:
    """The task text without lm-eval's ``<image>`` placeholders (vlmkit's prompt places the image itself)."""
    return context.replace(IMAGE_PLACEHOLDER, " ").strip()


def _image(visual: Any, where: str):
    """RGB PIL image from what a task's ``doc_to_image`` gives: PIL image, path, bytes, array or datasets'
    undecoded ``{"bytes", "path"}`` dict."""
    from vlmkit.io import load_image

    if isinstance(visual, dict):
        visual = visual.get("bytes") or visual.get("path")
    if visual is None:
        raise InputError(f"{where}: the task gave no image (check the YAML's doc_to_image)")
    return load_image(visual, name=where)


def _batch_size(value: Any) -> int:
    if value in (None, "auto") or (isinstance(value, str) and value.startswith("auto")):
        return 8
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise InputError(f"batch_size={value!r}: use a positive integer") from None
    if size < 1:
        raise InputError(f"batch_size={value!r}: use a positive integer")
    return size


@register_model("vlmkit")
class VlmkitLM(LM):
    """lm-eval model ``"vlmkit"``: a vlmkit VLM, optionally with an intervention.

    Args:
        pretrained: checkpoint directory or cached hub id for :func:`vlmkit.load` (``None``: the embedded default).
        method: registered intervention name (``vlmkit.attention.hooks.make_intervention``); ``"none"``: no edit.
        batch_size: questions per ``generate`` / forward call (answers do not depend on it: left padding).
        device, dtype: passed to :func:`vlmkit.load`; ``cuda*`` falls back to CPU with a warning when CUDA is
            unavailable (lm-eval's command line asks for ``cuda:0`` by default).
        max_gen_toks: new tokens when a task's ``generation_kwargs`` has no ``max_gen_toks``.
        vlm: an already loaded :class:`vlmkit.VLM` (instead of ``pretrained``).
        max_batch_size: accepted for lm-eval's command line, unused.
        **method_args: parameters of ``method`` (``model_args`` keys that are not the ones above).
    """

    MULTIMODAL = True  # lm-eval sends image tasks only to models that say so

    def __init__(self, pretrained: str | None = None, method: str | None = "none", batch_size: Any = 8,
                 device: str | None = None, dtype: str | None = None, max_gen_toks: int = 32, vlm: Any = None,
                 max_batch_size: Any = None, **method_args: Any) -> None:
        super().__init__()
        del max_batch_size
        self.method = method or "none"
        self.method_args = dict(method_args)
        if self.method == "none" and self.method_args:
            raise InputError(f"model_args {sorted(self.method_args)} are not vlmkit arguments (pretrained, method, "
                             "batch_size, device, dtype, max_gen_toks) and no method=NAME takes them")
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        if vlm is None:
            import torch

            import vlmkit

            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            elif str(device).startswith("cuda") and not torch.cuda.is_available():
                log.warning("device=%s but CUDA is not available: running on cpu", device)
                device = "cpu"
            vlm = vlmkit.load(pretrained, device=device, dtype=dtype) if dtype else vlmkit.load(pretrained,
                                                                                               device=device)
        self.vlm = vlm
        self._device = getattr(vlm, "device", None)
        # Building the context checks the method name and its arguments now (make_intervention runs eagerly);
        # the intervention is bound only when a call enters it.
        runner.method_context(self.vlm, self.method, self.method_args)

    # ------------------------------------------------------------------------------------ lm-eval plumbing
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> VlmkitLM:
        """``"pretrained=P,method=M,k=v"``; ``model_args`` win over the command line's ``--batch_size``/``--device``
        (lm-eval's default would otherwise pass both and fail)."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> VlmkitLM:
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.vlm, "name", "vlmkit")).replace("/", "__")

    def get_model_info(self) -> dict:
        """Recorded under ``results["config"]`` by lm-eval."""
        return {"vlmkit_model": str(getattr(self.vlm, "name", "")), "method": self.method,
                "method_args": self.method_args}

    def _intervened(self):
        return runner.method_context(self.vlm, self.method, self.method_args)

    @staticmethod
    def _split(request: Any, index: int) -> tuple[tuple, Any]:
        """``(text args, image)`` of one request; exactly one image is required."""
        args = tuple(request.args)
        task, doc = getattr(request, "task_name", None) or "task", getattr(request, "doc_id", "?")
        where = f"request {index} ({task}, doc {doc})"
        if len(args) < 3 or not isinstance(args[-1], dict) or "visual" not in args[-1]:
            raise InputError(f"{where}: no image; vlmkit answers questions about an image (the task needs "
                             "doc_to_image). For text-only tasks use lm-eval's hf model")
        visuals = args[-1]["visual"]
        visuals = list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
        if len(visuals) != 1:
            raise InputError(f"{where}: {len(visuals)} images; vlmkit takes exactly one image per request")
        return args[:-1], _image(visuals[0], where)

    # ------------------------------------------------------------------------------------------ generation
    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (unless ``do_sample``) answers through :meth:`VLM.generate`, cut at the ``until`` strings.

        Requests are grouped by identical ``generation_kwargs`` and run ``batch_size`` at a time, in order.
        """
        from tqdm.auto import tqdm

        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        with self._intervened(), tqdm(total=len(requests), disable=disable_tqdm, desc="vlmkit generate_until") as bar:
            for idx in groups.values():
                gen, until = self._generation(requests[idx[0]].args[1])
                for start in range(0, len(idx), self.batch_size):
                    chunk = idx[start:start + self.batch_size]
                    parts = [self._split(requests[i], i) for i in chunk]
                    answers = self.vlm.generate([im for _, im in parts],
                                                [_question(a[0]) for a, _ in parts], **gen)
                    for i, (args, _), ans in zip(chunk, parts, answers):
                        text = ans.text if hasattr(ans, "text") else str(ans)
                        for stop in until:
                            if stop:
                                text = text.split(stop)[0]
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", args, text)
                    bar.update(len(chunk))
        return out  # type: ignore[return-value]

    def _generation(self, kwargs: Any) -> tuple[dict, list[str]]:
        """vlmkit generation settings and stop strings from a task's ``generation_kwargs``."""
        kw = dict(kwargs or {})
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        gen = {"max_new_tokens": int(kw.pop("max_gen_toks", self.max_gen_toks))}
        for key in GENERATION_KEYS & set(kw):
            gen[key] = kw.pop(key)
        if not gen.get("do_sample") or gen.get("temperature") == 0:
            gen["do_sample"] = False
            gen.pop("temperature", None)
        kw.pop("max_length", None)
        if kw:
            log.warning("vlmkit ignores generation_kwargs %s (supported: until, max_gen_toks, %s)", sorted(kw),
                        ", ".join(sorted(GENERATION_KEYS)))
        return gen, until

    # ---------------------------------------------------------------------------------------- likelihoods
    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log p(continuation | image, prompt), greedy?)`` per request from one forward pass per batch.

        The scored text is ``vlm.prompt(question) + continuation``; the continuation's tokens are the last
        ``len(tok(prompt + cont)) - len(tok(prompt))`` tokens (lm-eval's rule), checked against the model's input.
        """
        import torch
        from tqdm.auto import tqdm

        tok = self.vlm.processor.tokenizer
        out: list[tuple[float, bool]] = []
        with self._intervened(), tqdm(total=len(requests), disable=disable_tqdm, desc="vlmkit loglikelihood") as bar:
            for start in range(0, len(requests), self.batch_size):
                chunk = list(range(start, min(start + self.batch_size, len(requests))))
                parts = [self._split(requests[i], i) for i in chunk]
                prompts, targets = [], []
                for i, ((context, continuation), _) in zip(chunk, parts):
                    base = self.vlm.prompt(_question(context))
                    full = tok(base + continuation, add_special_tokens=False)["input_ids"]
                    n = len(full) - len(tok(base, add_special_tokens=False)["input_ids"])
                    if n < 1 or not continuation:
                        raise InputError(f"request {i}: continuation {continuation!r} adds no token to the prompt")
                    prompts.append(base + continuation)
                    targets.append(full[-n:])
                with self.vlm.session([im for _, im in parts], prompts=prompts) as (inputs, _, _), \
                        torch.inference_mode():
                    logp = torch.log_softmax(self.vlm.model(**inputs).logits.float(), dim=-1)
                ids = inputs["input_ids"]
                for b, (i, want) in enumerate(zip(chunk, targets)):
                    n = len(want)
                    if ids[b, -n:].tolist() != want:
                        raise InputError(f"request {i}: the processor tokenised the continuation differently "
                                         f"({ids[b, -n:].tolist()} vs {want}); cannot score it")
                    rows = logp[b, -n - 1:-1]
                    target = torch.tensor(want, device=rows.device)
                    score = float(rows.gather(1, target[:, None]).sum())
                    greedy = bool((rows.argmax(-1) == target).all())
                    out.append((score, greedy))
                    self.cache_hook.add_partial("loglikelihood", parts[b][0], (score, greedy))
                bar.update(len(chunk))
        return out

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("vlmkit scores text given an image; loglikelihood_rolling (perplexity of text "
                                  "alone) is not supported -- use lm-eval's hf model for such tasks")


def register() -> type[VlmkitLM]:
    """Make ``"vlmkit"`` available to ``lm_eval.simple_evaluate(model="vlmkit", ...)`` (importing this module
    already did); returns the class."""
    return VlmkitLM


def run_cli(argv: Sequence[str]) -> int:
    """Run lm-eval's own command line (``lm-eval [run] ARGS``) with ``"vlmkit"`` registered; ``--model vlmkit`` is
    added when no ``--model``/``-M`` is given. Returns the exit status."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    argv = list(argv)
    if argv and argv[0] not in ("-h", "--help", "ls", "validate"):
        if argv[0] == "run":
            argv = argv[1:]
        if not any(a in ("--model", "-M") or a.startswith("--model=") for a in argv):
            argv += ["--model", "vlmkit"]
        argv.insert(0, "run")
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        setup_logging()
        parser = HarnessCLI()
        parser.execute(parser.parse_args())
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0
