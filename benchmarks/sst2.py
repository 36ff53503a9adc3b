"""SST-2 quality benchmark: full fine-tuning, linear probing, LoRA and DoRA on all-MiniLM-L6-v2.

Each method trains on the whole SST-2 train split (67,349 sentences) from its config in
``configs/`` and is scored on ``dev.tsv`` (872 sentences, the split papers report), each in its own
process so peak memory is per run. Prints a markdown table (accuracy, trainable %, time, peak
memory) and writes it, with the raw summaries, to ``benchmarks/results/``.

    python benchmarks/sst2.py --data_dir ../shared/data/sst2 [--epochs 1] [--methods full lora] [--keep] [--name sst2]

Results go to ``benchmarks/results/<name>.md`` and ``<name>.json`` (``--name sst2_tenth_epoch`` for
the tenth-of-an-epoch table, so a quick look does not overwrite the full-epoch results).

``--keep`` re-runs only the named methods at the given ``--epochs`` and keeps every other row of the
last ``<name>.json`` (other methods, or the same method at another epoch budget; their configs did not
change), each marked "earlier run". Every row carries its own epoch count.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["full", "linear_probe", "lora", "dora"]
#: the methods of issue #3, compared with LoRA: --methods lora qlora galore sift rosa houlsby
BEYOND_PEFT = ["qlora", "galore", "sift", "rosa", "houlsby"]


def run(method: str, data_dir: str, epochs: int, out: Path, limit: float) -> dict:
    save_dir = out / "runs"
    cmd = [sys.executable, "-m", "lit_peft.cli", "fit", "--config", str(ROOT / "configs" / f"{method}_sst2.yaml"),
           "--data.init_args.data_dir", data_dir, "--trainer.max_epochs", str(epochs),
           "--trainer.enable_progress_bar", "false", "--trainer.limit_train_batches", str(limit),
           "--trainer.logger.init_args.save_dir", str(save_dir)]
    started = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    summaries = sorted((save_dir / f"{method}_sst2").glob("version_*/summary.json"), key=lambda p: p.stat().st_mtime)
    summary = json.loads(summaries[-1].read_text())
    summary["wall_s"] = round(time.time() - started, 1)
    summary["epochs"] = epochs
    return summary


def table(rows: list[dict]) -> str:
    lines = ["| method | epochs | dev accuracy | dev F1 | trainable params | trainable % | train time (s) | samples/s | peak RSS (MB) | checkpoint (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']}{' (earlier run)' if r.get('earlier_run') else ''} | {r.get('epochs', 1)} | {100 * r['val_acc']:.2f} | {100 * r['val_f1']:.2f} | {r['trainable_params']:,} | "
                     f"{r['trainable_pct']:.2f} | {r['train_time_s']:.0f} | {r['samples_per_s']:.1f} | "
                     f"{r['peak_memory_mb']:.0f} | {r['checkpoint_mb']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--limit_train_batches", type=float, default=1.0, help="fraction (or count) of batches, for a quick look")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", default="sst2", help="results file stem under --out")
    parser.add_argument("--keep", action="store_true",
                        help="keep the other rows of the last <name>.json, marked 'earlier run'")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = "epochs per row" + (f", {args.limit_train_batches:g} of the train split per epoch" if args.limit_train_batches != 1.0 else "")
    rows = []
    previous = out / f"{args.name}.json"
    if args.keep and previous.is_file():
        # rows written before the epochs column existed were all one-epoch runs
        kept = [r for r in json.loads(previous.read_text())
                if not (r["method"] in args.methods and r.get("epochs", 1) == args.epochs)]
        rows = [{**r, "earlier_run": True} for r in kept]
    for method in args.methods:  # the table is rewritten after each run, so a stopped benchmark keeps what it measured
        rows.append(run(method, args.data_dir, args.epochs, out, args.limit_train_batches))
        text = table(rows)
        (out / f"{args.name}.md").write_text(f"SST-2 dev, {budget}, all-MiniLM-L6-v2, CPU\n\n{text}\n")
        (out / f"{args.name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)
    # each row against full fine-tuning at the same number of epochs where that was run, else the first full row
    fulls = {r.get("epochs", 1): r for r in reversed(rows) if r["method"] == "full"}
    gaps = {}
    for r in rows:
        full = fulls.get(r.get("epochs", 1)) or next(iter(fulls.values()), None)
        if full and r["method"] != "full":
            gaps[f"{r['method']}@{r.get('epochs', 1)}ep vs full@{full.get('epochs', 1)}ep"] = round(100 * (r["val_acc"] - full["val_acc"]), 2)
    print("gap_vs_full_points=" + json.dumps(gaps))


if __name__ == "__main__":
    main()
