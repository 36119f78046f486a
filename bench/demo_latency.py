"""Gradio demo latency (issue 10): start-up to ready and per-endpoint latency, default model on CPU.

Launches the demo in this process on a free 127.0.0.1 port (as ``tests/test_demo.py`` does) and times the start-up
phases from process start (imports, example images, model + segmenter + pointer head, building and launching the
app) against the 20 s target. Then every endpoint is called through ``gradio_client`` once to warm up and ``--calls``
more times, each call on a different generated image (CARVE and the grounder cache per-image work, so repeating an
image would flatter them); the table gives the first call and the median wall-clock ms against the 5 s target.
Finally ``python apps/demo.py --help`` and a real ``python apps/demo.py --port N`` start (time until the page
answers) are checked in subprocesses (skip the latter with ``--no-subprocess``).

    python3 bench/demo_latency.py [--calls 3] [--threads N] [--model PATH] [--no-subprocess] [--out FILE.json]

Timings are wall-clock on a shared machine: other load inflates them (the load average is printed).
"""

from __future__ import annotations

import time

T_SCRIPT = time.perf_counter()  # before any heavy import

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STARTUP_TARGET_S, ENDPOINT_TARGET_S = 20.0, 5.0


def since_process_start() -> float:
    """Seconds since this process started (Linux ``/proc``; elsewhere since this script's first line)."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(stat[19]) / ticks  # field 22 (starttime) is the 20th after the ")"
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - T_SCRIPT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    """Poll ``url`` until it answers 200 (False on timeout or when ``proc`` exits first)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as r:  # our own local server
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def start_in_process(args, tmp: Path, t_torch: float):
    """Import, write examples, load, build and launch; returns ``(demo, app, url, phases)`` (seconds)."""
    phases = {"interpreter start": since_process_start() - (time.perf_counter() - T_SCRIPT),
              "import torch": t_torch}
    t = time.perf_counter()
    import gradio  # noqa: F401

    from vlmkit.app import Demo, DemoConfig, make_gui_examples, scene_examples
    phases["import gradio + vlmkit.app"] = time.perf_counter() - t
    t = time.perf_counter()
    scenes = scene_examples(tmp / "scenes", args.calls + 1)
    screens = make_gui_examples(tmp / "screens", args.calls + 1)
    phases["example images"] = time.perf_counter() - t
    t = time.perf_counter()
    cfg = DemoConfig(model=args.model, sam_checkpoint=args.sam_checkpoint, port=free_port(),
                     examples=[p for p, _ in scenes], detect_examples=scenes, gui_examples=screens)
    demo = Demo(cfg)
    phases["model + SAM + pointer head"] = time.perf_counter() - t
    t = time.perf_counter()
    app, (_, url, _) = demo.launch(prevent_thread_lock=True)
    if not wait_http(url, 30):
        raise SystemExit(f"demo at {url} did not answer")
    phases["build + launch until the page answers"] = time.perf_counter() - t
    return demo, app, url, phases


def endpoint_calls(demo, calls: int):
    """``(name, [argument tuples], warm-up arguments)`` per endpoint; distinct images per call."""
    from gradio_client import handle_file

    scenes = [handle_file(p) for p in demo.cfg.examples]
    named = [n for _, n in demo.cfg.detect_examples]
    screens = [(handle_file(p), t) for p, t in demo.cfg.gui_examples]
    last = demo.num_layers - 1
    table = {
        "/ask": [(s, "Is there a red circle in the image?", 0, last, "mean") for s in scenes],
        "/carve": [(s, "What color is the star?") for s in scenes],
        "/fixes": [(s, "Is there a blue star in the image?") for s in scenes],
        "/detect (open-ended)": [(s, "", 5, False) for s in scenes],
        "/detect (names)": [(s, n, 5, False) for s, n in zip(scenes, named)],
        "/ground": list(screens),
    }
    return {k: v[: calls + 1] for k, v in table.items()}


def time_endpoints(client, demo, calls: int) -> list[dict]:
    rows = []
    for name, arglist in endpoint_calls(demo, calls).items():
        api = name.split()[0]
        times = []
        for a in arglist:
            t = time.perf_counter()
            client.predict(*a, api_name=api)
            times.append(1000 * (time.perf_counter() - t))
        rest = times[1:] or times
        rows.append({"endpoint": name, "first_ms": times[0], "median_ms": statistics.median(rest),
                     "min_ms": min(rest), "max_ms": max(rest), "calls": len(rest)})
        print(f"  {name}: median {rows[-1]['median_ms']:.0f} ms", file=sys.stderr, flush=True)
    return rows


def cli_checks(args) -> dict:
    """``apps/demo.py --help`` and a real start of ``apps/demo.py`` in a subprocess."""
    out = {}
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "apps" / "demo.py"), "--help"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT, env=env, check=False)
    out["help"] = {"rc": r.returncode, "s": time.perf_counter() - t, "mentions_sam": "--sam-checkpoint" in r.stdout}
    if args.no_subprocess:
        return out
    port = free_port()
    cmd = [sys.executable, str(ROOT / "apps" / "demo.py"), "--port", str(port)]
    if args.model:
        cmd += ["--model", args.model]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ok = wait_http(f"http://127.0.0.1:{port}/", 120, proc)
        out["start"] = {"ok": ok, "s": time.perf_counter() - t, "cmd": " ".join(["apps/demo.py", *cmd[2:]])}
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    if not out["start"]["ok"]:
        out["start"]["stderr_tail"] = (err or "")[-800:]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3, help="timed calls per endpoint after one warm-up call")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--sam-checkpoint", default=None)
    ap.add_argument("--no-subprocess", action="store_true", help="skip the real `apps/demo.py` start")
    ap.add_argument("--out", default=None, help="also write the numbers as JSON")
    args = ap.parse_args(argv)
    if args.calls < 1:
        ap.error("--calls must be >= 1")
    t = time.perf_counter()
    import torch

    t_torch = time.perf_counter() - t
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="vlmkit-demo-bench-"))
    demo, app, url, phases = start_in_process(args, tmp, t_torch)
    startup = since_process_start()
    try:
        from gradio_client import Client

        rows = time_endpoints(Client(url, verbose=False), demo, args.calls)
    finally:
        app.close()
    checks = cli_checks(args)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n### Demo latency — {demo.vlm.name}, CPU, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} cores, load average {load:.2f}; grounder {demo.grounder_name}\n")
    print("| start-up phase | s |\n|---|---:|")
    for k, v in phases.items():
        print(f"| {k} | {v:.2f} |")
    ok = "yes" if startup <= STARTUP_TARGET_S else "NO"
    print(f"| **process start -> ready (in-process)** | **{startup:.2f}** (target {STARTUP_TARGET_S:.0f} s: {ok}) |")
    if "start" in checks:
        s = checks["start"]
        verdict = ("yes" if s["s"] <= STARTUP_TARGET_S else "NO") if s["ok"] else "FAILED"
        print(f"| `python {s['cmd']}` -> page answers (subprocess) | {s['s']:.2f} ({verdict}) |")
    h = checks["help"]
    print(f"| `python apps/demo.py --help` (rc {h['rc']}) | {h['s']:.2f} |")
    print(f"\n| endpoint | first call ms | median ms (n={args.calls}) | min-max ms | <= {ENDPOINT_TARGET_S:.0f} s? |")
    print("|---|---:|---:|---:|:---:|")
    for r in rows:
        ok = "yes" if r["median_ms"] <= 1000 * ENDPOINT_TARGET_S else "NO"
        print(f"| {r['endpoint']} | {r['first_ms']:.0f} | {r['median_ms']:.0f} | {r['min_ms']:.0f}-{r['max_ms']:.0f}"
              f" | {ok} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": demo.vlm.name, "startup_s": startup, "phases": phases,
                                              "endpoints": rows, "cli": checks, "load_average": load}, indent=1))
    failed = h["rc"] != 0 or ("start" in checks and not checks["start"]["ok"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
