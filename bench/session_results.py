"""bench/gpu-session's records: JSON lines as measured, the results file, and the markdown tables.

Why this exists: the device run may be cut off at any moment, so every figure is appended to a
JSON-lines file the moment it is measured (flushed and synced), and everything after that is
done here, on this machine, from the lines that came back: `assemble` builds the results file
(`bench/results/<date>-<gpu>.json`, the shape issue 17 gives), `report` prints the markdown
tables docs/benchmarks.md takes, and `decisions` says what each figure means for a default.
Pure standard library (the cost table aside), so the parent process on the device stays light.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path
from typing import Any

LINES = "session.jsonl"
GPU_STAGES = ("text_encode", "vae_encode", "denoise", "decode")
RUN_KEYS = ("variant", "megapixels", "num_images", "attention_backend", "precision", "compile", "stages_ms",
            "job_ms", "outside_gpu_ms", "peak_gpu_bytes")
TARGETS_MS = {"bf16 whole job, 1 MP": 1200.0, "best configuration, 1 MP": 900.0}
OUTSIDE_TARGET = 0.05  # time outside the GPU stages, as a share of the job
GB = 1e9


def emit(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and push it to the disk at once (a killed run keeps every line written)."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records in a JSON-lines file, and how many lines could not be read (a line cut by a kill)."""
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    return records, bad


def assemble(folder: Path) -> dict[str, Any]:
    """The results file's content from `folder`/session.jsonl."""
    records, bad = read(folder / LINES)
    kinds: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        kinds.setdefault(record.get("kind", "?"), []).append(record)
    env = {k: v for r in kinds.get("env", []) for k, v in r.items()}  # written in parts, each as measured
    session = (kinds.get("session") or [{}])[0]
    deviation = {r["precision"]: {k: v for k, v in r.items() if k not in ("kind", "step", "precision")}
                 for r in kinds.get("deviation", [])}
    return {
        "gpu": env.get("gpu"), "date": env.get("date") or session.get("date"), "torch": env.get("torch"),
        "driver": env.get("driver"), "cuda": env.get("cuda"), "measured_on_gpu": bool(env.get("gpu")),
        "weights": session.get("weights"), "command": session.get("command"),
        "peak_bf16_tflops": env.get("peak_bf16_tflops"), "packages": env.get("packages"),
        "steps": kinds.get("step", []),
        "runs": [{k: r.get(k) for k in RUN_KEYS} | {k: v for k, v in r.items() if k not in RUN_KEYS and k != "kind"}
                 for r in kinds.get("run", [])],
        "attention": kinds.get("attention", []), "attention_calls": kinds.get("attention_call", []),
        "deviation": deviation, "compile": (kinds.get("compile") or [None])[-1],
        "cold_start": {k: v for r in kinds.get("cold_start", []) for k, v in r.items() if k not in ("kind", "step")},
        "profile": (kinds.get("profile") or [None])[-1],
        "skipped": kinds.get("skipped", []), "errors": kinds.get("error", []), "unreadable_lines": bad,
    }


def results_path(results: dict[str, Any], root: Path) -> Path:
    """bench/results/<YYYY-MM-DD>-<gpu>.json (the gpu slugged; `cpu-tiny` when no GPU measured)."""
    gpu = results.get("gpu") or "cpu-tiny"
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower().removeprefix("nvidia ")).strip("-")
    return root / f"{results.get('date') or 'undated'}-{slug}.json"


def _ms(value: Any) -> str:
    return "" if value is None else f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}"


def _gb(value: Any) -> str:
    return "" if value is None else f"{value / GB:.1f}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    def cell(value: Any) -> str:
        return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")

    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def warm(results: dict[str, Any], step: str = "warm_jobs", **match: Any) -> list[dict[str, Any]]:
    """The repeated (not first) successful runs of `step` whose fields equal `match`."""
    return [r for r in results["runs"] if r.get("step") == step and not r.get("first") and r.get("outcome") == "ok"
            and all(r.get(k) == v for k, v in match.items())]


def report(results: dict[str, Any]) -> str:
    """The markdown for docs/benchmarks.md's GPU section."""
    gpu = results.get("gpu")
    head = [f"Command: `{results.get('command')}`; weights: {results.get('weights')}; date {results.get('date')}."]
    if gpu:
        head.insert(0, f"**Measured** on {gpu} (driver {results.get('driver')}, torch {results.get('torch')}), "
                       f"measured bf16 matmul peak {results.get('peak_bf16_tflops')} TFLOP/s.")
    else:
        head.insert(0, "**Tiny model on a CPU: a check of the wiring, not a GPU measurement; no figure below is "
                       "a GPU figure.**")
    out = head + ["", "Steps (budget, seconds taken, outcome):", ""]
    out += _table(["step", "budget s", "took s", "status"],
                  [[s["step"], s.get("budget_s"), s.get("seconds"), s["status"]] for s in results["steps"]])
    rows = []
    for r in [r for r in results["runs"] if r.get("step") in ("warm_jobs", "memory_24gb", "compile")]:
        stages = r.get("stages_ms") or {}
        share = (r["outside_gpu_ms"] / r["job_ms"]) if r.get("job_ms") and r.get("outside_gpu_ms") is not None else None
        rows.append([r["step"], r.get("megapixels"), r.get("num_images"), r.get("precision"), r.get("compile"),
                     r.get("attention_backend"), r.get("offload"), "first" if r.get("first") else "warm",
                     *(_ms(stages.get(s)) for s in ("inputs", *GPU_STAGES, "outputs")), _ms(r.get("ms_per_step")),
                     _ms(r.get("job_ms")), "" if share is None else f"{100 * share:.1f}%", _gb(r.get("peak_gpu_bytes")),
                     r.get("outcome")])
    out += ["", "Whole jobs through `Worker.handle` (PNG, base64; ms unless marked):", ""]
    out += _table(["step", "MP", "images", "precision", "compile", "attention", "offload", "job", "inputs",
                   "text encode", "VAE encode", "denoise", "decode", "outputs", "per step", "job ms",
                   "outside GPU", "peak GB", "outcome"], rows)
    if results["attention"]:
        peak = results.get("peak_bf16_tflops")

        def share(tflops: Any) -> str:
            return f"{100 * tflops / peak:.0f}%" if tflops and peak else ""

        out += ["", f"Attention backends (1 MP, edit-2511): per transformer step and per attention call, against the "
                    f"measured bf16 peak ({peak} TFLOP/s):", ""]
        out += _table(["backend", "ms per step", "step TFLOP/s", "of peak", "call ms", "call TFLOP/s", "of peak",
                       "unusable because"],
                      [[a["backend"], _ms(a.get("ms_per_step")), a.get("step_tflops"), share(a.get("step_tflops")),
                        a.get("call_ms"), a.get("call_tflops"), share(a.get("call_tflops")), a.get("unusable", "")]
                       for a in results["attention"]])
    if results["deviation"]:
        out += ["", "Precision (1 MP, same inputs and seed; relative L2 against bf16):", ""]
        out += _table(["precision", "ms per step", "peak GB", "first step rel L2 %", "pixels rel L2 %", "note"],
                      [[p, _ms(d.get("ms_per_step")), _gb(d.get("peak_gpu_bytes")), d.get("step_rel_l2_pct"),
                        d.get("pixels_rel_l2_pct"), d.get("note", "")] for p, d in results["deviation"].items()])
    if results.get("compile"):
        c = results["compile"]
        out += ["", f"COMPILE=regional: compile and warm-up at load {c.get('compile_s')} s; per step "
                    f"{_ms(c.get('ms_per_step'))} ms (off: {_ms(c.get('off_ms_per_step'))} ms); first job at a new "
                    f"size {_ms(c.get('new_size_job_ms'))} ms."]
    if results.get("cold_start"):
        c = results["cold_start"]
        out += ["", f"Cold start (the worker's loader, a saved real-shaped folder of {c.get('folder_gb')} GB, page "
                    f"cache {c.get('page_cache')}): save {c.get('save_s')} s, load {c.get('load_s')} s "
                    f"({c.get('read_gb_s')} GB/s), first job {_ms(c.get('first_job_ms'))} ms."]
    if results.get("profile"):
        out += ["", "Profile of one warm 1 MP bf16 job (top operators by self device time):", ""]
        out += _table(["operator", "calls", "self device ms", "self CPU ms"],
                      [[o["name"], o["calls"], o["self_device_ms"], o["self_cpu_ms"]]
                       for o in results["profile"]["top"]])
    out += ["", "What these figures decide:", ""] + [f"- {line}" for line in decisions(results)]
    return "\n".join(out) + "\n"


def decisions(results: dict[str, Any]) -> list[str]:
    """Each default and the figure that decides it, as read from these results."""
    lines = []
    bf16 = _median(warm(results, megapixels=1.0, precision="bf16"), "job_ms")
    if bf16 is not None:
        runs = warm(results, megapixels=1.0, precision="bf16")
        outside = _median(runs, "outside_gpu_ms")
        lines.append(f"targets: warm 1 MP bf16 job {bf16:.0f} ms (target < {TARGETS_MS['bf16 whole job, 1 MP']:.0f}: "
                     f"{'met' if bf16 < 1200 else 'not met'}); outside the GPU stages {outside:.0f} ms = "
                     f"{100 * outside / bf16:.1f}% (target < {100 * OUTSIDE_TARGET:.0f}%)")
        from qwen_edit_worker.accounting.cost import table_price

        for name in ("H100", "H200"):
            price = table_price(name)
            how = "measured" if results.get("gpu") and name in results["gpu"] else "this run's seconds at its price"
            lines.append(f"cost {name}: {bf16 / 1000:.2f} s x {price} USD/s = {bf16 / 1000 * price:.5f} USD per "
                         f"image ({how if results.get('gpu') else 'not a GPU figure'})")
    steps = {p: d.get("ms_per_step") for p, d in results["deviation"].items() if d.get("ms_per_step")}
    if steps:
        best = min(steps, key=steps.__getitem__)
        lines.append(f"PRECISION: fastest per step {best} ({', '.join(f'{p} {v:.0f} ms' for p, v in steps.items())});"
                     " the default moves off bf16 only if that saves at least 10% a step and the deviation on the "
                     "real weights (bench/gpu --deviation --model-path) is small: random weights cannot show quality")
    if results.get("compile") and results["compile"].get("ms_per_step") and results["compile"].get("off_ms_per_step"):
        c = results["compile"]
        saving = 1 - c["ms_per_step"] / c["off_ms_per_step"]
        lines.append(f"COMPILE: regional saves {100 * saving:.0f}% a step for {c.get('compile_s')} s more at load; "
                     "the default becomes regional only if it saves at least 10% a step and the load stays well under "
                     "RunPod's 7-minute start limit")
    if results["attention"]:
        best = min(results["attention"], key=lambda a: a.get("ms_per_step") or float("inf"))
        auto = next((r.get("attention_backend") for r in warm(results)), None)
        lines.append(f"attention: fastest per step {best['backend']}; ATTENTION_BACKEND=auto chose {auto} "
                     "(auto stays the default while its pick is within 2% of the fastest step)")
    peaks = [(r["peak_gpu_bytes"] - r["resident_gpu_bytes"], r) for r in results["runs"]
             if r.get("peak_gpu_bytes") and r.get("resident_gpu_bytes") is not None and r.get("outcome") == "ok"]
    for activation, run in sorted(peaks, key=lambda p: p[0], reverse=True)[:3]:
        derived = _derived_activation_bytes(run)
        ratio = f", {activation / derived:.2f}x the derived {derived / GB:.1f} GB" if derived else ""
        lines.append(f"placement: {activation / GB:.1f} GB of activations over the resident weights "
                     f"({run.get('megapixels')} MP, {run.get('num_images')} images, {run.get('precision')}, "
                     f"{run.get('step')}){ratio}; placement/activations.py's per-token and per-pixel constants "
                     "follow the measured figures")
    return lines or ["nothing measured that decides a default"]


def _derived_activation_bytes(run: dict[str, Any]) -> int | None:
    """The placement's activation estimate for the run's job (one picture in), for the measured ratio: the
    larger of the denoising phase and the decode (phases run one after the other), the VAE as the run had it."""
    from qwen_edit_worker.placement import activations

    if not run.get("megapixels") or not run.get("num_images"):
        return None
    job = activations.JobShape.one_image(float(run["megapixels"]))
    images, tiled = int(run["num_images"]), bool(run.get("vae_tiled"))
    return max(activations.transformer_bytes(job, images, run.get("precision") or "bf16"),
               activations.vae_bytes(job, 1 if tiled else images, tiled=tiled))
