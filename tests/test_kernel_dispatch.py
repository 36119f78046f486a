"""Capture and interventions run through the kernel dispatch: answers and maps agree between VLMKIT_KERNEL=triton
(Triton's CPU interpreter) and VLMKIT_KERNEL=torch. Each backend runs in its own process (the interpreter can crash
a process on a bad load)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("triton")

WORKER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import vlmkit
from vlmkit.models.vlm import default_model_path
from vlmkit.methods.pai import PAI
if (default_model_path() / "config.json").is_file():
    vlm = vlmkit.load()
    from vlmkit.data.scenes import generate_scene
    images = [generate_scene(900 + i, size=96, n_objects=3).image for i in range(2)]
    qs = ["Is there a red circle in the image?", "What color is the star?"]
else:
    import tiny
    from vlmkit.models.vlm import VLM
    vlm = VLM(*tiny.build("llava"))
    rng = np.random.RandomState(0)
    from PIL import Image
    images = [Image.fromarray((rng.rand(20, 30, 3) * 255).astype("uint8")) for _ in range(2)]
    qs = ["is there a red circle ?", "what color ?"]
out = []
for img, q in zip(images, qs):
    with vlm.capture(rows="last") as rec:
        a = vlm.generate([img], [q], max_new_tokens=4)[0]
    with vlm.intervene(PAI(alpha=0.5)), vlm.capture(rows="last") as rec2:
        b = vlm.generate([img], [q], max_new_tokens=4)[0]
    out.append({"answer": a.token_ids, "pai": b.token_ids, "prefill": rec.maps.prefill.tolist(),
                "decode": rec.maps.decode.tolist(), "pai_prefill": rec2.maps.prefill.tolist()})
print(json.dumps(out))
"""


def _run(backend: str) -> list:
    env = {**os.environ, "VLMKIT_KERNEL": backend, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", WORKER, str(Path(__file__).parent)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_triton_interpreter_matches_torch_path():
    torch_out, triton_out = _run("torch"), _run("triton")
    for a, b in zip(torch_out, triton_out):
        assert a["answer"] == b["answer"] and a["pai"] == b["pai"]
        for key in ("prefill", "decode", "pai_prefill"):
            np.testing.assert_allclose(np.array(a[key]), np.array(b[key]), atol=1e-5, rtol=0)
