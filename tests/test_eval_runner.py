"""Runner, reports and CLI with a fake VLM: batching, row errors, torn lines, SIGKILL + resume, 2-process sharding."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from vlmkit.errors import InputError
from vlmkit.eval import cli, report, runner
from vlmkit.eval.runner import EvalItem, read_predictions, run, run_items

FIX = Path(__file__).parent / "fixtures" / "eval"
sys.path.insert(0, str(FIX))
from fake_vlm import FakeVLM  # noqa: E402

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "star", "cross", "heart"]


def _items(tmp_path, n=12):
    img = tmp_path / "img.png"
    Image.new("RGB", (40, 30), "white").save(img)
    qs = [f"Is there a {c} {s} in the image?" for c in COLORS for s in SHAPES][:n]
    return [EvalItem(f"q{i}", str(img), q, "data.jsonl", i + 1) for i, q in enumerate(qs)]


def _pope_file(tmp_path, n=24):
    Image.new("RGB", (40, 30), "white").save(tmp_path / "img.png")
    p = tmp_path / "pope_random.json"
    with p.open("w") as f:
        for i in range(n):
            q = f"Is there a {COLORS[i % 6]} {SHAPES[i // 6 % 4]} in the image?"
            f.write(json.dumps({"question_id": i + 1, "image": "img.png", "text": q,
                                "label": "yes" if i % 2 == 0 else "no"}) + "\n")
    return p


def _ids(path):
    return [json.loads(line)["id"] for line in Path(path).read_text().splitlines()]


def test_batched_answers_match_unbatched_and_are_recorded(tmp_path):
    items = _items(tmp_path)
    vlm = FakeVLM()
    r1 = run_items(vlm, items, tmp_path / "b1", batch_size=1, progress=False)
    r5 = run_items(vlm, items, tmp_path / "b5", batch_size=5, progress=False)
    assert r1.answers == r5.answers and len(r1.answers) == 12
    assert vlm.calls == [1] * 12 + [5, 5, 2]
    recs = read_predictions(tmp_path / "b5" / "predictions.jsonl")
    assert [r["id"] for r in recs] == [it.id for it in items]
    assert recs[0]["prompt"] == vlm.prompt(items[0].question) and recs[0]["question"] == items[0].question
    assert r5.prompts["q0"].startswith("USER: <image>")


def test_row_errors_do_not_stop_the_run(tmp_path):
    items = _items(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    items[1] = EvalItem("q1", str(tmp_path / "bad.png"), items[1].question, "data.jsonl", 2)
    items[2] = EvalItem("q2", str(tmp_path / "missing.png"), items[2].question, "data.jsonl", 3)
    res = run_items(FakeVLM(fail_word="purple"), items, tmp_path / "o", batch_size=4, progress=False)
    failed = {e.id: str(e) for e in res.errors}
    purple = {it.id for it in items if "purple" in it.question}
    assert set(failed) == {"q1", "q2"} | purple
    assert "data.jsonl:2" in failed["q1"] and "cannot read image" in failed["q1"]
    assert "data.jsonl:3" in failed["q2"] and "missing.png" in failed["q2"]
    assert all("generation failed" in failed[i] for i in purple)
    assert len(res.answers) == 12 - len(failed)
    assert sorted(_ids(tmp_path / "o" / "predictions.jsonl")) == sorted(it.id for it in items)


def test_read_predictions_torn_and_corrupt_lines(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a", "answer": "Yes"}\n{"id": "b", "answer": "No"}\n{"id": "c", "ans')
    assert [r["id"] for r in read_predictions(p)] == ["a", "b"]
    assert p.read_text().endswith('"No"}\n')  # torn tail cut
    p.write_text('{"id": "a"}\n{"id": "b"}')  # complete last line without newline: kept
    assert len(read_predictions(p)) == 2 and p.read_text().endswith("\n")
    p.write_text('{"id": "a"}\ngarbage\n{"id": "c"}\n')
    with pytest.raises(InputError, match=r"p\.jsonl:2"):
        read_predictions(p)


def test_resume_skips_finished_and_fresh_run_overwrites(tmp_path):
    items = _items(tmp_path)
    run_items(FakeVLM(), items[:5], tmp_path / "o", progress=False)
    vlm = FakeVLM()
    res = run_items(vlm, items, tmp_path / "o", resume=True, batch_size=4, progress=False)
    assert res.resumed == 5 and res.generated == 7 and sum(vlm.calls) == 7
    assert _ids(tmp_path / "o" / "predictions.jsonl") == [it.id for it in items]
    res = run_items(FakeVLM(), items[:3], tmp_path / "o", progress=False)
    assert _ids(tmp_path / "o" / "predictions.jsonl") == ["q0", "q1", "q2"] and res.resumed == 0


def test_run_limit_seed_and_methods(tmp_path):
    items = _items(tmp_path)
    res, vlm = run(FakeVLM(), items, tmp_path / "o", limit=3, seed=1, progress=False)
    assert list(res.answers) == ["q0", "q1", "q2"] and vlm.name == "fake-vlm"
    with pytest.raises(InputError, match="unknown method"):
        run(FakeVLM(), items, tmp_path / "o", method="nosuchmethod", progress=False)
    assert runner.parse_method_args("alpha=0.5, k=3,flag=true,name=x,z=none") == {
        "alpha": 0.5, "k": 3, "flag": True, "name": "x", "z": None}
    with pytest.raises(InputError, match="key=value"):
        runner.parse_method_args("alpha")
    with pytest.raises(InputError, match="unique"):
        run_items(FakeVLM(), items[:2] * 2, tmp_path / "d", progress=False)


def test_report_files(tmp_path):
    results = {"task": "pope", "model": "m", "scoring_rule": "pope", "prompt": "USER: q", "generation": {},
               "metrics": {s: {"accuracy": 0.5, "precision": 0.4, "recall": 0.9, "f1": 0.6, "yes_ratio": 0.7,
                               "unparsed": 0, "n": 10} for s in ("random", "popular", "average")},
               "metrics_by_rule": {}, "errors": ["f.json:3: bad row"]}
    paths = report.write_report(tmp_path, results)
    md = paths["md"].read_text()
    assert "| random | 50.00 | 40.00 | 90.00 | 60.00 | 70.00 | 0 | 10 |" in md and "f.json:3: bad row" in md
    with Image.open(paths["png"]) as im:
        assert im.size[0] >= 420 and im.getcolors(1 << 20) and len(im.getcolors(1 << 20)) > 3
    assert json.loads(paths["json"].read_text())["metrics"]["popular"]["f1"] == 0.6


def test_cli_pope_generated_set_schema(tmp_path, capsys):
    pytest.importorskip("vlmkit.data.scenes")
    out = tmp_path / "run"
    assert cli.main(["eval", "pope", "--model", "fake_vlm:make", "--out", str(out), "--num-images", "3",
                     "--batch-size", "4", "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    for key in ("task", "model", "method", "method_args", "prompt", "generation", "scoring_rule", "metrics",
                "metrics_by_rule", "versions", "n_failed"):
        assert key in res
    assert res["model"] == "fake-vlm" and res["method"] == "none" and res["scoring_rule"] == "pope"
    assert list(res["metrics"]) == ["random", "popular", "adversarial", "average"]
    assert set(res["metrics"]["random"]) == {"accuracy", "precision", "recall", "f1", "yes_ratio", "unparsed", "n"}
    assert set(res["metrics_by_rule"]) == {"pope", "pope_nt", "strict"}
    assert res["metrics"]["average"]["n"] == 54 and res["n_failed"] == 0
    assert res["prompt"].startswith("USER: <image>\nIs there")
    # "There is no such object." is yes for nothing; strict leaves it unparsed
    assert res["metrics_by_rule"]["strict"]["average"]["unparsed"] > 0
    assert (out / "results.md").exists() and (out / "results.png").exists()
    assert "| random |" in capsys.readouterr().out


def test_cli_pope_bad_rows_and_images_reported(tmp_path, capsys):
    data = tmp_path / "pope"
    shutil.copytree(FIX / "pope_dir", data)
    Image.new("RGB", (20, 20)).save(data / "img_a.png")
    (data / "img_b.png").write_bytes(b"\x89PNG broken")
    with (data / "coco_pope_random.json").open("a") as f:
        f.write('{"question_id": 3, "image": "img_a.png"}\n')
    res = cli.eval_pope(cli_args("pope", data, tmp_path / "o"))
    assert res["n_failed"] == 4 and res["metrics"]["average"]["n"] == 3
    errs = "\n".join(res["errors"])
    assert "coco_pope_random.json:3" in errs
    assert "coco_pope_popular.json:2" in errs and "coco_pope_adversarial.json:1" in errs
    assert "coco_pope_adversarial.json:2" in errs and "img_missing.png" in errs
    assert "4 row(s) failed" in capsys.readouterr().err


def cli_args(task, data, out, **kw):
    ns = {"data": str(data) if data else None, "images": None, "model": "fake_vlm:make", "device": "cpu",
          "dtype": None, "batch_size": 4, "max_new_tokens": None, "max_pixels": None, "out": str(out),
          "resume": False, "limit": None, "seed": 0, "method": "none", "method_args": "", "num_processes": 1,
          "quiet": True, "prompt": None, "split": None, "scoring_rule": "pope", "num_images": 3, "captions": None,
          "vocab": "auto", "format": "auto", "box_format": "auto", "point_units": "auto"}
    ns.update(kw)
    import argparse
    return argparse.Namespace(**ns)


def test_cli_screenspot_and_chair(tmp_path):
    data = tmp_path / "ss"
    (data / "screenspot_imgs").mkdir(parents=True)
    shutil.copy(FIX / "screenspot_mobile.json", data)
    Image.new("RGB", (200, 100)).save(data / "screenspot_imgs" / "mob_1.png")
    Image.new("RGB", (400, 200)).save(data / "screenspot_imgs" / "mob_2.png")
    res = cli.eval_screenspot(cli_args("screenspot", data, tmp_path / "o1"))
    assert res["formats"] == {"screenspot_mobile.json": "v1 xywh_px"}
    # the fake clicks the image centre: only mob_2's full-quadrant box [0, 0, 200, 100] contains it
    assert res["metrics"]["overall"]["accuracy"] == pytest.approx(1 / 3)
    assert res["metrics"]["table"]["mobile"]["icon"] == {"accuracy": 0.5, "n": 2}
    pytest.importorskip("vlmkit.data.scenes")
    res = cli.eval_chair(cli_args("chair", None, tmp_path / "o2"))
    gt = json.loads((tmp_path / "o2" / "data" / "chair.json").read_text())
    said = {"red circle", "blue square", "green star"}
    halluc = sum(1 for g in gt for o in said if o not in g["objects"])
    assert res["metrics"]["n"] == 3 and res["metrics"]["n_hallucinated"] == halluc
    assert res["metrics"]["chair_i"] == pytest.approx(halluc / 9)
    assert (tmp_path / "o2" / "chair_captions.jsonl").exists()


CHILD = """
import sys
sys.path.insert(0, {fix!r})
from vlmkit.eval import cli
cli.main(["eval", "pope", "--data", {data!r}, "--model", "fake_vlm:make_slow", "--out", {out!r},
          "--batch-size", "2", "--quiet"])
"""


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    data = _pope_file(tmp_path)
    out, ref = tmp_path / "killed", tmp_path / "ref"
    pred = out / "predictions.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(fix=str(FIX), data=str(data), out=str(out))],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if pred.exists() and pred.read_text().count("\n") >= 6:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = pred.read_text().count("\n")
    assert 0 < done_before < 24, "the child was not killed mid-run"
    with pred.open("a") as f:
        f.write('{"id": "17", "answer": "Ye')  # a torn last line, as if killed mid-write
    assert cli.main(["eval", "pope", "--data", str(data), "--model", "fake_vlm:make", "--out", str(out),
                     "--resume", "--quiet", "--batch-size", "3"]) == 0
    assert cli.main(["eval", "pope", "--data", str(data), "--model", "fake_vlm:make", "--out", str(ref),
                     "--quiet"]) == 0
    ids = _ids(pred)
    assert sorted(ids, key=int) == [str(i) for i in range(1, 25)] and len(ids) == len(set(ids))
    a = json.loads((out / "results.json").read_text())
    b = json.loads((ref / "results.json").read_text())
    assert a["metrics_by_rule"] == b["metrics_by_rule"] and a["metrics"]["random"]["n"] == 24


def test_two_process_sharding_matches_single_process(tmp_path):
    data = _pope_file(tmp_path, n=10)
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(["eval", "pope", "--data", str(data), "--model", "fake_vlm:make", "--out", str(one),
                     "--quiet"]) == 0
    assert cli.main(["eval", "pope", "--data", str(data), "--model", "fake_vlm:make", "--out", str(two),
                     "--num-processes", "2", "--batch-size", "2", "--quiet"]) == 0
    assert (one / "predictions.jsonl").read_text() == (two / "predictions.jsonl").read_text()
    assert not list(two.glob("predictions.rank*"))
    a, b = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert a["metrics_by_rule"] == b["metrics_by_rule"] and b["num_processes"] == 2 and b["prompt"] == a["prompt"]


@pytest.mark.slow
def test_torchrun_two_ranks_merge(tmp_path):
    pytest.importorskip("torch.distributed")
    data = _pope_file(tmp_path, n=10)
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(["eval", "pope", "--data", str(data), "--model", "fake_vlm:make", "--out", str(one),
                     "--quiet"]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), str(FIX)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vlmkit.eval.cli", "eval", "pope", "--data", str(data), "--model", "fake_vlm:make",
           "--out", str(two), "--quiet"]
    subprocess.run(cmd, env=env, check=True, timeout=240, capture_output=True)
    assert (one / "predictions.jsonl").read_text() == (two / "predictions.jsonl").read_text()
    a, b = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert a["metrics_by_rule"] == b["metrics_by_rule"]


def test_real_tiny_vlm_batch_size_invariance_and_prompt(tmp_path):
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).parent))
    import tiny
    from vlmkit.models.vlm import VLM

    model, proc = tiny.build("llava")
    vlm = VLM(model, proc, name="tiny-llava")
    items = _items(tmp_path, n=6)
    gen = {"max_new_tokens": 4}
    r1, _ = run(vlm, items, tmp_path / "b1", batch_size=1, gen=gen, progress=False)
    r4, _ = run(vlm, items, tmp_path / "b4", batch_size=4, gen=gen, progress=False, method="none")
    assert r1.answers == r4.answers and len(r1.answers) == 6 and not r1.errors
    assert r4.prompts["q0"] == vlm.prompt(items[0].question)
    assert all(isinstance(a, str) for a in r4.answers.values())
    out = tmp_path / "cli"
    assert cli.main(["eval", "pope", "--model", "fake_vlm:make_tiny", "--out", str(out), "--num-images", "1",
                     "--max-new-tokens", "3", "--limit", "2", "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["model"] == "tiny-llava" and res["generation"]["max_new_tokens"] == 3
    assert res["generation"]["do_sample"] is False and "num_beams" in res["generation"]
    assert res["n_failed"] == 0 and res["metrics"]["average"]["n"] == 6


def test_method_carve_runs_through_the_runner(tmp_path):
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).parent))
    import tiny
    from vlmkit.methods.carve import Carve
    from vlmkit.models.vlm import VLM

    vlm = VLM(*tiny.build("llava"), name="tiny-llava")
    items = _items(tmp_path, n=3)
    res, _ = run(vlm, items, tmp_path / "carve", batch_size=2, gen={"max_new_tokens": 3}, progress=False,
                 method="carve", method_args={"keep_fraction": 0.3})
    assert not res.errors and len(res.answers) == 3
    direct = Carve(keep_fraction=0.3)
    for it in items:
        assert res.answers[it.id] == direct(it.image, it.question, vlm=vlm).answer
