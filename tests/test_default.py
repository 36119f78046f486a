"""Embedded default model: tokenizer, questions, geometry, the shipped checkpoint, and the smoke recipe."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlmkit.data.scenes import generate_scene
from vlmkit.default import CHECKPOINT_DIR
from vlmkit.default.build import (GRID, IMAGE_SIZE, N_IMAGE_TOKENS, build_model_and_processor, patch_coverage, prompt_text,
                                  token_boxes)
from vlmkit.default.qa import SKILLS, describe_answer, location_word, make_qa, negatives, pope_questions
from vlmkit.default.tokenizer import build_tokenizer, unknown_words


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_skill_questions_and_answers_have_no_unknown_tokens(tok):
    rng = np.random.default_rng(0)
    seen = set()
    for seed in range(40):
        sc = generate_scene(seed, size=128)
        for skill in SKILLS:
            qa = make_qa(sc, rng, skill)
            if qa is None:
                continue
            seen.add(skill)
            assert unknown_words(tok, qa.question) == [], qa.question
            assert unknown_words(tok, qa.answer) == [], qa.answer
    assert seen == set(SKILLS)
    assert unknown_words(tok, "Is there a Red Circle in the image?!") == []
    assert unknown_words(tok, "What's the colour of the top-left object?") == []
    assert unknown_words(tok, "Is there a banana?") == ["<unk>"]


def test_tokenizer_decodes_lists_with_punctuation(tok):
    ids = tok("red circle, blue star.</s>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "red circle, blue star."


def test_answers_match_the_ground_truth():
    rng = np.random.default_rng(1)
    for seed in range(30):
        sc = generate_scene(seed, size=(150, 110))
        names = sc.names
        for _ in range(6):
            qa = make_qa(sc, rng, "count")
            assert int(qa.answer) == len(qa.targets)
            qa = make_qa(sc, rng, "exist")
            assert (qa.answer == "yes") == bool(qa.targets)
        lst = make_qa(sc, rng, "list").answer.split(", ")
        assert sorted(lst) == sorted(set(names))
        xs = [min(o.center[0] for o in sc.objects if o.name == n) for n in lst]
        assert xs == sorted(xs)
        desc = describe_answer(sc)
        assert desc.startswith("the image shows") and all(n.split()[0] in desc for n in names)
    assert location_word((5, 5), 90, 90) == "top left"
    assert location_word((45, 85), 90, 90) == "bottom"
    assert location_word((30.5, 45), 90, 90, margin=0.04) is None


def test_pope_sets_are_balanced_and_negatives_absent():
    rng = np.random.default_rng(2)
    for seed in range(20):
        sc = generate_scene(seed, size=128)
        present = set(sc.names)
        for split in ("random", "popular", "adversarial"):
            qs = pope_questions(sc, split, rng)
            yes = [q for q in qs if q.answer == "yes"]
            no = [q for q in qs if q.answer == "no"]
            assert len(yes) == len(no) >= 1
            assert all(q.question.split("a ", 1)[1].replace(" in the image?", "") not in present for q in no)
    # adversarial negatives favour the prior's partners of present objects
    class _S:  # a scene holding only a red circle
        objects = [type("O", (), {"shape": "circle", "color": "red"})()]
    assert negatives(_S, "adversarial", 1, rng) == ["red square"]


def test_binding_negatives_reuse_present_colours_and_shapes_on_other_objects():
    O = lambda c, s: type("O", (), {"shape": s, "color": c})()  # noqa: E731
    class _S:  # red circle + blue star: the binding negatives are exactly "red star" and "blue circle"
        objects, width, height = [O("red", "circle"), O("blue", "star")], 100, 100
    rng = np.random.default_rng(0)
    assert sorted(negatives(_S, "binding", 5, rng)) == ["blue circle", "red star"]
    _S.objects = [O("red", "circle")]                  # one object: nothing to confuse it with
    assert negatives(_S, "binding", 1, rng) == []
    # training existence questions fall back to a random negative instead of dropping the question
    asked = [make_qa(_S, np.random.default_rng(k), "exist") for k in range(200)]
    assert all(q is not None for q in asked) and {q.answer for q in asked} == {"yes", "no"}


def test_partial_negatives_share_exactly_one_attribute_and_the_mix_steers_training_questions():
    from vlmkit.data.scenes import COLORS, SHAPES, object_names
    from vlmkit.default.qa import TRAIN_NEGATIVES, conversation, parse_negative_mix

    O = lambda c, s: type("O", (), {"shape": s, "color": c})()  # noqa: E731
    class _S:  # red circle + blue star
        objects, width, height = [O("red", "circle"), O("blue", "star")], 100, 100
    part = negatives(_S, "partial", 100, np.random.default_rng(0))
    # red or blue with a shape other than circle / star, or circle / star in a third colour: nothing else
    expect = {f"{c} {s}" for c in ("red", "blue") for s in SHAPES if s not in ("circle", "star")}
    expect |= {f"{c} {s}" for c in COLORS if c not in ("red", "blue") for s in ("circle", "star")}
    assert set(part) == expect and len(part) == len(expect)
    # a mix of only partial negatives makes every "no" existence question about such an object
    mix = parse_negative_mix("partial=1")
    asked = [make_qa(_S, np.random.default_rng(k), "exist", negative_mix=mix) for k in range(300)]
    asked_names = [n for q in asked if q.answer == "no" for n in object_names() if f" {n} " in f"{q.question} "]
    assert len(asked_names) > 100 and set(asked_names) <= expect     # (shape- or colour-only questions name none)
    # no mix = the shipped one (TRAIN_NEGATIVES): the same draws as naming it
    for k in range(20):
        sc = generate_scene(k, size=128)
        a = conversation(sc, np.random.default_rng(k))
        b = conversation(sc, np.random.default_rng(k), negative_mix=dict(TRAIN_NEGATIVES))
        assert [(q.question, q.answer) for q in a] == [(q.question, q.answer) for q in b]


def test_skill_mix_steers_which_questions_a_conversation_asks():
    from vlmkit.default.qa import SKILL_WEIGHTS, conversation, parse_skill_mix

    sc = generate_scene(3, size=160)
    mix = parse_skill_mix("count=0.5,location=0.5")
    asked = [q.skill for k in range(60) for q in conversation(sc, np.random.default_rng(k), skill_mix=mix)]
    assert set(asked) <= {"count", "location"} and {"count", "location"} <= set(asked)
    # no mix = the shipped one: the same draws as naming it
    for k in range(20):
        a = conversation(sc, np.random.default_rng(k))
        b = conversation(sc, np.random.default_rng(k), skill_mix=dict(SKILL_WEIGHTS))
        assert [(q.question, q.answer) for q in a] == [(q.question, q.answer) for q in b]
    with pytest.raises(ValueError, match="skill mix"):
        parse_skill_mix("exist=0.5,jump=0.5")


@pytest.mark.parametrize("text", ["random=0.5,foo=0.5", "random=0.5,random=0.5", "random", "random=-1,binding=2",
                                  "random=0.5,binding=0.4", "random=nan,binding=1"])
def test_negative_mix_rejects_unknown_kinds_repeats_and_shares_not_summing_to_one(text):
    from vlmkit.default.qa import parse_negative_mix

    with pytest.raises(ValueError, match="negative mix"):
        parse_negative_mix(text)


def test_token_geometry_covers_the_whole_image():
    boxes = token_boxes(200, 100)                       # padded to 200 x 200: rows 0-1 and 6-7 are mostly padding
    assert boxes.shape == (N_IMAGE_TOKENS, 4)
    assert boxes[:, 0].min() == 0 and boxes[:, 2].max() == 200 and boxes[:, 3].max() == 100
    assert (boxes[:GRID, 3] <= boxes[:GRID, 1]).all()   # first row lies entirely on the top padding
    m = np.zeros((100, 200), bool)
    m[:, :25] = True                                    # left eighth of the image = first token column
    cov = patch_coverage(m).reshape(GRID, GRID)
    assert cov[2:6, 0].min() > 0.95 and cov[:, 1:].max() < 0.05


def test_processor_shows_the_whole_image_as_64_tokens():
    model, proc = build_model_and_processor()
    assert proc.image_processor.do_pad and not proc.image_processor.do_center_crop
    assert model.config.vision_feature_layer == -1 and model.config.vision_feature_select_strategy == "default"
    img = generate_scene(3, size=(180, 96)).image
    enc = proc(images=img, text=prompt_text("Is there a red circle in the image?"), return_tensors="pt")
    assert tuple(enc["pixel_values"].shape) == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == N_IMAGE_TOKENS
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    assert proc.apply_chat_template(msgs, add_generation_prompt=True) == prompt_text("Describe the image.")


@pytest.mark.skipif(not (CHECKPOINT_DIR / "config.json").is_file(), reason="default checkpoint not shipped yet")
def test_shipped_checkpoint_loads_with_plain_transformers_and_answers():
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(CHECKPOINT_DIR)).eval()
    proc = AutoProcessor.from_pretrained(str(CHECKPOINT_DIR))
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    total = sum(p.stat().st_size for p in CHECKPOINT_DIR.rglob("*") if p.is_file())
    assert total <= 40 * 2 ** 20
    metrics = json.loads((CHECKPOINT_DIR / "metrics.json").read_text())
    assert {"random", "popular", "adversarial"} <= set(metrics["pope"])
    sc = generate_scene(5_900_001, size=160, n_objects=3, style="plain")
    present = sc.objects[0].name
    absent = next(n for n in ("purple hexagon", "orange heart", "white star", "black diamond") if n not in sc.names)
    qs = [f"Is there a {present} in the image?", f"Is there a {absent} in the image?"]
    proc.tokenizer.padding_side = "left"
    enc = proc(images=[sc.image, sc.image], text=[prompt_text(q) for q in qs], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    answers = [a.strip() for a in proc.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                                              skip_special_tokens=True)]
    assert all(a in ("yes", "no") for a in answers), answers
    if metrics["pope"]["random"]["accuracy"] >= 0.9:
        assert answers == ["yes", "no"]


@pytest.mark.slow
def test_smoke_recipe_trains_saves_resumes_and_evaluates(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmkit.default.train import train

    m = train(tmp_path / "model", minutes=0.08, smoke=True, run_dir=tmp_path / "run", n_scenes=24, eval_images=4,
              log=lambda *_: None)
    assert (tmp_path / "run" / "ckpt.pt").is_file()
    assert json.loads((tmp_path / "model" / "metrics.json").read_text())["pope"]["random"]["n"] > 0
    assert 0 <= m["pope"]["adversarial"]["accuracy"] <= 1 and m["training"]["stage_b_steps"] > 0
    AutoModelForImageTextToText.from_pretrained(str(tmp_path / "model"))
    AutoProcessor.from_pretrained(str(tmp_path / "model"))
    m2 = train(tmp_path / "model2", minutes=0.08, smoke=True, resume=True, run_dir=tmp_path / "run", n_scenes=24,
               eval_images=4, log=lambda *_: None)
    assert m2["training"]["stage_b_steps"] >= m["training"]["stage_b_steps"]
    with pytest.raises(ValueError, match=r"other options \(shape_weight: 0.0 there, 2.0 now"):
        train(tmp_path / "model3", minutes=0.08, smoke=True, resume=True, run_dir=tmp_path / "run", n_scenes=24,
              shape_weight=2.0, log=lambda *_: None)


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    """A run stopped in stage A and again in stage B, then resumed, writes the same weights (and weight average) as
    one that never stopped (checkpoints carry the data-draw state and the averages as well as the optimiser's), on as
    many threads as torch uses here (the row-attention backward must not depend on thread timing)."""
    import vlmkit.default.train as tr

    kw = dict(smoke=True, n_scenes=24, eval_images=4, steps_a=6, steps_b=10, ema=(0.8,), log=lambda *_: None)
    tr.train(tmp_path / "whole", run_dir=tmp_path / "run_whole", **kw)

    save, stops = tr._save_ckpt, [("A", 3), ("B", 4)]

    def save_then_stop(path, state):
        save(path, state)
        if isinstance(state, dict) and stops and (state["state"]["stage"], state["state"]["step"]) == stops[0]:
            stops.pop(0)
            raise KeyboardInterrupt
    monkeypatch.setattr(tr, "_save_ckpt", save_then_stop)
    monkeypatch.setattr(tr, "CKPT_EVERY_S", -1.0)          # a checkpoint after every step
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            tr.train(tmp_path / "parts", run_dir=tmp_path / "run_parts", resume=True, **kw)
    m = tr.train(tmp_path / "parts", run_dir=tmp_path / "run_parts", resume=True, **kw)
    assert not stops and m["training"]["stage_b_steps"] == 10
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    parts = load_file(str(tmp_path / "parts" / "model.safetensors"))
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)
    whole = load_file(str(tmp_path / "run_whole" / "raw" / "model.safetensors"))    # the weights, not the average
    parts = load_file(str(tmp_path / "run_parts" / "raw" / "model.safetensors"))
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)


def test_ema_saves_the_average_as_the_model_and_the_raw_weights_beside_it(tmp_path):
    """With ``ema`` the saved model holds the first average, which differs from the raw weights (run_dir/raw) and
    a faster average lies nearer them; the tower, frozen in stage B, is the same in all (resuming the averages:
    ``test_interrupted_and_resumed_run_equals_an_uninterrupted_one``)."""
    import vlmkit.default.train as tr

    kw = dict(smoke=True, n_scenes=24, eval_images=2, steps_a=3, steps_b=12, log=lambda *_: None)
    tr.train(tmp_path / "m", run_dir=tmp_path / "run", ema=(0.9, 0.5), **kw)
    avg = load_file(str(tmp_path / "m" / "model.safetensors"))
    raw = load_file(str(tmp_path / "run" / "raw" / "model.safetensors"))
    other = load_file(str(tmp_path / "run" / "ema-0.5" / "model.safetensors"))
    assert avg.keys() == raw.keys() == other.keys()
    tower = [k for k in avg if "vision_tower" in k]
    assert tower and all(torch.equal(avg[k], raw[k]) and torch.equal(other[k], raw[k]) for k in tower)
    k = "multi_modal_projector.linear_1.weight"
    # the faster average (0.5) sits nearer the raw weights than the slower one (0.9)
    assert 0 < (other[k] - raw[k]).norm() < (avg[k] - raw[k]).norm()
    assert json.loads((tmp_path / "m" / "metrics.json").read_text())["training"]["ema"] == [0.9, 0.5]
    with pytest.raises(ValueError, match="ema="):
        tr.train(tmp_path / "x", run_dir=tmp_path / "run_x", ema=(1.0,), **kw)


def test_stage_b_on_the_tower_of_a_finished_run_replays_its_stage_b(tmp_path):
    """``tower_from`` skips stage A and, with the same options, writes the same weights as the run whose tower it took
    (using that run's scene pool); a tower trained with other stage-A options, or a missing run, is refused."""
    import vlmkit.default.train as tr

    kw = dict(smoke=True, n_scenes=24, eval_images=2, steps_a=4, steps_b=6, log=lambda *_: None)
    tr.train(tmp_path / "whole", run_dir=tmp_path / "run_whole", **kw)
    m = tr.train(tmp_path / "b_only", run_dir=tmp_path / "run_b", tower_from=tmp_path / "run_whole", **kw)
    assert not list((tmp_path / "run_b").glob("pool_*"))                 # the tower's pool was used, not rebuilt
    assert m["training"]["stage_a_steps"] == 4 and m["training"]["stage_b_steps"] == 6
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b_only = load_file(str(tmp_path / "b_only" / "model.safetensors"))
    assert whole.keys() == b_only.keys() and all(torch.equal(whole[k], b_only[k]) for k in whole)
    with pytest.raises(ValueError, match=r"other options \(spread: 0.25 there, 0.5 now"):
        tr.train(tmp_path / "x", run_dir=tmp_path / "run_x", tower_from=tmp_path / "run_whole", spread=0.5, **kw)
    with pytest.raises(FileNotFoundError, match="no ckpt.pt"):
        tr.train(tmp_path / "x", run_dir=tmp_path / "run_x", tower_from=tmp_path / "nowhere", **kw)


def test_draw_batches_groups_by_length_without_changing_the_draw():
    from vlmkit.default.train import BATCH_B, Tokens, build_pool, draw_batches

    _, processor = build_model_and_processor(0)
    *_, recs = build_pool(12, processor, smoke=True)
    tok, easy = Tokens(processor.tokenizer), np.array([0, 1, 2])
    one = draw_batches(np.random.default_rng(5), recs, easy, 0.5, tok)
    assert len(one) == 1 and len(one[0][0]) == BATCH_B == len(one[0][1])
    again = draw_batches(np.random.default_rng(5), recs, easy, 0.5, tok, group=1)
    assert [s[0] for s in again[0][1]] == [s[0] for s in one[0][1]]
    four = draw_batches(np.random.default_rng(7), recs, easy, 1.0, tok, group=4)
    assert len(four) == 4 and all(len(i) == len(sq) == BATCH_B for i, sq in four)
    assert {int(i) for b in four for i in b[0]} <= {0, 1, 2}  # p = 1: easy scenes only
    spans = sorted((min(len(s[0]) for s in sq), max(len(s[0]) for s in sq)) for _, sq in four)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # batches do not overlap in length
    padded = lambda bs: sum(len(sq) * max(len(s[0]) for s in sq) for _, sq in bs)  # noqa: E731
    draw_order = draw_batches(np.random.default_rng(7), recs, easy, 1.0, tok, group=4)
    assert [s[0] for s in draw_order[0][1]] == [s[0] for s in four[0][1]]  # deterministic in the rng
    seqs = [s for _, sq in four for s in sq]
    unsorted = [(None, seqs[j::4]) for j in range(4)]  # the same conversations, batched without grouping
    assert padded(four) <= padded(unsorted)


def test_curriculum_starts_on_easy_scenes_and_ends_uniform():
    from vlmkit.default.train import CURRICULUM, Obj, Record, is_easy, p_easy

    hold, end = CURRICULUM
    assert p_easy(0.0) == 1.0 and p_easy(hold * 0.99) == 1.0
    assert 0.0 < p_easy((hold + end) / 2) < 1.0
    assert p_easy(end) == 0.0 and p_easy(1.0) == 0.0
    assert all(p_easy(a) >= p_easy(b) for a, b in zip(np.linspace(0, 1, 20), np.linspace(0, 1, 20)[1:]))

    def rec(cells):  # one object per entry, covering ``cells`` token cells
        cov = np.zeros((len(cells), N_IMAGE_TOKENS), np.float16)
        for k, c in enumerate(cells):
            cov[k, :int(c)] = 1.0
            cov[k, int(c)] = c - int(c)
        return Record(96, 96, [Obj("circle", "red", (0, 0, 1, 1), (0, 0))] * len(cells), cov)

    assert is_easy(rec([1.0, 4.0]))
    assert not is_easy(rec([0.5, 4.0]))                 # one object smaller than a token cell
    assert not is_easy(rec([2.0, 2.0, 2.0, 2.0]))       # more than three objects
    assert p_easy(0.2, (0.1, 0.35)) == pytest.approx(0.6)  # a schedule given by --curriculum


@pytest.mark.parametrize("schedule", [(0.6, 0.3), (0.3, 0.3), (-0.1, 0.5), (0.2, 1.5)])
def test_train_rejects_a_curriculum_that_is_not_hold_before_end(tmp_path, schedule):
    from vlmkit.default.train import train

    with pytest.raises(ValueError, match="curriculum"):
        train(tmp_path / "m", smoke=True, run_dir=tmp_path / "run", curriculum=schedule)


@pytest.mark.parametrize("option", [{"spread": -0.1}, {"spread": 1.5}, {"vision_layers": 0},
                                    {"negatives": {"random": 0.5}}, {"skills": {"exist": 0.5, "count": 0.6}}])
def test_train_rejects_a_bad_spread_tower_depth_or_negative_or_skill_mix(tmp_path, option):
    from vlmkit.default.train import train

    with pytest.raises(ValueError, match=next(iter(option))):
        train(tmp_path / "m", smoke=True, run_dir=tmp_path / "run", **option)


def test_stage_a_labels_every_object_even_below_one_cell():
    from vlmkit.data.scenes import COLORS, SHAPES
    from vlmkit.default.train import MIN_LABEL_COVER, TRAIN_SEED0, _render

    _, processor = build_model_and_processor(0)
    seen_small = 0
    pixels = {}
    for seed, variety in [(s, v) for s in range(TRAIN_SEED0, TRAIN_SEED0 + 12) for v in (0.0, 1.0)]:
        pixels[seed, variety], col, shp, cen, rec = _render((seed, True, processor.image_processor, variety, 0.0))
        cov = rec.coverage.astype(np.float32)                                    # [objects, 64]
        assert col.shape == shp.shape == cen.shape == (N_IMAGE_TOKENS,)
        for k, o in enumerate(rec.objects):
            j = int(cov[k].argmax())
            if cov[:, j].argmax() != k or cov[k, j] < MIN_LABEL_COVER:
                continue                                                       # another object dominates its cell
            assert (col[j], shp[j]) == (COLORS.index(o.color) + 1, SHAPES.index(o.shape) + 1), (seed, k)
            seen_small += int(cov[k, j] < 0.25)
        big = cov.max(0) >= 0.25                                               # cells an object covers >= 25%
        assert (col[big] > 0).all() and (shp[big] > 0).all()
        assert (col[cov.max(0) < MIN_LABEL_COVER] == 0).all()                  # empty cells are background
    assert seen_small > 0                                                      # the rule was exercised
    varied = [not np.array_equal(pixels[s, 0.0], pixels[s, 1.0]) for s, _ in pixels]
    assert sum(varied) >= len(varied) - 2                                      # variety = 1: (nearly) all redrawn


def test_stage_a_spread_labels_every_cell_holding_that_share_of_an_object():
    from vlmkit.data.scenes import COLORS
    from vlmkit.default.train import MIN_LABEL_COVER, TRAIN_SEED0, _render

    _, processor = build_model_and_processor(0)
    added = 0
    for seed in range(TRAIN_SEED0, TRAIN_SEED0 + 12):
        _, col0, _, _, rec = _render((seed, True, processor.image_processor, 0.0, 0.0))
        _, col, shp, _, _ = _render((seed, True, processor.image_processor, 0.0, 0.25))
        cov = rec.coverage.astype(np.float32)                                    # [objects, 64]
        share = cov / cov.sum(1, keepdims=True)
        assert (col[col0 > 0] == col0[col0 > 0]).all()                          # the shipped labels stay
        for k, o in enumerate(rec.objects):
            cells = (share[k] >= 0.25) & (cov.argmax(0) == k) & (cov[k] >= MIN_LABEL_COVER)
            assert (col[cells] == COLORS.index(o.color) + 1).all(), (seed, k)
            added += int((cells & (col0 != col)).sum())
        assert ((col > 0) == (shp > 0)).all()
    assert added > 0                                                            # spread labelled more cells


def test_stage_a_loss_weighs_object_cells_above_background_and_shapes_by_shape_weight():
    from vlmkit.default.train import stage_a_loss

    def heads_reading(dims):            # linear heads whose logits are the feature dims ``dims``
        lin = torch.nn.Linear(128, len(dims), bias=False)
        with torch.no_grad():
            lin.weight.zero_()
            lin.weight[torch.arange(len(dims)), torch.as_tensor(dims)] = 1.0
        return lin

    heads = torch.nn.ModuleDict({"color": heads_reading(range(9)), "shape": heads_reading(range(9, 18)),
                                 "center": heads_reading([18])})

    def loss(colour_guess, shape_guess, label, **weights):
        hs = torch.zeros(1, N_IMAGE_TOKENS, 128)
        hs[0, :, colour_guess], hs[0, :, 9 + shape_guess] = 8.0, 8.0        # confident guesses in every cell
        lab = torch.full((1, N_IMAGE_TOKENS), -100)
        lab[0, 0] = label                                                 # one labelled cell
        return float(stage_a_loss(heads, hs, lab, lab.clone(), torch.zeros(1, N_IMAGE_TOKENS), **weights).detach())

    right = loss(3, 3, 3, shape_weight=2.0)
    wrong_colour = loss(4, 3, 3, shape_weight=2.0) - right                          # on an object cell (label 3)
    wrong_shape = loss(3, 4, 3, shape_weight=2.0) - right
    background_miss = loss(4, 0, 0) - loss(0, 0, 0)                               # a colour miss on background
    assert wrong_shape > 1.5 * wrong_colour > 0                # the extra shape weight (--shape-weight)
    assert loss(4, 3, 3) - loss(3, 3, 3) == pytest.approx(wrong_colour)           # colours do not depend on it
    assert wrong_colour > 1.5 * background_miss > 0            # object cells count more than background (OBJECT_WEIGHT)
    unweighted = {"object_weight": 0.0, "shape_weight": 0.0}
    assert loss(3, 4, 3, **unweighted) == pytest.approx(loss(4, 3, 3, **unweighted))
    assert loss(4, 3, 3, **unweighted) - loss(3, 3, 3, **unweighted) == pytest.approx(background_miss)


def test_absent_objects_look_at_their_near_misses():
    from vlmkit.default.qa import QA
    from vlmkit.default.train import Obj, Record, Tokens, attention_targets, encode_conversation

    cov = np.zeros((3, N_IMAGE_TOKENS), np.float16)
    cov[0, 0], cov[1, 9], cov[2, 20] = 1.0, 0.6, 0.2                # red circle, blue star, green square
    objs = [Obj("circle", "red", (0, 0, 1, 1), (0, 0)), Obj("star", "blue", (0, 0, 1, 1), (0, 0)),
            Obj("square", "green", (0, 0, 1, 1), (0, 0))]
    rec = Record(96, 96, objs, cov)
    red_star = QA("exist", "Is there a red star in the image?", "no", [], "no")
    assert attention_targets(red_star, rec) == [0, 1]                  # shares the colour / the shape
    assert attention_targets(QA("exist", "Is there a white heart in the image?", "no", [], "no"), rec) == []
    assert attention_targets(QA("exist", "Is there a red circle in the image?", "yes", [0], "yes"), rec) == [0]
    assert attention_targets(QA("list", "What objects are in the image?", "red circle", []), rec) == []
    tokens = Tokens(build_tokenizer())
    ids, labels, _, rows = encode_conversation([red_star], tokens, rec)
    (row, tgt), = rows
    assert ids[row + 1] == labels[row + 1] == tokens("no")[0]          # the row that predicts the answer
    assert set(np.flatnonzero(tgt)) == {0, 9}                          # both near misses, not the green square


def test_pope_breakdown_groups_by_object_size_and_shared_attributes():
    from vlmkit.default.evaluate import pope_breakdown

    rng = np.random.default_rng(0)
    qs = [(sc, qa) for sc in (generate_scene(5_000_000 + i) for i in range(6)) for qa in pope_questions(sc, "random", rng)]
    truth = [qa.answer == "yes" for _, qa in qs]
    right = pope_breakdown(qs, truth)                                     # every answer right
    assert right and all(v["accuracy"] == 1.0 for v in right.values())
    assert sum(v["n"] for v in right.values()) == len(qs)
    assert sum(v["n"] for k, v in right.items() if k.startswith("present")) == sum(truth)
    always_yes = pope_breakdown(qs, [True] * len(qs))
    assert all(v["accuracy"] == (1.0 if k.startswith("present") else 0.0) for k, v in always_yes.items())
    names = {(False, False): "colour and shape unseen", (True, False): "colour seen", (False, True): "shape seen",
             (True, True): "colour and shape seen"}
    for sc, qa in qs:                                    # "Is there a red circle in the image?" -> red, circle
        if qa.answer == "no":
            color, shape = qa.question.lower().split()[3:5]
            seen = (any(o.color == color for o in sc.objects), any(o.shape == shape for o in sc.objects))
            assert list(pope_breakdown([(sc, qa)], [False])) == [f"absent, {names[seen]}"], qa.question


def test_train_default_help_states_the_shipped_recipe():
    import argparse

    from vlmkit.default.cli import add_parsers
    from vlmkit.default.build import VISION_LAYERS
    from vlmkit.default.train import CURRICULUM, EMA, N_SCENES, PRECISION, SHAPE_WEIGHT, SPREAD, STEPS, VARIETY

    sub = argparse.ArgumentParser().add_subparsers()
    add_parsers(sub)
    text = " ".join(sub.choices["train-default"].format_help().split())
    assert f"({N_SCENES} scenes, two stages: {STEPS[0]} + {STEPS[1]} steps" in text
    assert f"default {N_SCENES};" in text
    assert f"(default {PRECISION};" in text and f"(default {VARIETY})" in text
    assert f"(default {SHAPE_WEIGHT};" in text
    assert f"(fractions; default {CURRICULUM[0]} {CURRICULUM[1]})" in text
    assert f"(default {SPREAD}; 0 = its best-covered cell only" in text
    assert f"(default {VISION_LAYERS})" in text
    assert f"(default {' '.join(map(str, EMA)) or 'none'})" in text
    from vlmkit.default.qa import TRAIN_NEGATIVES

    shipped_mix = ", ".join(f"{k}={v:g}" for k, v in TRAIN_NEGATIVES.items())    # spaced: wraps between kinds
    assert f"(default {shipped_mix})" in text
    from vlmkit.default.qa import SKILL_WEIGHTS

    assert "(default " + ", ".join(f"{k}={v:g}" for k, v in SKILL_WEIGHTS.items()) + ")" in text
    args = sub.choices["train-default"].parse_args(["--negatives", "random=0.5,partial=0.5"])
    assert args.negatives == {"random": 0.5, "partial": 0.5}
    args = sub.choices["train-default"].parse_args(["--skills", "exist=0.75,count=0.25"])
    assert args.skills == {"exist": 0.75, "count": 0.25}
    with pytest.raises(SystemExit):     # a bad mix is a usage error, not a traceback
        sub.choices["train-default"].parse_args(["--skills", "exist=0.5,jump=0.5"])
    args = sub.choices["train-default"].parse_args(["--curriculum", "0.1", "0.35"])
    assert args.curriculum == [0.1, 0.35]


def test_row_attention_equals_eager_attention_on_the_image_columns():
    import torch

    from vlmkit.default.row_attention import image_rows, register
    from vlmkit.default.train import IMG_START, lm_forward

    model, _ = build_model_and_processor(0)
    lm = model.model.language_model
    feats = torch.randn(2, 1 + N_IMAGE_TOKENS, 128)                    # [B, 65, 128] tower features
    ids = torch.randint(5, 100, (2, IMG_START + N_IMAGE_TOKENS + 9))
    am = torch.ones_like(ids)
    am[1, -3:] = 0                                                     # right padding on the second sample
    model.set_attn_implementation("eager")
    logits_e, attns = lm_forward(model, feats, ids, am, True)
    model.set_attn_implementation({"text_config": register()})
    bi, ri, cols = torch.tensor([0, 1, 1]), torch.tensor([70, 66, 71]), slice(IMG_START, IMG_START + N_IMAGE_TOKENS)
    with image_rows(lm, (1, 2), bi, ri, cols) as probs:
        logits_r, _ = lm_forward(model, feats, ids, am, False)
    assert set(probs) == {1, 2}
    torch.testing.assert_close(logits_r, logits_e, atol=1e-5, rtol=1e-4)
    for layer in (1, 2):
        torch.testing.assert_close(probs[layer], attns[layer][bi, :, ri, cols], atol=1e-5, rtol=1e-4)
    assert not hasattr(lm.layers[1].self_attn, "_vlmkit_rows")          # restored after the block
    probs.clear()
    lm_forward(model, feats, ids, am, False)
    assert not probs                                                    # nothing recorded outside the block


def test_packed_tokens_give_the_padded_forward_and_its_gradients():
    """Stage B runs the language model on the real tokens only (``lm_forward(pack=True)``): the logits of real tokens
    and the recorded answer-row probabilities must equal the padded forward's, and the gradients too (up to the
    order of the weight-gradient sums); padding rows of the packed logits are 0."""
    import torch

    from vlmkit.default.row_attention import image_rows, register
    from vlmkit.default.train import IMG_START, lm_forward

    torch.manual_seed(0)
    model, _ = build_model_and_processor(0)
    model.set_attn_implementation({"text_config": register()})
    lm = model.model.language_model
    feats = torch.randn(3, 1 + N_IMAGE_TOKENS, 128)                    # [B, 65, 128] tower features
    ids = torch.randint(5, 100, (3, IMG_START + N_IMAGE_TOKENS + 12))
    am = torch.ones_like(ids)
    am[1, -5:], am[2, -11:] = 0, 0                                     # right padding of different lengths
    bi, ri, cols = torch.tensor([0, 1, 2, 2]), torch.tensor([70, 66, 65, 66]), slice(IMG_START, IMG_START + 64)
    params = [p for n, p in model.named_parameters() if "vision_tower" not in n]
    runs = {}
    for pack in (False, True):
        model.zero_grad(set_to_none=True)
        with image_rows(lm, (1, 2), bi, ri, cols) as probs:
            logits, _ = lm_forward(model, feats, ids, am, False, pack=pack)
        loss = (logits * am[..., None]).square().mean() + sum(-probs[i][..., :5].sum(-1).log().mean() for i in (1, 2))
        loss.backward()
        runs[pack] = (logits.detach(), {i: p.detach() for i, p in probs.items()}, [p.grad for p in params])
    (lp, pp, gp), (lk, pk, gk) = runs[False], runs[True]
    real = am.bool()
    torch.testing.assert_close(lk[real], lp[real], atol=1e-6, rtol=1e-5)
    assert bool((lk[~real] == 0).all())
    for layer in (1, 2):
        torch.testing.assert_close(pk[layer], pp[layer], atol=1e-6, rtol=1e-5)
    assert all(g is not None for g in gk)
    for a, b in zip(gp, gk):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)
    assert not hasattr(lm.layers[0].self_attn, "_vlmkit_pack")         # restored after the forward
    with pytest.raises(RuntimeError):                                   # restored when the forward fails, too
        lm_forward(model, feats, ids, am[:, :-1], False, pack=True)
    assert not any(hasattr(layer.self_attn, "_vlmkit_pack") for layer in lm.layers)


def test_row_attention_gradients_do_not_depend_on_thread_timing():
    """Many answer rows from few samples: the backward gathers into the same keys many times, and must sum them in a
    fixed order on a multi-threaded CPU (advanced indexing did not: 2-thread training runs differed in the last bits)."""
    from vlmkit.default.row_attention import _attention

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.layer_idx, module.is_causal, store = 1, True, {}
    key = torch.randn(8, 4, 96, 32, requires_grad=True)                # [B, H, L, D]
    query = torch.randn(8, 4, 96, 32, requires_grad=True)
    bi, ri = torch.randint(0, 8, (400,)), torch.randint(70, 96, (400,))
    module._vlmkit_rows = (bi, ri, slice(2, 66), store)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        grads = []
        for _ in range(6):
            key.grad = query.grad = None
            _attention(module, query, key, key, None)
            (store[1] * torch.linspace(0, 1, 64)).sum().backward()          # [Q, H, 64] image-column probabilities
            grads.append((key.grad.clone(), query.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0][0], k) and torch.equal(grads[0][1], q) for k, q in grads[1:])


def test_list_answers_look_at_each_named_object_before_naming_it():
    from vlmkit.default.qa import QA
    from vlmkit.default.train import Obj, Record, Tokens, encode_conversation, list_targets

    cov = np.zeros((3, N_IMAGE_TOKENS), np.float16)
    cov[0, 3], cov[1, 40], cov[2, 41] = 0.9, 0.5, 0.05              # red circle; two blue stars
    objs = [Obj("circle", "red", (0, 0, 1, 1), (5, 0)), Obj("star", "blue", (0, 0, 1, 1), (10, 0)),
            Obj("star", "blue", (0, 0, 1, 1), (12, 0))]
    rec = Record(96, 96, objs, cov)
    tokens = Tokens(build_tokenizer())
    qa = QA("list", "What objects are in the image?", "red circle, blue star", [])
    assert tokens(qa.answer) == tokens("red circle") + tokens(",") + tokens("blue star")  # pieces concatenate
    assert list_targets(qa.answer, tokens, rec) == [(0, [0]), (3, [1, 2])]
    ids, labels, _, rows = encode_conversation([qa], tokens, rec)
    assert [ids[r + 1] for r, _ in rows] == [tokens("red")[0], tokens("blue")[0]]   # rows predict the colour word
    assert all(labels[r + 1] == ids[r + 1] for r, _ in rows)
    assert [set(np.flatnonzero(t)) for _, t in rows] == [{3}, {40}]    # 5% of cell 41 is below 15%, not the best


def test_paired_eval_bench_agrees_with_itself_and_its_mcnemar_test_is_exact(tmp_path):
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("paired_eval", root / "bench" / "paired_eval.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    mcnemar_p = bench.mcnemar_p

    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(5, 5) == 1.0
    assert mcnemar_p(0, 10) == pytest.approx(2 / 1024) == mcnemar_p(10, 0)
    assert mcnemar_p(21, 29) == pytest.approx(0.322, abs=1e-3)           # scipy.stats.binomtest(29, 50)
    ckpt, out = str(CHECKPOINT_DIR), tmp_path / "paired.json"
    r = subprocess.run([sys.executable, str(root / "bench" / "paired_eval.py"), "--a", ckpt, "--b", ckpt,
                        "--scenes", "8", "--threads", "1", "--json", str(out)],
                       capture_output=True, text=True, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {row["set"] for row in rows} >= {"pope_random", "color", "cluttered_adversarial"}
    assert all(row["a"] == row["b"] and row["only_a"] == row["only_b"] == 0 and row["n"] > 0 for row in rows)
    bad = subprocess.run([sys.executable, str(root / "bench" / "paired_eval.py"), "--a", ckpt, "--b", str(tmp_path)],
                         capture_output=True, text=True, cwd=root, timeout=120)
    assert bad.returncode != 0 and "not a checkpoint directory" in bad.stderr


def test_pope_margin_bench_sign_matches_the_greedy_answer():
    """bench/pope_margin.py claims bias 0 reproduces metrics.json: the yes-no margin's sign is generate's answer."""
    import importlib.util
    from pathlib import Path

    from vlmkit.default.evaluate import EVAL_SEED0, POPE_SPLITS, answer, is_yes, load

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("pope_margin", root / "bench" / "pope_margin.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model, processor = load(CHECKPOINT_DIR)
    scenes = [generate_scene(EVAL_SEED0 + i) for i in range(4)]
    rows = bench.margins(model, processor, scenes, np.random.default_rng(2024))
    rng = np.random.default_rng(2024)
    assert list(rows) == list(POPE_SPLITS)
    for split in POPE_SPLITS:
        qs = [(sc, qa) for sc in scenes for qa in pope_questions(sc, split, rng)]
        m, y = rows[split]
        assert len(m) == len(qs) > 0 and list(y) == [q.answer == "yes" for _, q in qs]
        said = [is_yes(a) for a in answer(model, processor, [s.image for s, _ in qs], [q.question for _, q in qs], 2)]
        assert list(m > 0) == said
