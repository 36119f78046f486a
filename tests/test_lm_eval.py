"""lm-eval adapter: VlmkitLM through lm_eval.simple_evaluate and `vlmkit lm-eval`, on a tiny local task YAML
(tests/fixtures/lm_eval) over generated scene images, with a tiny random LLaVA saved to disk. Offline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from vlmkit.attention.hooks import (
    Intervention,
    make_intervention,
    register_intervention,
)
from vlmkit.errors import InputError

FIX = Path(__file__).parent / "fixtures" / "lm_eval"
TASKS = ["vlmkit_scenes_gen", "vlmkit_scenes_mc"]


@register_intervention("lmeval_test_scale_heads")
class ScaleHeads(Intervention):
    """Test-only: multiply every head's output by ``scale`` (changes both generation and likelihoods)."""

    def __init__(self, scale: float = 0.5, layers=None) -> None:
        super().__init__(layers)
        self.scale = float(scale)

    def heads(self, site, out):
        return out * self.scale


def _images(root: Path) -> list[tuple[str, str, str]]:
    """(image path, question, yes/no) rows: the built-in scene POPE set, or plain drawn shapes without it."""
    try:
        from vlmkit.data.pope import build_scene_pope

        _, paths = build_scene_pope(root / "pope", num_images=2, seed=0)
        rows = [json.loads(line) for line in paths[0].read_text().splitlines()]
        return [(str(root / "pope" / "images" / r["image"]), r["text"], r["label"]) for r in rows[:6]]
    except ImportError:
        from PIL import Image, ImageDraw

        out = []
        for i, color in enumerate(("red", "blue", "green")):
            im = Image.new("RGB", (48, 40), "white")
            ImageDraw.Draw(im).ellipse((8, 6, 36, 34), fill=color)
            im.save(root / f"img{i}.png")
            out += [(str(root / f"img{i}.png"), f"Is there a {color} circle in the image?", "yes"),
                    (str(root / f"img{i}.png"), "Is there a purple square in the image?", "no")]
        return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Saved tiny model, data file, task directory; HF hub and datasets offline for the module."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).parent))
    import tiny

    root = tmp_path_factory.mktemp("lm_eval")
    model, proc = tiny.build("llava")
    model.save_pretrained(root / "model")
    proc.save_pretrained(root / "model")
    rows = _images(root)
    with (root / "data.jsonl").open("w") as f:
        for i, (image, question, answer) in enumerate(rows):
            f.write(json.dumps({"id": i, "image": image, "question": question, "answer": answer,
                                "label": 0 if answer == "yes" else 1}) + "\n")
    (root / "tasks").mkdir()
    for y in FIX.glob("*.yaml"):
        text = y.read_text().replace("@DATA@", str(root / "data.jsonl")).replace("@CACHE@", str(root / "cache"))
        (root / "tasks" / y.name).write_text(text)
    from vlmkit.eval.lm_eval import VlmkitLM

    lm = VlmkitLM(pretrained=str(root / "model"), batch_size=4, device="cpu")
    yield {"root": root, "rows": rows, "lm": lm}
    mp.undo()


def _requests(rows, kind="generate_until", gen=None):
    from lm_eval.api.instance import Instance

    gen = gen if gen is not None else {"until": ["."], "max_gen_toks": 4, "do_sample": False}
    out = []
    for i, (image, question, _) in enumerate(rows):
        args = (f"<image>{question}", gen) if kind == "generate_until" else (f"<image>{question}", " yes")
        out.append(Instance(request_type=kind, doc={}, arguments=(*args, {"visual": [image]}), idx=i))
    return out


def test_simple_evaluate_local_task_goes_through_vlmkit(env):
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm, rows = env["lm"], env["rows"]
    res = lm_eval.simple_evaluate(model=lm, tasks=TASKS, log_samples=True,
                                  task_manager=TaskManager(include_path=str(env["root"] / "tasks"),
                                                           include_defaults=False))
    assert set(TASKS) <= set(res["results"])
    assert 0.0 <= res["results"]["vlmkit_scenes_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= res["results"]["vlmkit_scenes_mc"]["acc,none"] <= 1.0
    assert res["config"]["method"] == "none" and res["config"]["vlmkit_model"] == str(env["root"] / "model")
    # generate_until answers are vlmkit's own answers for the same image and question, cut at the stop string
    samples = sorted(res["samples"]["vlmkit_scenes_gen"], key=lambda s: s["doc_id"])
    direct = lm.vlm.ask_batch([r[0] for r in rows], [r[1] for r in rows], max_new_tokens=4)
    assert [s["resps"][0][0] for s in samples] == [a.split(".")[0] for a in direct]
    # loglikelihood of " yes"/" no" = the next-token log-probability from VLM.forward on the same prompt
    tok = lm.vlm.processor.tokenizer
    logits = lm.vlm.forward([r[0] for r in rows], [r[1] for r in rows])[:, -1].float().log_softmax(-1)
    for s in res["samples"]["vlmkit_scenes_mc"]:
        d = s["doc_id"]
        for (score, greedy), word in zip((r[0] for r in s["resps"]), ("yes", "no")):
            wid = tok.convert_tokens_to_ids(word)
            assert score == pytest.approx(float(logits[d, wid]), abs=1e-4)
            assert greedy == (int(logits[d].argmax()) == wid)


def test_batch_size_invariance_and_interventions(env):
    from vlmkit.eval.lm_eval import VlmkitLM

    rows, vlm = env["rows"][:4], env["lm"].vlm
    one = VlmkitLM(vlm=vlm, batch_size=1)
    gen_req, ll_req = _requests(rows), _requests(rows, "loglikelihood")
    base_gen = env["lm"].generate_until(gen_req, disable_tqdm=True)
    assert one.generate_until(gen_req, disable_tqdm=True) == base_gen
    base_ll = env["lm"].loglikelihood(ll_req, disable_tqdm=True)
    assert [s for s, _ in one.loglikelihood(ll_req, disable_tqdm=True)] == pytest.approx([s for s, _ in base_ll],
                                                                                           abs=1e-5)
    # method + method args from model_args: same answers as vlm.intervene directly; likelihoods change
    edited = VlmkitLM.create_from_arg_string("method=lmeval_test_scale_heads,scale=0.0",
                                             {"batch_size": 3, "device": None, "vlm": vlm})
    assert edited.method_args == {"scale": 0.0} and edited.batch_size == 3
    with vlm.intervene(make_intervention("lmeval_test_scale_heads", scale=0.0)):
        want = vlm.ask_batch([r[0] for r in rows], [r[1] for r in rows], max_new_tokens=4)
    assert edited.generate_until(gen_req, disable_tqdm=True) == [a.split(".")[0] for a in want]
    ll = [s for s, _ in edited.loglikelihood(ll_req, disable_tqdm=True)]
    assert all(abs(a - b) > 1e-4 for a, (b, _) in zip(ll, base_ll))
    assert env["lm"].loglikelihood(ll_req, disable_tqdm=True) == base_ll  # the edit did not leak out
    # model_args win over lm-eval's command-line defaults
    assert VlmkitLM.create_from_arg_obj({"batch_size": 5, "vlm": vlm}, {"batch_size": 1}).batch_size == 5


def test_bad_requests_and_arguments(env):
    from lm_eval.api.instance import Instance

    from vlmkit.eval.lm_eval import VlmkitLM

    lm, rows = env["lm"], env["rows"]
    with pytest.raises(InputError, match="unknown method"):
        VlmkitLM(vlm=lm.vlm, method="no_such_method")
    with pytest.raises(InputError, match="scale_typo"):
        VlmkitLM(vlm=lm.vlm, method="lmeval_test_scale_heads", scale_typo=1)
    with pytest.raises(InputError, match="alpha"):
        VlmkitLM(vlm=lm.vlm, alpha=0.5)  # method args without a method
    with pytest.raises(InputError, match="batch_size"):
        VlmkitLM(vlm=lm.vlm, batch_size=0)
    text_only = Instance(request_type="generate_until", doc={}, arguments=("Hi", {"until": []}), idx=0)
    with pytest.raises(InputError, match="no image"):
        lm.generate_until([text_only], disable_tqdm=True)
    two = Instance(request_type="generate_until", doc={}, idx=0,
                   arguments=("<image><image>q", {}, {"visual": [rows[0][0], rows[1][0]]}))
    with pytest.raises(InputError, match="2 images"):
        lm.generate_until([two], disable_tqdm=True)
    missing = _requests([(str(env["root"] / "nope.png"), "q", "yes")])
    with pytest.raises(InputError, match="nope.png"):
        lm.generate_until(missing, disable_tqdm=True)
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        lm.loglikelihood_rolling([text_only])
    # unknown generation kwargs are ignored (logged), sampling settings pass through
    gen, until = lm._generation({"until": "\n", "max_gen_toks": 2, "top_k": 5, "temperature": 0.0})
    assert gen == {"max_new_tokens": 2, "do_sample": False} and until == ["\n"]


def test_cli_runs_lm_eval_with_vlmkit_registered(env, tmp_path, monkeypatch, capsys):
    from lm_eval.tasks import manager

    from vlmkit.eval import cli

    init = manager.TaskManager.__init__

    def local_only(self, *args, **kwargs):  # skip indexing lm-eval's thousands of built-in tasks (~30 s here)
        kwargs["include_defaults"] = False
        init(self, *args, **kwargs)

    monkeypatch.setattr(manager.TaskManager, "__init__", local_only)
    out = tmp_path / "out"
    model_args = f"pretrained={env['root'] / 'model'},method=lmeval_test_scale_heads,scale=0.0"
    code = cli.main(["lm-eval", "--model_args", model_args, "--tasks", "vlmkit_scenes_gen",
                     "--include_path", str(env["root"] / "tasks"), "--output_path", str(out), "--limit", "4",
                     "--device", "cpu", "--batch_size", "2", "--log_samples"])
    assert code == 0
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["config"]["model"] == "vlmkit" and results["config"]["method"] == "lmeval_test_scale_heads"
    assert results["config"]["method_args"] == {"scale": 0.0}
    assert results["results"]["vlmkit_scenes_gen"]["sample_len"] == 4
    samples = [json.loads(line) for line in next(out.rglob("samples_vlmkit_scenes_gen_*.jsonl")).open()]
    vlm = env["lm"].vlm
    with vlm.intervene(make_intervention("lmeval_test_scale_heads", scale=0.0)):
        want = vlm.ask_batch([r[0] for r in env["rows"][:4]], [r[1] for r in env["rows"][:4]], max_new_tokens=4)
    got = {s["doc_id"]: s["resps"][0][0] for s in samples}
    assert [got[i] for i in range(4)] == [a.split(".")[0] for a in want]
    assert "vlmkit_scenes_gen" in capsys.readouterr().out  # lm-eval's own results table
