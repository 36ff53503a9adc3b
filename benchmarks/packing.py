"""Packing against length-grouped padding on GSM8K training: tokens/s, padding and what it does to accuracy.

LoRA (``configs/lora_gsm8k.yaml``) on SmolLM2-135M-Instruct, the same 512 training problems, one
epoch, at about the same tokens per optimizer step:

- ``grouped``: batches of 8 problems of similar length (``group_by_length``, the default), each
  padded to its longest;
- ``packed``: ``pack: true``, rows of 512 tokens holding whole problems (position ids restarting
  per problem, no attention across them), 3 rows a batch.

Each run is then tested on the first ``--test_rows`` GSM8K test problems: the response loss
(token mean, the low-noise figure) and exact match of greedy generations.

    python benchmarks/packing.py [--seeds 1] [--train_rows 512] [--test_rows 100]

Writes ``benchmarks/results/packing.md`` and ``.json`` after each run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ett import ROOT, latest_summary, lit_peft

SETTINGS = {
    "grouped": ["--data.init_args.pack", "false", "--data.init_args.batch_size", "8"],
    "packed": ["--data.init_args.pack", "true", "--data.init_args.batch_size", "3"],
}


def run(setting: str, seed: int, args, save_dir: Path) -> dict:
    name = f"{setting}_seed{seed}"
    common = ["--config", str(ROOT / "configs" / "lora_gsm8k.yaml"), "--data.init_args.data_dir", args.data_dir,
              "--data.init_args.max_length", "512", "--data.init_args.limit_train_rows", str(args.train_rows),
              "--data.init_args.limit_eval_rows", str(args.test_rows), "--data.init_args.eval_batch_size", "8",
              *SETTINGS[setting], "--seed_everything", str(seed), "--trainer.enable_progress_bar", "false",
              "--trainer.limit_val_batches", "0", "--trainer.logger.init_args.save_dir", str(save_dir),
              "--trainer.logger.init_args.name", name]
    lit_peft("fit", *common)
    fitted = latest_summary(save_dir, name)
    run_dir = sorted((save_dir / name).glob("version_*"), key=lambda p: p.stat().st_mtime)[-1]
    started = time.time()
    lit_peft("test", *common, "--ckpt_path", str(sorted((run_dir / "checkpoints").glob("*.ckpt"))[-1]))
    tested = latest_summary(save_dir, name)
    keep = ("train_time_s", "train_samples", "train_tokens", "tokens_per_s", "padded_tokens_per_s", "padding_ratio",
            "samples_per_s", "peak_memory_mb")
    return {"setting": setting, "seed": seed, **{k: fitted.get(k) for k in keep},
            "test_loss": tested["test_loss"], "test_exact_match": tested["test_exact_match"],
            "test_time_s": round(time.time() - started, 1)}


def table(rows: list[dict]) -> str:
    lines = ["| setting | seed | train time (s) | real tokens/s | padded tokens/s | padding ratio | test loss | "
             "exact match (%) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['seed']} | {r['train_time_s']:.0f} | {r['tokens_per_s']:.0f} | "
                     f"{r['padded_tokens_per_s']:.0f} | {r['padding_ratio']:.3f} | {r['test_loss']:.4f} | "
                     f"{100 * r['test_exact_match']:.1f} |")
    grouped = [r for r in rows if r["setting"] == "grouped"]
    packed = [r for r in rows if r["setting"] == "packed"]
    if grouped and packed:
        ratio = sum(r["tokens_per_s"] for r in packed) / len(packed) / (sum(r["tokens_per_s"] for r in grouped) / len(grouped))
        lines.append(f"\nReal tokens/s, packed over grouped: {ratio:.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "gsm8k"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--train_rows", type=int, default=512)
    parser.add_argument("--test_rows", type=int, default=100)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", default="packing")
    args = parser.parse_args()
    out = Path(args.out)
    save_dir = out / "runs" / f"{args.name}_{time.strftime('%Y%m%d-%H%M%S')}"
    header = (f"LoRA r=8 (q_proj, v_proj) on SmolLM2-135M-Instruct, GSM8K, {args.train_rows} training problems, one epoch, "
              f"max_length 512; test on the first {args.test_rows} test problems (greedy, 192 new tokens); CPU, 2 threads, "
              "each run alone in its own process\n\n")
    rows = []
    for seed in args.seeds:
        for setting in SETTINGS:
            rows.append(run(setting, seed, args, save_dir))
            (out / f"{args.name}.md").write_text(header + table(rows) + "\n")
            (out / f"{args.name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
