"""GSM8K's training and test loop, batches drawn at random (``group_by_length: false``, what
lit-peft did before) against batches grouped by length (the default), in one run.

SmolLM2-135M-Instruct with LoRA (``configs/lora_gsm8k.yaml``: r=8 on q_proj, v_proj, batch 4,
max_length 384) trains on the same ``--train_rows`` GSM8K rows each way, then generates greedily
(up to ``--max_new_tokens``) for the first ``--test_rows`` test problems, in batches of
``--eval_batch`` prompts: in file order (left-padded to the batch's longest prompt) or longest
prompt first. Reported per way: training rows/s and tokens/s (real tokens), the padding ratio,
generation seconds per problem, and the exact match (greedy decoding of other batches can differ
by rounding, so it is shown, not assumed equal). The ways alternate over ``--rounds``.

Results go to ``benchmarks/results/gsm8k_loop.{md,json}``. Last line::

    train_rows_per_s_ratio=<a> generation_s_per_problem_ratio=<b>

(grouped over random: above 1 is faster training, below 1 faster generation.)

    python benchmarks/gsm8k_loop.py [--train_rows 128] [--test_rows 32] [--eval_batch 8] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def one_way(args, grouped: bool) -> dict:
    from lightning.pytorch import Callback, Trainer, seed_everything

    from lit_peft.data import GSM8KData
    from lit_peft.methods import LoRA
    from lit_peft.metrics import EfficiencyReport
    from lit_peft.tasks import CausalLM

    class TestClock(Callback):
        def on_test_start(self, trainer, pl_module) -> None:
            self.start = time.perf_counter()

        def on_test_end(self, trainer, pl_module) -> None:
            self.seconds = time.perf_counter() - self.start

    seed_everything(42, verbose=False)
    task = CausalLM(backbone="smollm2", learning_rate=2e-4, lr_schedule="cosine", warmup_ratio=0.03,
                    max_new_tokens=args.max_new_tokens)
    data = GSM8KData(data_dir=args.data_dir, val_size=50, max_length=384, max_response_length=256, batch_size=4,
                     eval_batch_size=args.eval_batch, limit_train_rows=args.train_rows, limit_eval_rows=args.test_rows,
                     group_by_length=grouped)
    report, clock = EfficiencyReport(enabled=False), TestClock()
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                      callbacks=[LoRA(r=8, alpha=16, dropout=0.05, targets=["q_proj", "v_proj"]), report, clock])
    trainer.fit(task, datamodule=data)
    report._read_tokens()
    scores = trainer.test(task, datamodule=data, verbose=False)[0]
    prompts = data.datasets["test"].lengths("prompt_ids")
    order = list(data.test_dataloader().sampler)
    batches = [order[i:i + args.eval_batch] for i in range(0, len(order), args.eval_batch)]
    prompt_padding = sum(len(b) * int(prompts[b].max()) for b in batches) / int(prompts.sum())
    return {"grouped": grouped, "train_rows_per_s": report.samples / report.train_seconds,
            "train_tokens_per_s": report.tokens / report.train_seconds,
            "padding_ratio": report.padded_tokens / report.tokens, "train_seconds": report.train_seconds,
            "generation_s_per_problem": clock.seconds / args.test_rows, "prompt_padding_ratio": prompt_padding,
            "test_exact_match": scores["test_exact_match"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "gsm8k"))
    parser.add_argument("--train_rows", type=int, default=128)
    parser.add_argument("--test_rows", type=int, default=32)
    parser.add_argument("--eval_batch", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from lit_peft import quiet

    quiet.install()
    results = []
    for k in range(args.rounds):
        for grouped in ((False, True) if k % 2 == 0 else (True, False)):
            results.append(one_way(args, grouped))
            print(json.dumps(results[-1]), flush=True)
    out = ROOT / "benchmarks" / "results"
    (out / "gsm8k_loop.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")

    def median(grouped: bool, key: str) -> float:
        return statistics.median(r[key] for r in results if r["grouped"] == grouped)

    keys = ["train_rows_per_s", "train_tokens_per_s", "padding_ratio", "generation_s_per_problem",
            "prompt_padding_ratio", "test_exact_match"]
    lines = [f"GSM8K loop, SmolLM2-135M-Instruct + LoRA r=8 (q_proj, v_proj), {args.train_rows} training rows in batches "
             f"of 4, greedy generation (up to {args.max_new_tokens} new tokens) for {args.test_rows} test problems in "
             f"batches of {args.eval_batch}, threads={args.threads}, CPU, medians of {args.rounds} round(s)", "",
             "| batches | training rows/s | training tokens/s | padding ratio (training) | generation s / problem | "
             "prompt padding ratio (generation) | test exact match |", "|---|---|---|---|---|---|---|"]
    for grouped, name in ((False, "random (before)"), (True, "grouped by length (after)")):
        values = [median(grouped, key) for key in keys]
        lines.append(f"| {name} | {values[0]:.2f} | {values[1]:.0f} | {values[2]:.3f} | {values[3]:.2f} | {values[4]:.3f} | "
                     f"{values[5]:.4f} |")
    last = (f"train_rows_per_s_ratio={median(True, 'train_rows_per_s') / median(False, 'train_rows_per_s'):.3f} "
            f"generation_s_per_problem_ratio={median(True, 'generation_s_per_problem') / median(False, 'generation_s_per_problem'):.3f}")
    lines += ["", last]
    (out / "gsm8k_loop.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
