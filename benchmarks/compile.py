"""Where ``compile: true`` and bf16 autocast pay: milliseconds per training step, eager fp32 against
compiled fp32 and eager ``bf16-mixed``, for a peft method (LoRA r=8, every linear layer), one
lit-peft implements itself (Houlsby adapters) and full fine-tuning, on all-MiniLM-L6-v2 with SST-2
batches grouped by length (lit-peft's default: batch shapes vary, so the compiled graph sees several
sequence lengths). ``--causal`` adds SmolLM2-135M + LoRA on GSM8K rows.

Each (model, method, mode) runs ``--steps`` steps through ``Trainer.fit`` in its own process. The
first ``--warmup`` steps hold the compilation (and the first recompile for a new length); the
median of the rest is the steady step time. Reported: steady ms per step, its ratio to eager fp32,
the warm-up's extra seconds over eager, and the steps a run needs before compiling has paid for
itself (extra seconds over seconds saved a step).

Results go to ``benchmarks/results/compile.{md,json}``. Last line::

    compile_lora_ratio=<x> bf16_lora_ratio=<y>   (steady step time over eager fp32; below 1 is faster;
                                                  MiniLM's LoRA, or SmolLM2's when only ``--causal`` ran)

    python benchmarks/compile.py [--steps 60] [--warmup 20] [--methods lora houlsby full] [--causal] [--name compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODES = ("eager", "compiled", "bf16")


def method(name: str, causal: bool):
    from lit_peft import methods

    if name == "lora":
        return methods.LoRA(r=8, alpha=16, dropout=0.1, targets=["q_proj", "v_proj"] if causal else "all-linear")
    if name == "houlsby":
        return methods.Houlsby(bottleneck=64)
    return methods.FullFineTune()


def one(args) -> dict:
    import logging
    import warnings

    from lightning.pytorch import Callback, Trainer, seed_everything

    from lit_peft import quiet

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    quiet.install()
    seed_everything(0, verbose=False)
    compiled, causal = args.mode == "compiled", args.model == "smollm2"
    if causal:
        from lit_peft.data import GSM8KData
        from lit_peft.tasks import CausalLM

        task = CausalLM(backbone="smollm2", compile=compiled)
        data = GSM8KData(data_dir=str(ROOT.parent / "shared" / "data" / "gsm8k"), max_length=384, batch_size=4,
                         limit_train_rows=4 * args.steps)
    else:
        from lit_peft.data import SST2Data
        from lit_peft.tasks import SequenceClassification

        task = SequenceClassification(backbone="minilm", compile=compiled)
        data = SST2Data(data_dir=str(ROOT.parent / "shared" / "data" / "sst2"), max_length=64, batch_size=32,
                        limit_train_rows=32 * args.steps)

    class Steps(Callback):
        times: list[float] = []

        def on_train_batch_start(self, *a) -> None:
            self.t = time.perf_counter()

        def on_train_batch_end(self, *a) -> None:
            self.times.append(time.perf_counter() - self.t)

    steps = Steps()
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                      precision="bf16-mixed" if args.mode == "bf16" else "32-true",
                      callbacks=[method(args.method, causal), steps])
    trainer.fit(task, datamodule=data)
    return {"model": args.model, "method": args.method, "mode": args.mode, "step_s": steps.times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--methods", nargs="*", default=["lora", "houlsby", "full"], choices=["lora", "houlsby", "full"],
                        help="MiniLM methods to time (none: only --causal)")
    parser.add_argument("--name", default="compile", help="result files: benchmarks/results/<name>.{md,json}")
    parser.add_argument("--from_json", help="rebuild the table from an earlier <name>.json, running nothing")
    parser.add_argument("--causal", action="store_true", help="also SmolLM2-135M + LoRA on GSM8K rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="minilm", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="lora", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="eager", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args)), flush=True)
        return
    runs = [("minilm", m) for m in args.methods] + ([("smollm2", "lora")] if args.causal else [])
    results = []
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())["results"]
        runs = list(dict.fromkeys((r["model"], r["method"]) for r in results))
    for model, name in runs if not args.from_json else []:
        for mode in MODES:
            cmd = [sys.executable, __file__, "--one", "--model", model, "--method", name, "--mode", mode,
                   "--steps", str(args.steps), "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{model} {name} {mode} failed:\n{done.stderr[-3000:]}")
            result = json.loads(line[7:])
            result["steady_ms"] = 1000 * statistics.median(result["step_s"][args.warmup:])
            result["warmup_s"] = sum(result["step_s"][: args.warmup])
            results.append(result)
            print(f"{model} {name} {mode}: steady {result['steady_ms']:.1f} ms/step, warm-up {result['warmup_s']:.1f} s",
                  flush=True)
    out = ROOT / "benchmarks" / "results"
    if not args.from_json:  # a rebuild keeps the measured run's record as it was
        (out / f"{args.name}.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    lines = [f"Training step time by mode, {args.steps} steps (the first {args.warmup} are the warm-up), threads={args.threads}, CPU; "
             "MiniLM: SST-2 batches of 32 grouped by length (max_length 64); SmolLM2: GSM8K batches of 4", "",
             "| model | method | mode | steady ms/step | vs eager fp32 | warm-up extra s | steps to pay back |",
             "|---|---|---|---|---|---|---|"]
    ratios = {}
    for model, name in runs:
        base = next(r for r in results if (r["model"], r["method"], r["mode"]) == (model, name, "eager"))
        for r in (r for r in results if (r["model"], r["method"]) == (model, name)):
            ratio = r["steady_ms"] / base["steady_ms"]
            ratios[(model, name, r["mode"])] = ratio
            extra = r["warmup_s"] - base["warmup_s"]
            saved = (base["steady_ms"] - r["steady_ms"]) / 1000
            if r["mode"] == "eager":
                payback = "–"
            elif saved <= 0:
                payback = "never"
            else:
                payback = "at once" if extra <= 0 else f"{extra / saved:.0f}"
            lines.append(f"| {model} | {name} | {r['mode']} | {r['steady_ms']:.1f} | {ratio:.3f} | "
                         f"{extra if r['mode'] != 'eager' else 0:.1f} | {payback} |")
    # The last line is MiniLM's LoRA where it ran, else the first model's (``--methods --causal``).
    key = "minilm" if any(model == "minilm" for model, _ in runs) else runs[0][0]
    last = (f"compile_lora_ratio={ratios.get((key, 'lora', 'compiled'), float('nan')):.3f} "
            f"bf16_lora_ratio={ratios.get((key, 'lora', 'bf16'), float('nan')):.3f}")
    lines += ["", last]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
