"""Load-memory benchmark: host memory of loading SmolLM2-135M (packaged alias ``smollm2``) through lit-peft.

The issue's goal: "peak RSS above an idle process that has imported the libraries is at most ~1.2x
one copy of the weights in the training dtype". Two measurements, each in fresh processes:

1. Loading, fp32, bf16 and 4-bit (QLoRA r=8, bitsandbytes NF4 on the CPU), ``--repeats`` processes
   each. A process imports torch, transformers, peft, lightning and lit_peft and constructs the task
   (the tokenizer loads there), then resets its peak RSS (writing "5" to /proc/self/clear_refs sets
   VmHWM to the current VmRSS; where that fails, idle is VmHWM so far), reads idle = VmHWM, times
   ``configure_model()`` (``QLoRA.attach`` for 4-bit), and reads peak = VmHWM. Reported: load seconds,
   peak - idle, the backbone's weights as loaded (numel * element_size over parameters and buffers;
   packed 4-bit storage as stored), and (peak - idle) / weights. To explain the figures: RssAnon and
   RssFile sampled every 10 ms during the load (VmHWM has no split; file pages are the mmap-ed
   safetensors), the RSS once every weight has been read, and anonymous RSS after ``malloc_trim(0)``.
2. A 2-process DDP ``lit-peft fit`` on the CPU (configs/lora_gsm8k.yaml, 3 steps, 64 rows): every
   process of the tree (found with psutil) sampled every 0.2 s (VmRSS, RssAnon, and its own VmHWM), giving each
   rank's peak and the peak of the sum, against one fp32 copy of the weights.

Results: ``benchmarks/results/load_memory.{md,json}``.

    python benchmarks/load_memory.py [--repeats 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WAYS = ("fp32", "bf16", "4bit")
MB = 1e6  # MB = 10^6 bytes throughout
FIT = ["fit", "--config", "configs/lora_gsm8k.yaml", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
       "--trainer.strategy", "ddp", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
       "--data.init_args.limit_train_rows", "64", "--data.init_args.data_dir", str(ROOT.parent / "shared/data/gsm8k")]


def status(pid: str | int = "self") -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}


def measure(way: str) -> dict:
    """In a fresh process: idle after imports and the constructor, then the load's time and peak."""
    import ctypes
    import gc
    import resource

    import lightning  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from lit_peft import methods
    from lit_peft.tasks import CausalLM

    task = CausalLM(backbone="smollm2", dtype="bfloat16" if way == "bf16" else "float32")
    gc.collect()
    ru_idle = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    idle = status()
    peaks, done = dict(idle), threading.Event()

    def sample() -> None:  # VmHWM has no anonymous/file split: sample RssAnon and RssFile every 10 ms
        while not done.wait(0.01):
            for k, v in status().items():
                peaks[k] = max(peaks[k], v)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if way == "4bit":
        methods.QLoRA(r=8).attach(task)
    else:
        task.configure_model()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    after = status()
    tensors = [*task.backbone.parameters(), *task.backbone.buffers()]
    with torch.no_grad():  # fault in every weight, as the first training step will (mmap-backed ones count then)
        for t in tensors:
            t.sum()
    touched = status()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap glibc still holds: counted in RSS, not live tensors
    trimmed = status()
    quant_state = [getattr(p, "quant_state", None) for p in task.backbone.parameters()]
    return {"way": way, "load_s": seconds, "hwm_reset": reset, "idle_bytes": idle["VmHWM"], "peak_bytes": after["VmHWM"],
            "idle_anon_bytes": idle["RssAnon"], "idle_file_bytes": idle["RssFile"],
            "sampled_peak_anon_bytes": peaks["RssAnon"], "sampled_peak_file_bytes": peaks["RssFile"],
            "rss_after_bytes": after["VmRSS"], "rss_anon_after_bytes": after["RssAnon"], "rss_file_after_bytes": after["RssFile"],
            "rss_touched_bytes": touched["VmRSS"], "rss_anon_touched_bytes": touched["RssAnon"],
            "rss_file_touched_bytes": touched["RssFile"], "rss_trimmed_bytes": trimmed["VmRSS"],
            "rss_anon_trimmed_bytes": trimmed["RssAnon"],
            "ru_maxrss_idle_bytes": ru_idle, "ru_maxrss_after_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "weight_bytes": sum(t.numel() * t.element_size() for t in tensors),
            "quant_state_bytes": sum(t.numel() * t.element_size() for s in quant_state if s is not None
                                     for t in s.as_dict(packed=True).values() if isinstance(t, torch.Tensor)),
            "params": sum(p.numel() for p in task.backbone.parameters() if not hasattr(p, "quant_state")),
            "weights_dtype": str(task.weights_dtype)}


def ddp_fit(root_dir: str) -> dict:
    """``lit-peft fit`` with 2 DDP processes; every process in the tree sampled every 0.2 s."""
    import psutil

    cmd = [str(Path(sys.executable).parent / "lit-peft"), *FIT, "--trainer.default_root_dir", root_dir]
    log = open(Path(root_dir) / "fit.log", "w")
    start = time.perf_counter()
    main = psutil.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    procs: dict[int, dict] = {}
    peak_sum, training = 0, False
    while main.poll() is None:
        total = 0
        for p in [main, *main.children(recursive=True)]:
            try:
                s = status(p.pid)
                seen = procs.setdefault(p.pid, {"pid": p.pid, "rank": p.environ().get("LOCAL_RANK", "0" if p is main else "?"),
                                                "cmd": " ".join(p.cmdline())[:80], "peak_rss_bytes": 0,
                                                "peak_anon_bytes": 0})
            except (psutil.Error, OSError):
                continue
            seen["peak_rss_bytes"] = max(seen["peak_rss_bytes"], s["VmRSS"])
            seen["peak_anon_bytes"] = max(seen["peak_anon_bytes"], s["RssAnon"])
            seen["vmhwm_bytes"] = s["VmHWM"]  # the process's own peak, last seen
            total += s["VmRSS"]
        peak_sum = max(peak_sum, total)
        if not training and "Total params" in (Path(root_dir) / "fit.log").read_text():
            training = True  # the model summary prints once every rank has built the model and wrapped it in DDP
            for r in procs.values():
                r.update(peak_before_training_bytes=r["peak_rss_bytes"], vmhwm_before_training_bytes=r["vmhwm_bytes"],
                         peak_anon_before_training_bytes=r["peak_anon_bytes"])
            peak_sum_before = peak_sum
        time.sleep(0.2)
    log.close()
    if main.returncode != 0:
        raise RuntimeError((Path(root_dir) / "fit.log").read_text()[-3000:])
    return {"command": "lit-peft " + " ".join(FIT + ["--trainer.default_root_dir", "<tmp>"]), "seconds": time.perf_counter() - start,
            "processes": sorted(procs.values(), key=lambda r: r["rank"]), "peak_sum_rss_bytes": peak_sum,
            "peak_sum_before_training_bytes": peak_sum_before if training else None}


def spread(xs: list[float], fmt: str) -> str:
    return f"{statistics.mean(xs):{fmt}} ({min(xs):{fmt}}–{max(xs):{fmt}})"


def summarise(runs: list[dict], fp32_bytes: int) -> list[dict]:
    rows = []
    for way in WAYS:
        rs = [r for r in runs if r["way"] == way]
        weights = rs[0]["weight_bytes"]
        col = lambda f: [f(r) for r in rs]  # noqa: E731
        rows.append({"way": way, "n": len(rs), "weight_mb": weights / MB, "load_s": col(lambda r: r["load_s"]),
                     "idle_mb": col(lambda r: r["idle_bytes"] / MB), "extra_mb": col(lambda r: (r["peak_bytes"] - r["idle_bytes"]) / MB),
                     "ratio": col(lambda r: (r["peak_bytes"] - r["idle_bytes"]) / weights),
                     "ratio_fp32": col(lambda r: (r["peak_bytes"] - r["idle_bytes"]) / fp32_bytes),
                     "anon_extra_mb": col(lambda r: (r["sampled_peak_anon_bytes"] - r["idle_anon_bytes"]) / MB),
                     "file_extra_mb": col(lambda r: (r["sampled_peak_file_bytes"] - r["idle_file_bytes"]) / MB),
                     "anon_ratio": col(lambda r: (r["sampled_peak_anon_bytes"] - r["idle_anon_bytes"]) / weights),
                     "touched_extra_mb": col(lambda r: (r["rss_touched_bytes"] - r["idle_bytes"]) / MB),
                     "touched_ratio": col(lambda r: (r["rss_touched_bytes"] - r["idle_bytes"]) / weights),
                     "trimmed_anon_extra_mb": col(lambda r: (r["rss_anon_trimmed_bytes"] - r["idle_anon_bytes"]) / MB)})
    return rows


def tables(rows: list[dict], fit: dict, fp32_bytes: int, idle_mb: float) -> str:
    lines = ["| load | load s | idle MB | peak − idle MB | weights MB (as loaded) | **(peak − idle) / weights** | (peak − idle) / fp32 weights |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['way']} | {spread(r['load_s'], '.2f')} | {spread(r['idle_mb'], '.0f')} | {spread(r['extra_mb'], '.0f')} | "
                     f"{r['weight_mb']:.1f} | **{spread(r['ratio'], '.2f')}** | {spread(r['ratio_fp32'], '.2f')} |")
    lines += ["", "The same loads split (RssAnon / RssFile sampled every 10 ms during the load, each over its idle value), "
              "the RSS once every weight has been read (`t.sum()` over parameters and buffers), and the anonymous RSS "
              "after `malloc_trim(0)` (glibc hands freed heap back), over idle:", "",
              "| load | peak anon − idle MB | peak file − idle MB | (peak anon − idle) / weights | RSS after reading the weights − idle MB "
              "| that / weights | anon after malloc_trim − idle MB |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['way']} | {spread(r['anon_extra_mb'], '.0f')} | {spread(r['file_extra_mb'], '.0f')} | "
                     f"{spread(r['anon_ratio'], '.2f')} | {spread(r['touched_extra_mb'], '.0f')} | {spread(r['touched_ratio'], '.2f')} | "
                     f"{spread(r['trimmed_anon_extra_mb'], '.0f')} |")
    if not fit["processes"]:
        return "\n".join(lines)
    over = lambda mb, n: (mb - n * idle_mb) / (fp32_bytes / MB)  # noqa: E731
    lines += ["", f"DDP fit, 2 processes ({fit['seconds']:.0f} s); one fp32 copy of the weights = {fp32_bytes / MB:.0f} MB; "
              f"idle (imports + task, from the loads above) ≈ {idle_mb:.0f} MB a process.", "",
              "Before training = the peak up to the moment the model summary prints (every rank has built the model and "
              "wrapped it in DDP); whole run = up to the end of the 3 steps.", "",
              "| process | peak RSS before training MB (VmHWM; sum: sampled) | (that − idle) / fp32 weights | peak RSS whole run MB (sampled 0.2 s) | "
              "VmHWM MB | peak anon MB | VmHWM / fp32 weights | (VmHWM − idle) / fp32 weights |",
              "|---|---|---|---|---|---|---|---|"]
    for p in fit["processes"]:
        hwm = p.get("vmhwm_bytes", p["peak_rss_bytes"])
        before = p.get("vmhwm_before_training_bytes", 0) / MB
        lines.append(f"| rank {p['rank']} (pid {p['pid']}) | {before:.0f} | {over(before, 1):.2f} | {p['peak_rss_bytes'] / MB:.0f} | "
                     f"{hwm / MB:.0f} | {p['peak_anon_bytes'] / MB:.0f} | {hwm / fp32_bytes:.2f} | {over(hwm / MB, 1):.2f} |")
    n, total, before = len(fit["processes"]), fit["peak_sum_rss_bytes"] / MB, (fit["peak_sum_before_training_bytes"] or 0) / MB
    lines.append(f"| sum (peak of the sampled sum; over {n} idles) | {before:.0f} | {over(before, n):.2f} | {total:.0f} | | | "
                 f"{total / (fp32_bytes / MB):.2f} | {over(total, n):.2f} |")
    return "\n".join(lines)


def machine() -> str:
    info = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines() if ":" in line)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return f"{info.get('Model name', '?').strip()}, nproc {nproc}, {mem:.0f} GiB RAM, {sys.platform}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--skip_fit", action="store_true", help="only the loading measurements")
    parser.add_argument("--one", choices=WAYS, help=argparse.SUPPRESS)  # internal: measure one load in this process
    args = parser.parse_args()
    if args.one:
        print("MEASURED " + json.dumps(measure(args.one)))
        return
    runs = []
    for i in range(args.repeats):
        for way in WAYS:  # interleaved, so drift in the machine spreads over all three
            out = subprocess.run([sys.executable, __file__, "--one", way], check=True, capture_output=True, text=True, cwd=ROOT).stdout
            runs.append(json.loads(next(line for line in out.splitlines() if line.startswith("MEASURED "))[9:]))
            print(f"repeat {i} {way}: load {runs[-1]['load_s']:.2f} s, peak - idle "
                  f"{(runs[-1]['peak_bytes'] - runs[-1]['idle_bytes']) / MB:.0f} MB", flush=True)
    fp32_bytes = next(r["weight_bytes"] for r in runs if r["way"] == "fp32")
    rows = summarise(runs, fp32_bytes)
    idle_mb = statistics.mean(r["idle_bytes"] / MB for r in runs)
    if args.skip_fit:
        fit = {"command": None, "seconds": 0, "processes": [], "peak_sum_rss_bytes": 0}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            fit = ddp_fit(tmp)
    text = tables(rows, fit, fp32_bytes, idle_mb)
    print(text)
    command = "python benchmarks/load_memory.py " + " ".join(sys.argv[1:])
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load_memory.json").write_text(json.dumps({"command": command, "date": when, "machine": machine(),
                                                      "fp32_weight_bytes": fp32_bytes, "summary": rows, "runs": runs,
                                                      "ddp_fit": fit}, indent=1) + "\n")
    reset = all(r["hwm_reset"] for r in runs)
    (out / "load_memory.md").write_text(
        f"# Host memory of loading SmolLM2-135M through lit-peft\n\n`{command.strip()}` — {when}; {machine()}.\n\n"
        "Goal (the issue): peak RSS above an idle process that has imported the libraries is at most ~1.2x one copy "
        "of the weights in the training dtype.\n\n"
        f"Each load in its own process, {args.repeats} processes a way, mean (min–max). Idle = VmHWM after importing "
        "torch, transformers, peft, lightning, lit_peft and constructing the task (tokenizer included), "
        + ("then reset to the current VmRSS by writing 5 to /proc/self/clear_refs; " if reset else "not reset (clear_refs failed); ")
        + "peak = VmHWM after `configure_model()` (4-bit: `QLoRA(r=8).attach`). Weights: numel × element_size over the "
        "backbone's parameters and buffers (4-bit: packed uint8 storage, quantization state not included). "
        "MB = 10^6 bytes. RssFile is page cache of the memory-mapped model.safetensors (the cached checkpoint holds "
        "fp32): it counts in RSS and VmHWM while mapped, though the kernel can drop it; RssAnon is memory the process "
        "owns. The DDP run's whole-run peak includes the activations of the training steps (batch 4, up to 384 "
        "tokens, a 49,152-token vocabulary), so its load figure is the one before training.\n\n"
        f"{text}\n\nDDP command: `{fit['command']}`\n")


if __name__ == "__main__":
    main()
