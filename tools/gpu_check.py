"""The prepared GPU check: the figures and the GPU-only tests a first GPU session needs, in one run of ~11 min.

    tools/gpu_check.sh --out runs/gpu-check [--authors .authors/dbot/models_mae.py]   # on the GPU host
    python -m tools.gpu_check --dry-run --out /tmp/gpu-check                           # anywhere, minutes

Steps, in order of importance, each a subprocess with its own time limit inside an overall budget
(`--budget-s`, default 660 s: with the machine's start-up, 15 minutes of GPU time), so one failure (an
out-of-memory, a compile error) does not lose the others; a step the budget no longer covers is listed as skipped:

1. `gpu_tests`: tests/test_gpu_twins.py with `--device cuda`: fp16 + GradScaler (skip, back-off, unscaled
   clipping, resume), fused AdamW, the Meter under real CUDA-graph replays, the CUDA RNG state, nvJPEG on CMYK /
   progressive / grey / truncated JPEGs;
2. `side_by_side`: the ViT-B step of the base recipe, the authors' released step (their fp16 autocast +
   GradScaler) vs ours eager vs ours compiled, interleaved in one process (`tools.bench pretrain --authors`);
3. `jpegs`: 500 x 375 quality-90 photo-like JPEGs (`tools.datasets jpegs`), then `decode_gpu`: the `gpu` input
   pipeline alone (images/s, per core, per GPU);
4. `pretrain_run`: a real `python -m pretrain` run of about 100 steps (2 stages) on the JPEGs, data.backend=gpu,
   compile=reduce-overhead (CUDA graphs);
5. `mfu_large`, `mfu_huge`: compiled ViT-L and ViT-H steps of stage 1 (their recipes' first teacher has depth 0;
   the bootstrapped stage distils from the full encoder) with counted FLOPs; ViT-B's is in step 2;
6. `study_gpu`: `make study SCALE=gpu` (`tools.study targets --scale gpu`), seed 0 (the second seed is a rerun
   into the same folder: the study reuses finished runs);
7. if the budget allows: `decode_uint8`, `decode_pil` (the other backends) and `end_to_end` (ViT-B steps fed
   from the JPEGs through data.backend=gpu).

Everything goes to `<out>/gpu_check.json` and a Markdown summary `<out>/gpu_check.md`, including the
targets with pass/fail (`targets`: ViT-B compiled >= 40% MFU on an H100/H200 and >= 1.5x the authors' fp16 step;
the gpu backend >= 5,000 images/s, with the host's CPU cores), and what could not be done and why (no CUDA, no
authors' file, a step over the budget, a failure with its last lines). No network is needed: the authors'
`models_mae.py` is given by path (`--authors`, default `.authors/dbot/models_mae.py` when present;
docs/BENCHMARKS.md says how to carry it). `--dry-run` runs every step but the study at toy size on whatever
device there is (tiny recipe, a few images), which is how the tests exercise this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_AUTHORS = REPO / ".authors" / "dbot" / "models_mae.py"
DRY_LIMIT = 240  # s per step in a dry run: toy sizes, but a loaded shared CPU


def plan_steps(args, cuda: bool) -> list[dict]:
    """The steps: name, command (python -m ...), time limit (s), and what it needs."""
    py = [sys.executable, "-m"]
    jpegs = Path(args.out) / "jpegs"
    dry = args.dry_run
    model, big = ("tiny", "tiny") if dry else ("base", None)
    device = [] if cuda else ["device=cpu"]
    timing = ["--steps", "1", "--warmup", "0", "--rounds", "1"] if dry else ["--steps", "10", "--warmup", "3"]
    compile_flag = ["--compile"] if cuda else []  # CPU compile of the dry run would only add minutes
    authors = ["--authors", str(args.authors)] if args.authors else []
    batch = "8" if dry else "128"
    loader_batch = "8" if dry else "256"
    n_images = 24 if dry else 2000
    workers = "0" if dry else str(min(os.cpu_count() or 1, 16))
    steps = [
        dict(
            name="gpu_tests",
            what="tests/test_gpu_twins.py on the device: fp16 scaler, fused AdamW, CUDA graphs, RNG, nvJPEG",
            cmd=[*py, "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu_twins.py"]
            + ["--device", "cuda" if cuda else "cpu"],
            limit=DRY_LIMIT if dry else 75,
            parse="pytest",
        ),
        dict(
            name="side_by_side",
            what=f"{model} step: authors (fp16 + GradScaler) vs ours eager vs ours compiled, interleaved",
            cmd=[
                *py,
                "tools.bench",
                "pretrain",
                "-c",
                model,
                *device,
                "--batch",
                batch,
                *timing,
                *compile_flag,
                *authors,
            ],
            limit=DRY_LIMIT if dry else 150,
        ),
    ]
    for size, b, limit in (("large", "128", 90), ("huge", "64", 110)):
        steps.append(
            dict(
                name=f"mfu_{size}",
                what=f"ViT-{size[0].upper()} step of stage 1 (full-depth bootstrapped teacher), compiled: FLOPs, MFU",
                cmd=[*py, "tools.bench", "pretrain", "-c", big or size, *device, "--batch", "4" if dry else b]
                + ["--steps", "1" if dry else "8", "--warmup", "0" if dry else "2", "--stage", "1", *compile_flag],
                limit=DRY_LIMIT if dry else limit,
            )
        )
    steps.append(
        dict(
            name="jpegs",
            what=f"{n_images} photo-like 500x375 quality-90 JPEGs",
            cmd=[*py, "tools.datasets", "jpegs", "--out", str(jpegs), "--images", str(n_images)]
            + ["--classes", "4" if dry else "10", "--workers", "1" if dry else str(os.cpu_count() or 1)],
            limit=DRY_LIMIT if dry else 60,
        )
    )
    loader = ["-c", model, *device, f"data.root={jpegs}", "--batch", loader_batch]
    loader += ["--steps", "2" if dry else "12", "--warmup", "1" if dry else "2"]
    for backend, w in (("gpu", "0" if dry else "8"), ("uint8", workers), ("pil", workers)):
        steps.append(
            dict(
                name=f"decode_{backend}",
                what=f"input pipeline alone, data.backend={backend}, {w} workers",
                cmd=[*py, "tools.bench", "loader", *loader, f"data.backend={backend}", f"data.workers={w}"],
                limit=DRY_LIMIT if dry else 60,
                needs="jpegs",
            )
        )
    steps.append(
        dict(
            name="end_to_end",
            what=f"{model} steps on the JPEGs through data.backend=gpu",
            cmd=[*py, "tools.bench", "pretrain", "-c", model, *device, f"data.root={jpegs}", "data.backend=gpu"]
            + ["data.workers=" + ("0" if dry else "8"), "--batch", batch, "--end-to-end"]
            + ["--steps", "2" if dry else "20", "--warmup", "1" if dry else "3", "--rounds", "1"],
            limit=DRY_LIMIT if dry else 90,
            needs="jpegs",
        )
    )
    # ~100 optimizer steps: 2000 images / 128 = 15 batches an epoch, 2 stages of 3 and 4 epochs = 105 steps
    epochs = "[0,1,2]" if dry else "[0,3,7]"
    graphs = ["compile=reduce-overhead"] if cuda else []  # CUDA graphs; a CPU compile would only add minutes
    steps.append(
        dict(
            name="pretrain_run",
            what=f"python -m pretrain -c {model}, ~100 steps in 2 stages on the JPEGs, data.backend=gpu"
            + (", compile=reduce-overhead" if cuda else ""),
            cmd=[*py, "pretrain", "-c", model, *device, f"data.root={jpegs}", f"out={Path(args.out) / 'pretrain'}"]
            + [f"stages.epochs={epochs}", f"data.batch_per_gpu={batch}", f"optim.global_batch={batch}"]
            + ["optim.warmup_epochs=1", "data.backend=gpu", "data.workers=" + ("0" if dry else "8"), *graphs]
            + ["log.every=5", "log.tensorboard=false", "resume=none", "probe.every=null"],  # unlabeled JPEGs
            limit=DRY_LIMIT if dry else 120,
            needs="jpegs",
        )
    )
    steps.append(
        dict(
            name="study_gpu",
            what="make study SCALE=gpu (ViT-S/8 at 64 px, claims (a)-(c)), seed 0",
            cmd=[*py, "tools.study", "targets", "--scale", "gpu", "--out", str(Path(args.out) / "study-gpu")]
            + ["--device", "cuda", "--data-workers", str(min(os.cpu_count() or 1, 16)), "--seeds", "0"],
            limit=300,
            skip="dry run: the study is tested at a tiny size by tests/test_study.py" if dry else None,
        )
    )
    order = ["gpu_tests", "side_by_side", "jpegs", "decode_gpu", "pretrain_run", "mfu_large", "mfu_huge"]
    order += ["study_gpu", "decode_uint8", "decode_pil", "end_to_end"]
    return sorted(steps, key=lambda step: order.index(step["name"]))


def last_json(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def run_step(step: dict, remaining: float) -> dict:
    rec = {"name": step["name"], "what": step["what"], "command": " ".join(step["cmd"][2:])}
    limit = min(step["limit"], remaining)
    if limit < min(20, step["limit"]):
        return {
            **rec,
            "status": f"skipped: {remaining:.0f} s of the budget left, the step needs up to {step['limit']} s",
        }
    t0 = time.time()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run(step["cmd"], cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-1500:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {
            **rec,
            "status": f"failed: over its {limit:.0f} s limit",
            "seconds": round(time.time() - t0, 1),
            "stderr_tail": tail,
        }
    rec["seconds"] = round(time.time() - t0, 1)
    if step.get("parse") == "pytest":
        rec["result"] = pytest_summary(proc.stdout)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or [""])[-1][:300]
        tails = {"stderr_tail": proc.stderr[-1500:], "stdout_tail": proc.stdout[-3000:]}
        return {**rec, "status": f"failed: exit {proc.returncode}: {last}", **tails}
    rec["status"] = "done"
    if step.get("parse") == "pytest":
        return rec
    rec["result"] = last_json(proc.stdout)
    if rec["result"] is None:
        rec["stdout_tail"] = proc.stdout[-800:]
    return rec


def pytest_summary(text: str) -> dict:
    """Counts of pytest's last summary line ('3 passed, 1 skipped in 9.1s') and the failing tests' names."""
    import re

    lines = [x for x in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", x)]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", lines[-1] if lines else "")}
    failed = [x.split(" ", 1)[1].split(" - ")[0] for x in text.splitlines() if x.startswith(("FAILED ", "ERROR "))]
    return {"tests_" + k: v for k, v in counts.items()} | ({"failed_tests": failed} if failed else {})


# The targets on a GPU (benchmarks, not tests): (name, step, result key, threshold, what, needs H100/H200)
TARGETS = [
    ("vit_b_compiled_mfu", "side_by_side", "ours_compiled_mfu", 0.40, "ViT-B dBOT step compiled: MFU", True),
    ("vit_b_compiled_vs_authors", "side_by_side", "ours_compiled_vs_authors", 1.5,
     "ViT-B compiled step / the authors' fp16 step, same run (x)", False),
    ("gpu_backend_images_per_s", "decode_gpu", "images_per_s", 5000.0,
     "data.backend=gpu: decoded + augmented 224 px images/s", False),
]  # fmt: skip


def check_targets(report: dict) -> list[dict]:
    """Each target with its measured value and pass (True / False), or pass None and why it is not judged."""
    env = report["environment"]
    results = {s["name"]: s.get("result") or {} for s in report["steps"]}
    h100 = any(k in env["device"] for k in ("H100", "H200"))
    out = []
    for name, step, key, threshold, what, needs_hopper in TARGETS:
        value = results.get(step, {}).get(key)
        rec = {"name": name, "what": what, "target": f">= {threshold:g}", "measured": value, "step": step}
        if step == "decode_gpu":
            rec["host_cpu_cores"] = env["cpus"]
        why = None
        if report["dry_run"]:
            why = "dry run"
        elif not env["cuda"]:
            why = "no CUDA device"
        elif needs_hopper and not h100:
            why = f"the target is for an H100/H200; this is {env['device']}"
        elif value is None:
            why = f"{step} gave no {key}"
        rec["pass"] = None if why else bool(value >= threshold)
        if why:
            rec["not_judged"] = why
        out.append(rec)
    return out


def pretrain_summary(out: Path) -> dict:
    """Per-stage losses, steps and images/s of the pretraining run, from its metrics.jsonl / results.json."""
    res = {}
    metrics = out / "pretrain" / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "loss" in r]
        if rows:
            res["optimizer_steps"] = rows[-1].get("step")
            rates = [r["images_per_s"] for r in rows[1:] if "images_per_s" in r]  # the first includes start-up
            res["images_per_s_median"] = round(sorted(rates)[len(rates) // 2], 1) if rates else None
    results = out / "pretrain" / "results.json"
    if results.is_file():
        res["stage_final_loss"] = json.loads(results.read_text()).get("stage_final_loss")
    return res


def environment() -> dict:
    import torch
    import torchvision

    cuda = torch.cuda.is_available()
    env = {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cpus": os.cpu_count(),
        "cuda": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else f"{platform.machine()} CPU",
    }
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        env["timm"] = None
    try:
        from pretrain import train

        env["pretrain_loop_uses_pretrain_datapath"] = hasattr(train, "datapath") or "pretrain_data" in vars(train)
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        env["pretrain_loop_uses_pretrain_datapath"] = f"import failed: {e}"
    return env


def not_done(report: dict) -> list[str]:
    """What this run could not do, in words."""
    out = []
    env = report["environment"]
    if not env["cuda"]:
        out.append("no CUDA device: every figure is a CPU figure; GPU throughput, MFU and GPU decoding not measured")
    if not report["authors"]:
        out.append("no --authors models_mae.py (and none at .authors/dbot/): the authors' step was not timed")
    if report["dry_run"]:
        out.append("--dry-run: toy sizes (tiny recipe, a few images); no figure here is a benchmark")
    if env.get("pretrain_loop_uses_pretrain_datapath") is not True:
        out.append(
            "pretrain/train.py does not build its loader with pretrain.datapath yet: pretrain_run ignored "
            "data.backend=gpu and read the images through the reference PIL path"
        )
    for s in report["steps"]:
        if s["status"] != "done":
            out.append(f"{s['name']}: {s['status']}")
    return out


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# GPU check",
        "",
        f"{env['device']} on {env['host']}; torch {env['torch']}, torchvision {env['torchvision']}, "
        f"timm {env['timm']}, Python {env['python']}, {env['cpus']} CPUs. "
        f"Wall {report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget"
        + (" (dry run)" if report["dry_run"] else "")
        + ".",
        "",
        "| step | status | s | figures | command |",
        "|---|---|---|---|---|",
    ]
    for s in report["steps"]:
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', '-')} | {figures(s)} | `{s['command']}` |")
    if report.get("pretrain_run"):
        lines += ["", f"pretraining run: {json.dumps(report['pretrain_run'])}"]
    lines += ["", "## Targets", "", "| target | what | wanted | measured | pass |", "|---|---|---|---|---|"]
    for t in report.get("targets", []):
        verdict = {True: "pass", False: "FAIL", None: f"not judged: {t.get('not_judged')}"}[t["pass"]]
        cores = f" ({t['host_cpu_cores']} CPU cores)" if "host_cpu_cores" in t else ""
        lines.append(f"| {t['name']} | {t['what']}{cores} | {t['target']} | {t['measured']} | {verdict} |")
    lines += ["", "## Not done", ""] + [f"- {x}" for x in report["not_done"] or ["nothing"]]
    return "\n".join(lines) + "\n"


def figures(step: dict) -> str:
    r = step.get("result") or {}
    keys = [
        k
        for k in r
        if k.endswith(
            ("images_per_s", "_mfu", "_vs_authors", "gflop_per_image", "per_core_s", "cpu_ms_per_image", "per_gpu_s")
            + ("_passed", "_failed", "_skipped", "_error", "_errors")
        )
    ]
    return ", ".join(f"{k} {r[k]}" for k in keys if r[k] is not None) or "-"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/gpu-check")
    p.add_argument("--authors", default=None, help="the authors' models_mae.py (default: .authors/dbot/ if present)")
    p.add_argument("--budget-s", type=float, default=660.0, help="overall wall-time budget in seconds")
    p.add_argument("--dry-run", action="store_true", help="toy sizes on any device (the tests run this)")
    p.add_argument("--only", nargs="*", default=None, help="run only these steps (names as in the summary)")
    args = p.parse_args(argv)
    if args.authors is None and DEFAULT_AUTHORS.is_file():
        args.authors = str(DEFAULT_AUTHORS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    env = environment()
    report = {"environment": env, "dry_run": args.dry_run, "budget_s": args.budget_s, "authors": args.authors}
    done: set[str] = set()
    records = []
    for step in plan_steps(args, env["cuda"]):
        if args.only is not None and step["name"] not in args.only:
            continue
        if step.get("skip"):
            records.append(
                {
                    "name": step["name"],
                    "what": step["what"],
                    "command": " ".join(step["cmd"][2:]),
                    "status": f"skipped: {step['skip']}",
                }
            )
            continue
        need = step.get("needs")
        have_jpegs = any((out / "jpegs" / "train").glob("*/*.JPEG"))  # from this run or an earlier one
        if need and need not in done and not (need == "jpegs" and have_jpegs):
            status = f"skipped: {need} did not run"
            records.append(
                {"name": step["name"], "what": step["what"], "command": " ".join(step["cmd"][2:]), "status": status}
            )
            continue
        rec = run_step(step, args.budget_s - (time.time() - t0))
        records.append(rec)
        print(f"[gpu_check] {rec['name']}: {rec['status']} ({rec.get('seconds', 0)} s) {figures(rec)}", flush=True)
        if rec["status"] == "done":
            done.add(step["name"])
    report["steps"] = records
    if "pretrain_run" in done:
        report["pretrain_run"] = pretrain_summary(out)
    report["wall_s"] = round(time.time() - t0, 1)
    report["targets"] = check_targets(report)
    report["not_done"] = not_done(report)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))
    print(f"[gpu_check] wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {report['wall_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
