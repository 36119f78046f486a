"""The eval runner: batched generation over (id, image, question) items into an append-only predictions file.

* Predictions go to ``<out>/predictions.jsonl`` as they finish, one JSON object per line
  (``{"id", "image", "question", "answer"}`` or ``{"id", ..., "error"}``), flushed per batch (a killed process
  loses nothing written) and fsync'ed at most once a second and at the end (a machine crash loses at most ~1 s).
* ``resume=True`` skips every id already in the file; a torn last line (the process died mid-write) is cut off.
* A row whose image cannot be read, or whose generation raises, is recorded with an ``error`` and the run goes on.
* Under ``accelerate launch -m vlmkit eval ...`` / ``torchrun`` every rank answers items ``i % WORLD_SIZE == RANK``
  into its own shard file; after a gloo barrier rank 0 merges and scores.
* ``num_processes > 1`` spawns worker processes, each building its own model from a picklable ``factory``; item
  ``i`` goes to worker ``i % N``, each worker appends to ``predictions.rank{r}.jsonl``, and the shards are merged
  into ``predictions.jsonl`` in item order (deterministic, whatever finished first).

The model is duck-typed: ``vlm.ask_batch(images, questions, **gen) -> list[str]``, ``vlm.prompt(q) -> str`` and
``vlm.name``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from vlmkit.errors import InputError
from vlmkit.eval.pope import RowError

PREDICTIONS = "predictions.jsonl"


@dataclass
class EvalItem:
    """One generation request: ``image`` is a path (or an in-memory image); ``file``/``line`` name its source row."""

    id: str
    image: Any
    question: str
    file: str = ""
    line: int = 0


@dataclass
class RunResult:
    """``answers`` id -> text for finished rows (resumed ones included); ``errors`` for rows that failed;
    ``prompts`` id -> exact prompt text when the model exposes ``prompt()``."""

    answers: dict[str, Any] = field(default_factory=dict)
    prompts: dict[str, str] = field(default_factory=dict)
    errors: list[RowError] = field(default_factory=list)
    resumed: int = 0
    generated: int = 0
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------ helpers
def set_seed(seed: int) -> None:
    """Seed Python, NumPy and (if already imported) torch."""
    random.seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)


def versions() -> dict[str, str | None]:
    """Versions of Python and the packages that change results."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for pkg in ("vlmkit", "torch", "transformers", "pillow", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def parse_method_args(text: str | None) -> dict[str, Any]:
    """``"alpha=0.5,layers=2,use_cfg=true"`` -> ``{"alpha": 0.5, "layers": 2, "use_cfg": True}``."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        if "=" not in part:
            raise InputError(f"--method-args item {part!r} is not key=value")
        k, v = (s.strip() for s in part.split("=", 1))
        low = v.lower()
        if low in ("true", "false"):
            out[k] = low == "true"
        elif low in ("none", "null"):
            out[k] = None
        else:
            try:
                out[k] = int(v)
            except ValueError:
                try:
                    out[k] = float(v)
                except ValueError:
                    out[k] = v
    return out


def method_context(vlm: Any, name: str | None, args: dict[str, Any] | None = None):
    """Context manager applying a registered intervention by name; "none" does nothing.

    Other names are built with ``vlmkit.attention.hooks.make_intervention(name, **args)`` and applied with
    ``vlm.intervene(...)``; an unknown name is an :class:`InputError` listing the available ones.
    """
    if name in (None, "", "none", "carve"):  # carve runs through method_model()
        return contextlib.nullcontext()
    try:
        from vlmkit.attention.hooks import make_intervention
    except ImportError:
        raise InputError(f"unknown method {name!r}: only 'none' is available in this build") from None
    try:
        iv = make_intervention(name, **(args or {}))
    except (ValueError, TypeError) as e:
        raise InputError(f"--method {name} --method-args {args or {}}: {e}") from e
    if not hasattr(vlm, "intervene"):
        raise InputError(f"--method {name}: model {getattr(vlm, 'name', vlm)!r} does not support interventions")
    return vlm.intervene(iv)


def method_model(vlm: Any, name: str | None, args: dict[str, Any] | None = None) -> Any:
    """The model the runner asks: ``vlm`` itself, or a CARVE wrapper for ``--method carve`` (a pipeline of several
    passes rather than an attention edit)."""
    if name != "carve":
        return vlm
    from vlmkit.methods.carve import Carve, CarveVLM

    try:
        return CarveVLM(vlm, Carve(**(args or {})))
    except TypeError as e:
        raise InputError(f"--method carve --method-args {args or {}}: {e}") from e


def load_image(source: Any, max_pixels: int | None = None):
    """RGB PIL image from a path / PIL image / array, via ``vlmkit.io.load_image`` when present."""
    try:
        from vlmkit.io import load_image as _load  # type: ignore[import-not-found]
    except ImportError:
        _load = None
    if _load is not None:
        return _load(source, max_pixels=max_pixels) if max_pixels else _load(source)
    from PIL import Image

    if isinstance(source, (str, Path)):
        with Image.open(source) as im:
            return im.convert("RGB")
    if hasattr(source, "convert"):
        return source.convert("RGB")
    return Image.fromarray(source).convert("RGB")


# -------------------------------------------------------------------------------------- predictions file
def read_predictions(path: str | Path, repair: bool = True) -> list[dict]:
    """Records of a predictions file. An unparsable *last* line (torn by a kill mid-write) is dropped -- and cut
    from the file when ``repair`` -- while a bad line elsewhere is an error naming the line."""
    p = Path(path)
    if not p.exists():
        return []
    data = p.read_bytes()
    spans, start = [], 0  # (line number, start offset, raw bytes) of non-empty lines
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if raw.strip():
            spans.append((n, start, raw))
        start += len(raw) + 1
    records = []
    for k, (n, off, raw) in enumerate(spans):
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict) or "id" not in rec:
                raise ValueError("not an object with an 'id'")
        except ValueError as e:
            if k < len(spans) - 1:
                raise InputError(f"{p}:{n}: corrupt predictions line ({e}); fix or delete it") from e
            if repair:
                with p.open("r+b") as f:
                    f.truncate(off)
            return records
        records.append(rec)
    if repair and data and not data.endswith(b"\n"):
        with p.open("ab") as f:
            f.write(b"\n")
    return records


def _record(item: EvalItem, answer: Any = None, error: str | None = None, prompt: str | None = None) -> dict:
    rec = {"id": item.id, "image": str(item.image) if isinstance(item.image, (str, Path)) else None,
           "question": item.question}
    if prompt is not None:
        rec["prompt"] = prompt
    if error is None:  # grounding heads may answer with a point/box: keep JSON-able values as they are
        rec["answer"] = answer if isinstance(answer, (str, list, tuple, dict)) else str(answer)
    else:
        rec["error"] = error
    return rec


def _prompt(vlm: Any, question: str) -> str | None:
    fn = getattr(vlm, "prompt", None)
    if fn is None:
        return None
    try:
        return str(fn(question))
    except Exception:  # noqa: BLE001 - the prompt is informative only
        return None


def _append(f, records: Iterable[dict], sync: bool = True) -> None:
    for r in records:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
    f.flush()
    if sync:
        os.fsync(f.fileno())


class ImageCache:
    """Decoded images by path, least recently used evicted past ``max_bytes`` (POPE asks ~18 questions about each
    image; decoding a PNG costs more than a batched decode step of a small model). In-memory images pass through."""

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        from collections import OrderedDict

        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, int | None], Any] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0

    def get(self, source: Any, max_pixels: int | None = None):
        if not isinstance(source, (str, Path)):
            return load_image(source, max_pixels)
        key = (str(source), max_pixels)
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]
        self.misses += 1
        im = load_image(source, max_pixels)  # a failure is not cached: every row that needs the file reports it
        size = im.width * im.height * len(im.getbands())
        if size <= self.max_bytes:
            self._items[key] = im
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.width * old.height * len(old.getbands())
        return im


def _answer_batch(vlm: Any, batch: Sequence[EvalItem], gen: dict, max_pixels: int | None,
                  cache: ImageCache | None = None) -> list[dict]:
    """Records for one batch; failures are isolated to the rows that caused them."""
    cache = cache or ImageCache(0)
    ready, images, out = [], [], {}
    for it in batch:
        try:
            images.append(cache.get(it.image, max_pixels))
            ready.append(it)
        except Exception as e:  # noqa: BLE001 - any unreadable image becomes a row error
            where = f"{it.file}:{it.line}: " if it.file else ""
            out[it.id] = _record(it, error=f"{where}cannot read image {it.image}: {e}")
    if ready:
        try:
            answers = vlm.ask_batch(images, [it.question for it in ready], **gen)
            if len(answers) != len(ready):
                raise RuntimeError(f"ask_batch returned {len(answers)} answers for {len(ready)} questions")
            for it, a in zip(ready, answers):
                out[it.id] = _record(it, a, prompt=_prompt(vlm, it.question))
        except Exception:  # noqa: BLE001 - retry one by one to pin the failure on its row
            for it, im in zip(ready, images):
                try:
                    out[it.id] = _record(it, vlm.ask_batch([im], [it.question], **gen)[0],
                                         prompt=_prompt(vlm, it.question))
                except Exception as e:  # noqa: BLE001
                    where = f"{it.file}:{it.line}: " if it.file else ""
                    out[it.id] = _record(it, error=f"{where}generation failed: {type(e).__name__}: {e}")
    return [out[it.id] for it in batch]


def _collect(result: RunResult, records: Iterable[dict], by_id: dict[str, EvalItem]) -> None:
    for r in records:
        if "error" in r:
            it = by_id.get(r["id"])
            result.errors.append(RowError(it.file if it else "", it.line if it else 0, r["error"], r["id"]))
        else:
            result.answers[r["id"]] = r.get("answer", "")
        if r.get("prompt") is not None:
            result.prompts[r["id"]] = r["prompt"]


# ------------------------------------------------------------------------------------------------- run
def run_items(vlm: Any, items: Sequence[EvalItem], out_dir: str | Path, *, batch_size: int = 8,
              resume: bool = False, gen: dict | None = None, progress: bool = True, max_pixels: int | None = None,
              filename: str = PREDICTIONS, desc: str = "eval") -> RunResult:
    """Answer every item not yet in ``out_dir/filename``; returns all answers and errors (resumed ones included)."""
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise InputError("item ids are not unique")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / filename
    if not resume and path.exists():
        path.unlink()
    by_id = {it.id: it for it in items}
    result = RunResult()
    done = [r for r in read_predictions(path) if r["id"] in by_id]
    _collect(result, done, by_id)
    result.resumed = len(done)
    finished = {r["id"] for r in done}
    todo = [it for it in items if it.id not in finished]
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    cache = ImageCache()
    synced = t0
    with path.open("a", encoding="utf-8") as f, tqdm(total=len(todo), desc=desc, disable=not progress,
                                                      unit="q", dynamic_ncols=True) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            recs = _answer_batch(vlm, batch, dict(gen or {}), max_pixels, cache)
            sync = time.perf_counter() - synced >= 1.0  # an fsync per batch costs ~5% with a small model
            _append(f, recs, sync)
            synced = time.perf_counter() if sync else synced
            _collect(result, recs, by_id)
            result.generated += len(batch)
            bar.update(len(batch))
        os.fsync(f.fileno())
    result.seconds = time.perf_counter() - t0
    return result


def _worker(factory: Callable[[], Any], items: list[EvalItem], out_dir: str, rank: int, kwargs: dict,
            method: str | None, method_args: dict | None, seed: int | None) -> None:
    if seed is not None:
        set_seed(seed)
    vlm = factory()
    with method_context(vlm, method, method_args):
        run_items(method_model(vlm, method, method_args), items, out_dir, resume=True,
                  filename=f"predictions.rank{rank}.jsonl", progress=rank == 0,
                  desc=f"eval[{rank}]", **kwargs)


def merge_predictions(items: Sequence[EvalItem], out_dir: str | Path, filename: str = PREDICTIONS) -> int:
    """Fold ``predictions.rank*.jsonl`` into ``filename`` in item order (first record of an id wins); returns rows.

    The merged file is written to a temporary name and renamed, so a crash leaves either the old or the new file.
    """
    out = Path(out_dir)
    shards = sorted(out.glob("predictions.rank*.jsonl"))
    seen: dict[str, dict] = {}
    for p in [out / filename, *shards]:
        for r in read_predictions(p):
            seen.setdefault(r["id"], r)
    order = [it.id for it in items if it.id in seen] + [i for i in seen if i not in {it.id for it in items}]
    tmp = out / (filename + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        _append(f, (seen[i] for i in order))
    os.replace(tmp, out / filename)
    for p in shards:
        p.unlink()
    return len(order)


def run_sharded(factory: Callable[[], Any], items: Sequence[EvalItem], out_dir: str | Path, num_processes: int, *,
                resume: bool = False, method: str | None = None, method_args: dict | None = None,
                seed: int | None = None, **kwargs) -> RunResult:
    """Run ``num_processes`` spawned workers (item ``i`` -> worker ``i % N``), then merge their predictions.

    ``factory`` must be picklable (a module-level function or ``functools.partial``); ``kwargs`` go to
    :func:`run_items` (``batch_size``, ``gen``, ``max_pixels``).
    """
    import multiprocessing as mp

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        for p in [out / PREDICTIONS, *out.glob("predictions.rank*.jsonl")]:
            p.unlink(missing_ok=True)
    merge_predictions(items, out)  # fold leftovers of an interrupted sharded run first
    finished = {r["id"] for r in read_predictions(out / PREDICTIONS)}
    kwargs.pop("progress", None)
    ctx = mp.get_context("spawn")
    procs = []
    for rank in range(num_processes):
        shard = [it for i, it in enumerate(items) if i % num_processes == rank and it.id not in finished]
        if shard:
            p = ctx.Process(target=_worker, args=(factory, shard, str(out), rank, kwargs, method, method_args, seed))
            p.start()
            procs.append(p)
    t0 = time.perf_counter()
    failed = []
    for rank, p in enumerate(procs):
        p.join()
        if p.exitcode != 0:
            failed.append(f"worker {rank} exit code {p.exitcode}")
    merge_predictions(items, out)
    result = RunResult()
    by_id = {it.id: it for it in items}
    recs = [r for r in read_predictions(out / PREDICTIONS) if r["id"] in by_id]
    _collect(result, recs, by_id)
    result.resumed = len(finished)
    result.generated = len(recs) - len(finished)
    result.seconds = time.perf_counter() - t0
    if failed:
        raise InputError("; ".join(failed) + f" -- finished rows are kept in {out / PREDICTIONS}, rerun with --resume")
    return result


def launcher_rank() -> tuple[int, int]:
    """(rank, world size) set by ``accelerate launch`` / ``torchrun`` (``RANK``/``WORLD_SIZE``), else (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def barrier() -> None:
    """Wait for all launcher ranks (gloo process group, created on first use from the launcher's env)."""
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
    dist.barrier()


def run_launched(vlm: Any, items: Sequence[EvalItem], out_dir: str | Path, rank: int, world: int, *,
                 resume: bool = False, **kwargs) -> RunResult | None:
    """One rank of a launcher-started run: item ``i`` -> rank ``i % world``; after a barrier, rank 0 merges the
    shards into ``predictions.jsonl`` and returns the result; other ranks return ``None``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shard_file = out / f"predictions.rank{rank}.jsonl"
    if not resume:
        shard_file.unlink(missing_ok=True)
        if rank == 0:
            (out / PREDICTIONS).unlink(missing_ok=True)
    finished = {r["id"] for r in read_predictions(out / PREDICTIONS, repair=False)} if resume else set()
    shard = [it for i, it in enumerate(items) if i % world == rank and it.id not in finished]
    kwargs["progress"] = kwargs.get("progress", True) and rank == 0
    own = run_items(vlm, shard, out, resume=True, filename=shard_file.name, desc=f"eval[{rank}]", **kwargs)
    barrier()
    if rank != 0:
        return None
    merge_predictions(items, out)
    result = RunResult(seconds=own.seconds)
    by_id = {it.id: it for it in items}
    recs = [r for r in read_predictions(out / PREDICTIONS) if r["id"] in by_id]
    _collect(result, recs, by_id)
    result.resumed = len(finished)
    result.generated = len(recs) - len(finished)
    return result


def run(vlm_or_factory: Any, items: Sequence[EvalItem], out_dir: str | Path, *, num_processes: int = 1,
        limit: int | None = None, seed: int | None = None, method: str | None = None,
        method_args: dict | None = None, **kwargs) -> tuple[RunResult, Any]:
    """Entry point used by the CLI: applies ``limit`` (first N items) and ``seed``, then runs in-process or sharded.

    Under ``accelerate launch``/``torchrun`` (``WORLD_SIZE`` > 1) each process runs its shard and only rank 0
    gets a result (others get ``(None, vlm)``). Returns ``(result, vlm)``; ``vlm`` is ``None`` for a
    ``num_processes`` run (models live in the workers).
    """
    items = list(items)[:limit] if limit else list(items)
    if seed is not None:
        set_seed(seed)
    if num_processes > 1:
        if not callable(vlm_or_factory) or hasattr(vlm_or_factory, "ask_batch"):
            raise InputError("num_processes > 1 needs a picklable model factory, not a loaded model")
        res = run_sharded(vlm_or_factory, items, out_dir, num_processes, method=method, method_args=method_args,
                          seed=seed, **kwargs)
        return res, None
    vlm = vlm_or_factory if hasattr(vlm_or_factory, "ask_batch") else vlm_or_factory()
    rank, world = launcher_rank()
    with method_context(vlm, method, method_args):
        model = method_model(vlm, method, method_args)
        if world > 1:  # started by accelerate launch / torchrun: this process is one shard
            return run_launched(model, items, out_dir, rank, world, **kwargs), vlm
        return run_items(model, items, out_dir, **kwargs), vlm
