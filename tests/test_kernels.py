"""vlmkit.kernels: the PyTorch path against an explicit eager reference, modulation equivalences, input checks and
dispatch rules in-process; the Triton kernels under TRITON_INTERPRET=1, each group in a child process."""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _kernel_checks import LSE_TOL, PROB_TOL, close, eager, left_pad_mask, make
from vlmkit.errors import InputError, VlmkitError
from vlmkit.kernels import Modulation, attention, row_probs, select_backend
from vlmkit.kernels import torch_ref

NEG = float("-inf")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("VLMKIT_KERNEL", "torch")


def _attn(q, k, v, fast, **kw):
    """The torch path with the fast (SDPA CPU kernel) or the math branch."""
    from vlmkit.kernels._dispatch import _check_mask

    mask = _check_mask(kw.pop("mask", None), q, k)
    table = torch_ref.resolve_modulations(kw.pop("modulations", ()), (*q.shape[:3], k.shape[2]), "cpu")
    return torch_ref.attention(q, k, v, mask=mask, table=table, fast=fast, **kw)


CASES = {
    "causal GQA": (dict(b=2, h=4, hkv=2, lq=23, lk=23, d=16), dict(causal=True)),
    "non-causal": (dict(b=1, h=3, hkv=3, lq=17, lk=17, d=8), dict(causal=False)),
    "decode": (dict(b=2, h=6, hkv=2, lq=1, lk=31, d=16), dict(causal=True)),
    "chunked prefill": (dict(b=1, h=2, hkv=1, lq=9, lk=30, d=16), dict(causal=True)),
    "padding mask": (dict(b=3, h=2, hkv=1, lq=20, lk=20, d=16), dict(causal=False, pads=[0, 4, 12])),
    "additive mask": (dict(b=2, h=2, hkv=2, lq=20, lk=20, d=16), dict(causal=True, additive=True)),
}


@pytest.mark.parametrize("fast", [True, False], ids=["sdpa-cpu", "math"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_matches_eager(case, fast, dtype):
    shape, opts = CASES[case]
    q, k, v = make(**shape, dtype=dtype, spread=1.5)
    mask = None
    if "pads" in opts:
        mask = left_pad_mask(shape["b"], shape["lq"], shape["lk"], opts["pads"])
    if opts.get("additive"):
        r = torch.rand(shape["b"], 1, shape["lq"], shape["lk"], generator=torch.Generator().manual_seed(3))
        mask = torch.where(r > 0.2, -r, torch.tensor(NEG)).to(dtype)
        mask[..., 0] = 0.0
    out, lse, _ = _attn(q, k, v, fast, mask=mask, causal=opts["causal"], scaling=0.3)
    ref_o, ref_l, ref_p = eager(q, k, v, mask=mask, causal=opts["causal"], scaling=0.3)
    close("out", out, ref_o, 1e-5 if dtype == torch.float32 else 3e-2)
    close("lse", lse, ref_l, LSE_TOL)
    rows = torch.arange(shape["lq"])
    p = row_probs(q, k, lse, rows, torch.arange(shape["lk"]), mask=mask, causal=opts["causal"], scaling=0.3)
    close("probs", p, ref_p, PROB_TOL)
    live = torch.isfinite(ref_l)
    close("rows sum to 1", p.sum(-1)[live], torch.ones(int(live.sum())), 1e-5)
    assert (p[ref_p == 0] == 0).all(), "masked columns must be exactly 0"
    assert (out[~live] == 0).all(), "rows that see no key must output 0"


def test_fast_path_equals_sdpa():
    q, k, v = make(2, 4, 4, 19, 19, 16, torch.bfloat16)
    m = left_pad_mask(2, 19, 19, [0, 3])
    out, _ = attention(q, k, v, mask=m, causal=False, scaling=0.25)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.25)
    assert torch.equal(out, want), "on CPU, unmodulated attention must equal SDPA bitwise (answers must not change)"


def _mod_case():
    q, k, v = make(2, 4, 2, 24, 24, 16, spread=1.5)
    return q, k, v, dict(causal=True, scaling=0.3)


def test_modulation_scale_bias_alpha_match_explicit_edit():
    q, k, v, kw = _mod_case()
    mod = Modulation(heads=[1, 2], key_start=4, key_end=15, row_start=10, scale=[1.7, 0.6], bias=-0.4, alpha=0.3)

    def edit(s):
        s = s.clone()
        for h, sc in ((1, 1.7), (2, 0.6)):
            blk = s[:, h, 10:, 4:15]
            s[:, h, 10:, 4:15] = (blk + 0.3 * blk.abs()) * sc - 0.4
        return s

    out, lse = attention(q, k, v, modulations=[mod], **kw)
    ref_o, ref_l, ref_p = eager(q, k, v, edit=edit, **kw)
    close("out", out, ref_o, 1e-5)
    close("lse", lse, ref_l, LSE_TOL)
    p = row_probs(q, k, lse, torch.arange(24), torch.arange(24), modulations=[mod], **kw)
    close("probs of the modulated softmax", p, ref_p, PROB_TOL)


def test_tensor_valued_modulations_match_explicit_edit():
    from _kernel_checks import dense_mods

    q, k, v = make(2, 4, 2, 24, 24, 16, spread=1.5)
    mods = dense_mods(2, 4, 24, 24)
    alpha, post, bias = mods[0].alpha, mods[1].weight, mods[2].bias

    def edit(s):
        s = s.clone()
        blk = s[..., 2:21]
        s[..., 2:21] = blk + alpha[..., 2:21] * blk.abs()
        s[:, 1] = (s[:, 1] * 1.3) + bias[:, 0]
        return s

    w = torch.ones(2, 4, 1, 24)
    w[:, [0, 3], :, 1:] = post[:, [0, 3]]
    out, lse = attention(q, k, v, causal=True, scaling=0.3, modulations=mods)
    ref_o, ref_l, ref_p = eager(q, k, v, causal=True, scaling=0.3, edit=edit, post=w)
    close("out", out, ref_o, 1e-5)
    close("lse", lse, ref_l, LSE_TOL)
    p = row_probs(q, k, lse, torch.arange(24), torch.arange(24), causal=True, scaling=0.3, modulations=mods)
    close("probs", p, ref_p, PROB_TOL)
    with pytest.raises(InputError, match="broadcast"):
        attention(q, k, v, causal=True, modulations=[Modulation(alpha=torch.ones(2, 4, 5, 24))])


def test_renormalised_weight_equals_log_bias_and_zero_removes_keys():
    q, k, v, kw = _mod_case()
    cols = torch.zeros(24, dtype=torch.bool)
    cols[[2, 3, 7, 11]] = True
    w = attention(q, k, v, modulations=[Modulation(columns=cols, weight=2.0)], **kw)
    b = attention(q, k, v, modulations=[Modulation(columns=cols, bias=math.log(2.0))], **kw)
    close("out", w[0], b[0], 1e-6)
    close("lse", w[1], b[1], 1e-6)
    gone = attention(q, k, v, modulations=[Modulation(heads=[0], key_start=0, key_end=5, weight=0.0)], **kw)
    p = row_probs(q, k, gone[1], torch.arange(5, 24), torch.arange(24), **kw,
                  modulations=[Modulation(heads=[0], key_start=0, key_end=5, weight=0.0)])
    assert (p[:, 0, :, :5] == 0).all() and (p[:, 1, :, :5] > 0).all()
    close("remaining mass renormalised", p.sum(-1), torch.ones(p.shape[:-1]), 1e-5)


def test_unrenormalised_weight_equals_scaled_value_rows():
    q, k, v, kw = _mod_case()
    mod = Modulation(heads=[3], key_start=6, key_end=18, weight=0.2, renormalize=False)
    out, lse = attention(q, k, v, modulations=[mod], **kw)
    vrep = v.repeat_interleave(2, 1).clone()
    vrep[:, 3, 6:18] *= 0.2  # per-head V: what the in-kernel multiply avoids materialising
    ref_o, ref_l, ref_p = eager(q, k.repeat_interleave(2, 1), vrep, **kw)
    close("out", out, ref_o, 1e-5)
    close("lse unchanged", lse, ref_l, LSE_TOL)
    plain = row_probs(q, k, lse, torch.arange(24), torch.arange(24), modulations=[mod], **kw)
    close("probs stay the softmax", plain, ref_p, PROB_TOL)
    eff = row_probs(q, k, lse, torch.arange(24), torch.arange(24), modulations=[mod], weighted=True, **kw)
    assert torch.allclose(eff[:, 3, :, 6:18], plain[:, 3, :, 6:18] * 0.2) and torch.equal(eff[:, :3], plain[:, :3])


def test_identity_modulation_is_bitwise_none_and_composition_order():
    q, k, v, kw = _mod_case()
    base = _attn(q, k, v, False, **kw)
    ident = _attn(q, k, v, False, modulations=[Modulation(key_start=2, key_end=9, scale=1.0, alpha=0.0, bias=0.0),
                                               Modulation(heads=[1], weight=1.0, renormalize=False)], **kw)
    assert torch.equal(base[0], ident[0]) and torch.equal(base[1], ident[1])
    a = Modulation(key_start=0, key_end=12, scale=2.0)
    b = Modulation(key_start=6, key_end=24, bias=1.0)
    ab, ba = attention(q, k, v, modulations=[a, b], **kw), attention(q, k, v, modulations=[b, a], **kw)
    assert not torch.allclose(ab[1], ba[1]), "list order matters where ranges overlap"

    def edit(s):
        s = s.clone()
        s[..., :12] *= 2.0
        s[..., 6:] += 1.0
        return s

    close("a then b", ab[1], eager(q, k, v, edit=edit, **kw)[1], LSE_TOL)


def test_segment_mass_and_row_weights():
    q, k, v = make(2, 4, 2, 30, 30, 16)
    m = left_pad_mask(2, 30, 30, [0, 6])
    out, lse, mass = attention(q, k, v, mask=m, causal=False, scaling=0.25, segments=[(0, 6), (6, 20), (20, 30)])
    _, _, p = eager(q, k, v, mask=m, causal=False, scaling=0.25)
    want = torch.stack([p[..., :6].sum(-1), p[..., 6:20].sum(-1), p[..., 20:].sum(-1)], -1)
    close("mass", mass, want, PROB_TOL)
    rows, cols = torch.tensor([[29, 10, -1], [29, 3, 15]]), torch.arange(6, 20)
    w = torch.tensor([[1.0, 0.5, 3.0], [0.2, 0.2, 0.2]])
    red = row_probs(q, k, lse, rows, cols, mask=m, causal=False, scaling=0.25, row_weights=w)
    full = row_probs(q, k, lse, rows, cols, mask=m, causal=False, scaling=0.25)
    close("reduced == weighted sum", red, (full * w[:, None, :, None]).sum(2), 1e-6)
    assert (full[0, :, 2] == 0).all(), "padding row slot must be 0"
    assert (full[1, :, 1, :] == 0).all(), "row 3 of sample 1 is padding: fully masked"


@pytest.mark.parametrize("bad, match", [
    (dict(mask=torch.ones(2, 3, 24, 24, dtype=torch.bool)), "does not broadcast"),
    (dict(mask=torch.ones(24, 24, dtype=torch.int32)), "bool"),
    (dict(modulations=[Modulation(heads=[9])]), "heads"),
    (dict(modulations=[Modulation(weight=-1.0)]), "weight"),
    (dict(modulations=[Modulation(heads=[0, 1], scale=[1.0, 2.0, 3.0])]), "scale"),
    (dict(modulations=[Modulation(key_start=5, key_end=2)]), "reversed"),
    (dict(segments=[(4, 1)]), "segments"),
])
def test_bad_inputs_are_named(bad, match):
    q, k, v, kw = _mod_case()
    with pytest.raises(InputError, match=match):
        attention(q, k, v, **bad, **kw)


def test_empty_calls():
    import _kernel_checks

    _kernel_checks.shapes_empty()


def test_bad_row_inputs_are_named():
    q, k, v, kw = _mod_case()
    _, lse = attention(q, k, v, **kw)
    with pytest.raises(InputError, match="rows"):
        row_probs(q, k, lse, torch.tensor([24]), torch.arange(3), **kw)
    with pytest.raises(InputError, match="cols"):
        row_probs(q, k, lse, torch.tensor([1]), torch.tensor([0.5]), **kw)
    with pytest.raises(InputError, match="lse"):
        row_probs(q, k, lse[:, :, :3], torch.tensor([1]), torch.arange(3), **kw)
    with pytest.raises(InputError, match="row_weights"):
        row_probs(q, k, lse, torch.tensor([1, 2]), torch.arange(3), row_weights=torch.ones(3), **kw)
    with pytest.raises(InputError, match="query heads"):
        attention(q[:, :3], k, v, **kw)


def test_dispatch_rules(monkeypatch):
    q, k, v = make(1, 2, 1, 4, 4, 8)
    assert select_backend(q, k, v).backend == "torch"
    monkeypatch.setenv("VLMKIT_KERNEL", "auto")
    assert select_backend(q, k, v).reason == "tensors on cpu"
    monkeypatch.setenv("VLMKIT_KERNEL", "cuda-please")
    with pytest.raises(InputError, match="VLMKIT_KERNEL"):
        attention(q, k, v, causal=True)
    monkeypatch.setenv("VLMKIT_KERNEL", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if importlib.util.find_spec("triton") is not None:
        with pytest.raises(VlmkitError, match="TRITON_INTERPRET=1"):
            attention(q, k, v, causal=True)


def test_import_without_triton():
    code = ("import sys\n"
            "sys.modules['triton'] = None  # what an absent package looks like to import and find_spec\n"
            "import torch, vlmkit.kernels as K\n"
            "q = torch.randn(1, 2, 5, 8)\n"
            "out, lse = K.attention(q, q, q, causal=True)\n"
            "assert out.shape == (1, 2, 5, 8) and 'vlmkit.kernels.triton_attn' not in sys.modules\n"
            "assert K.select_backend(q, q, q).backend == 'torch'\n"
            "import os; os.environ['VLMKIT_KERNEL'] = 'triton'\n"
            "try:\n"
            "    K.attention(q, q, q, causal=True)\n"
            "except __import__('vlmkit.errors').errors.VlmkitError as e:\n"
            "    assert 'not installed' in str(e), e\n"
            "else:\n"
            "    raise SystemExit('forcing triton without triton must raise')\n")
    env = {k: v for k, v in os.environ.items() if k != "VLMKIT_KERNEL"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


# ------------------------------------------------------------------------------------------ Triton (interpreter)
GROUPS = ["dtypes", "shapes", "masks", "modulations", "pass2", "segments", "dispatch"]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _run_group(group):
    env = dict(os.environ, TRITON_INTERPRET="1", VLMKIT_KERNEL="triton",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(HERE / "_kernel_checks.py"), group], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=900)
    assert r.returncode == 0, (f"group {group!r} failed with exit code {r.returncode} (negative = killed by signal)\n"
                               f"{r.stdout}\n{r.stderr[-4000:]}")
    assert r.stdout.count("ok ") >= 1


@needs_triton
@pytest.mark.parametrize("group", GROUPS)
def test_triton_interpreter(group):
    _run_group(group)


@needs_triton
@pytest.mark.slow
def test_triton_interpreter_larger_shapes():
    _run_group("slow")


@needs_triton
@pytest.mark.slow
def test_as_transformers_attention_same_answers_and_maps():
    _run_group("transformers")


def test_bench_cpu_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_speed.py"), "--cpu-smoke", "--reps", "1", "--json",
                        str(out), "--methods", "eager", "sdpa+rows", "vlmkit+pass2", "vlmkit+pass2-reduced"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={k: v for k, v in os.environ.items() if k not in ("VLMKIT_KERNEL", "TRITON_INTERPRET")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    import json

    rep = json.loads(out.read_text())
    ours = [x for x in rep["results"] if x["method"].startswith("vlmkit")]
    assert ours and all(x["max_prob_err"] < 1e-5 and x["ms"] > 0 for x in ours)
    assert rep["notes"] and all(n.endswith("True") for n in rep["notes"])
