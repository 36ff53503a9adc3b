"""Time to accuracy: LoRA on SST-2 with the packaged all-MiniLM-L6-v2, three ways, in one run.

1. ``trainer``: transformers' ``Trainer`` with its defaults (random batches, each padded to its
   longest row by ``DataCollatorWithPadding``);
2. ``trainer_grouped``: the same with ``train_sampling_strategy="group_by_length"`` (what
   ``group_by_length=True`` was before transformers 5);
3. ``lit-peft``: ``Trainer.fit`` with ``SequenceClassification`` + ``LoRA`` + ``SST2Data`` at their
   defaults (batches grouped by length).

The same rows (the SST-2 train split in a seeded order), model (peft's LoRA r=8, alpha 16, dropout
0.1 on every linear layer, the classifier trained whole), optimizer (AdamW, lr 1e-3, weight decay
0.01, none on biases and LayerNorms), schedule (linear, 6% warm-up over the same number of steps),
gradient clipping at 1.0 (Trainer's default) and batch size 32. Each way evaluates dev accuracy
(872 sentences) every ``--eval_rows`` training rows; the time to accuracy is the wall time from the
start of training until the first evaluation at or above ``--target``, evaluations included. Each
(way, seed) runs in its own process, in an order that rotates from seed to seed.

Results go to ``benchmarks/results/time_to_accuracy.{md,json}``. Last line::

    tta_vs_trainer=<x> tta_vs_trainer_grouped=<y> padding_ratio=<p> acc_delta=<d>

x and y are lit-peft's mean time to the target over the other way's; p is lit-peft's training
tokens computed over real tokens; d is lit-peft's mean final dev accuracy minus Trainer's.

    python benchmarks/time_to_accuracy.py --data_dir ../shared/data/sst2 [--rows 32768] [--eval_rows 4096]
        [--seeds 0 1 2] [--target 0.88] [--ways trainer trainer_grouped lit-peft]
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
BATCH, LR, WD, WARMUP, MAX_LENGTH, CLIP = 32, 1e-3, 0.01, 0.06, 64, 1.0
LORA = dict(r=8, alpha=16, dropout=0.1)
TARGETS = ["query", "key", "value", "dense"]  # every linear layer of a BERT block ("all-linear")
WAYS = ("trainer", "trainer_grouped", "lit-peft")
#: not run by default: lit-peft under bf16 autocast (``--ways lit-peft lit-peft-bf16``)
EXTRA_WAYS = ("lit-peft-bf16",)


def point(rows: int, seconds: float, acc: float) -> dict:
    """One evaluation of the curve, also printed at once (the parent shows progress as it comes)."""
    print(f"POINT rows={rows} seconds={seconds:.1f} acc={acc:.4f}", flush=True)
    return {"rows": rows, "seconds": seconds, "acc": acc}


def lit_peft_way(args) -> dict:
    from lightning.pytorch import Callback, Trainer, seed_everything

    from lit_peft.data import SST2Data
    from lit_peft.methods import LoRA
    from lit_peft.metrics import EfficiencyReport
    from lit_peft.tasks import SequenceClassification

    seed_everything(args.seed, verbose=False)
    steps = args.rows // BATCH

    class Clock(Callback):
        def __init__(self) -> None:
            self.curve: list[dict] = []

        def on_train_start(self, trainer, pl_module) -> None:
            self.start = time.perf_counter()

        def on_validation_end(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking:
                self.curve.append(point(trainer.global_step * BATCH, time.perf_counter() - self.start,
                                        float(trainer.callback_metrics["val_acc"])))

    task = SequenceClassification(backbone="minilm", learning_rate=LR, weight_decay=WD, warmup_ratio=WARMUP)
    data = SST2Data(data_dir=args.data_dir, max_length=MAX_LENGTH, batch_size=BATCH, seed=args.seed)
    clock, report = Clock(), EfficiencyReport(enabled=False)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, val_check_interval=args.eval_rows // BATCH,
                      check_val_every_n_epoch=None, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, gradient_clip_val=CLIP,
                      precision="bf16-mixed" if args.one == "lit-peft-bf16" else "32-true",
                      callbacks=[LoRA(targets=TARGETS, **LORA), clock, report])
    trainer.fit(task, datamodule=data)
    report._read_tokens()
    return {"curve": clock.curve, "padding_ratio": report.padded_tokens / report.tokens}


def trainer_way(args, grouped: bool) -> dict:
    import numpy as np
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainerCallback,
                              TrainingArguments)

    from lit_peft.backbones import load_tokenizer, resolve
    from lit_peft.data.text_classification import read_rows

    tokenizer = load_tokenizer("minilm")

    def encode(path: Path) -> list[dict]:
        rows = [row for _, row in read_rows(path)]
        enc = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=MAX_LENGTH)
        return [{"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": int(r["label"])}
                for ids, types, mask, r in zip(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"], rows)]

    folder = Path(args.data_dir)
    train, dev = encode(folder / "train.tsv"), encode(folder / "dev.tsv")
    model = AutoModelForSequenceClassification.from_pretrained(resolve("minilm"), num_labels=2)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=TARGETS, modules_to_save=["classifier"], task_type="SEQ_CLS"))

    class Counting(DataCollatorWithPadding):
        computed = real = 0

        def __call__(self, features):
            batch = super().__call__(features)
            if model.training:
                Counting.computed += batch["attention_mask"].numel()
                Counting.real += int(batch["attention_mask"].sum())
            return batch

    class Clock(TrainerCallback):
        curve: list[dict] = []

        def on_train_begin(self, targs, state, control, **kw):
            self.start = time.perf_counter()

        def on_evaluate(self, targs, state, control, metrics=None, **kw):
            self.curve.append(point(state.global_step * BATCH, time.perf_counter() - self.start, metrics["eval_accuracy"]))

    def accuracy(pred) -> dict:
        return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}

    targs = TrainingArguments(
        output_dir=str(Path(args.work) / f"trainer_{'grouped_' if grouped else ''}{args.seed}"),
        per_device_train_batch_size=BATCH, learning_rate=LR, weight_decay=WD, lr_scheduler_type="linear",
        warmup_steps=WARMUP, max_steps=args.rows // BATCH, max_grad_norm=CLIP, eval_strategy="steps",
        eval_steps=args.eval_rows // BATCH, save_strategy="no", logging_strategy="no", report_to="none",
        disable_tqdm=True, seed=args.seed, data_seed=args.seed, use_cpu=True,
        train_sampling_strategy="group_by_length" if grouped else "random")
    clock = Clock()
    trainer = Trainer(model=model, args=targs, train_dataset=train, eval_dataset=dev,
                      data_collator=Counting(tokenizer), compute_metrics=accuracy, callbacks=[clock])
    trainer.train()
    return {"curve": clock.curve, "padding_ratio": Counting.computed / Counting.real}


def one(args) -> None:
    """Run one (way, seed) in this process and print its result as a JSON line."""
    import logging
    import warnings

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from lit_peft import quiet

    quiet.install()
    result = lit_peft_way(args) if args.one.startswith("lit-peft") else trainer_way(args, grouped=args.one == "trainer_grouped")
    print("RESULT " + json.dumps({"way": args.one, "seed": args.seed, **result}), flush=True)


def first_at(curve: list[dict], target: float) -> dict | None:
    """The first evaluation at or above the target, if any."""
    return next((point for point in curve if point["acc"] >= target), None)


def time_to(curve: list[dict], target: float) -> float | None:
    point = first_at(curve, target)
    return point["seconds"] if point else None


def spread(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def seconds(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{statistics.mean(values):.1f}" + (f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--rows", type=int, default=32768, help="training rows each way sees (a multiple of eval_rows)")
    parser.add_argument("--eval_rows", type=int, default=4096, help="training rows between dev evaluations")
    parser.add_argument("--target", type=float, default=0.88)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS + EXTRA_WAYS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="time_to_accuracy")
    parser.add_argument("--work", default=str(ROOT / "results" / "time_to_accuracy"))
    parser.add_argument("--from_json", nargs="+", help="rebuild the tables from earlier runs' <name>.json, running "
                        "nothing; several files (the same rows, evaluations and target) are read as one study, so "
                        "more seeds or ways can be added by a later run")
    parser.add_argument("--one", choices=WAYS + EXTRA_WAYS, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args)
    if args.rows % args.eval_rows or args.eval_rows % BATCH:
        parser.error("--rows must be a multiple of --eval_rows, and --eval_rows of the batch size (32)")

    out = ROOT / "benchmarks" / "results"
    if args.from_json:
        results = merged(args, [Path(f) for f in args.from_json])
        return write_report(args, results, out)
    results: list[dict] = []
    for k, seed in enumerate(args.seeds):
        ways = args.ways[k % len(args.ways):] + args.ways[: k % len(args.ways)]  # each way first as often
        for way in ways:
            cmd = [sys.executable, __file__, "--one", way, "--seed", str(seed), "--data_dir", args.data_dir,
                   "--rows", str(args.rows), "--eval_rows", str(args.eval_rows), "--threads", str(args.threads),
                   "--work", args.work]
            log = Path(args.work) / f"{way}_seed{seed}.log"  # the child's warnings and errors
            log.parent.mkdir(parents=True, exist_ok=True)
            done = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, cwd=ROOT)
            line = None
            for text in done.stdout:
                if text.startswith("POINT "):
                    print(f"  {way} seed {seed}: {text[6:].strip()}", flush=True)
                elif text.startswith("RESULT "):
                    line = text
            if done.wait() != 0 or line is None:
                sys.exit(f"{way} seed {seed} failed:\n{log.read_text()[-3000:]}")
            result = json.loads(line[len("RESULT "):])
            result["tta_s"] = time_to(result["curve"], args.target)
            result["final_acc"] = result["curve"][-1]["acc"]
            results.append(result)
            print(f"{way:16s} seed {seed}: time to {args.target:.0%} {result['tta_s'] or float('nan'):.1f} s, final acc "
                  f"{result['final_acc']:.4f}, padding {result['padding_ratio']:.3f}x, "
                  f"curve {[round(p['acc'], 4) for p in result['curve']]}", flush=True)
            (out / f"{args.name}.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")

    write_report(args, results, out)


def merged(args, files: list[Path]) -> list[dict]:
    """Every (way, seed) result of the files, with ``args`` set to the study they make together."""
    results: list[dict] = []
    seen: set[tuple[str, int]] = set()
    args.seeds, args.ways = [], []
    for number, file in enumerate(files):
        saved = json.loads(file.read_text())
        for key in ("rows", "eval_rows", "target", "threads"):
            if number and saved["args"][key] != getattr(args, key):
                sys.exit(f"{file}: {key}={saved['args'][key]}, but {files[0]} has {key}={getattr(args, key)}; "
                         "only runs of the same study can be read together")
            setattr(args, key, saved["args"][key])
        for result in saved["results"]:
            if (result["way"], result["seed"]) in seen:
                sys.exit(f"{file}: {result['way']} seed {result['seed']} is in an earlier file too; "
                         "read each (way, seed) from one file")
            seen.add((result["way"], result["seed"]))
            results.append(result)
        args.seeds += [s for s in saved["args"]["seeds"] if s not in args.seeds]
        args.ways += [w for w in saved["args"]["ways"] if w not in args.ways]
    return results


def write_report(args, results: list[dict], out: Path) -> None:
    """The tables and the last line, from every (way, seed) result."""
    from lit_peft.report import welch

    by_way = {w: [r for r in results if r["way"] == w] for w in args.ways}
    lines = [f"LoRA r=8 (every linear layer) on all-MiniLM-L6-v2, SST-2 train rows={args.rows} batch={BATCH}, dev accuracy "
             f"every {args.eval_rows} rows, target {args.target:.0%}, seeds {args.seeds}, threads={args.threads}, CPU", "",
             f"| way | time to {args.target:.0%} (s, mean ± std) | reached | rows to {args.target:.0%} (mean) | "
             "final dev accuracy (mean ± std) | padding ratio | wall time (s) | every seed: time to target / final "
             "accuracy |", "|---|---|---|---|---|---|---|---|"]
    for way, rows in by_way.items():
        times = [r["tta_s"] for r in rows if r["tta_s"] is not None]
        # time to target = rows to target x seconds a row: this column is the learning, wall time the speed
        to_rows = [point["rows"] for point in (first_at(r["curve"], args.target) for r in rows) if point]
        per_seed = ", ".join(f"{r['tta_s']:.0f} s / {r['final_acc']:.4f}" if r["tta_s"] else f"not reached / {r['final_acc']:.4f}"
                             for r in rows)
        rows_cell = f"{statistics.mean(to_rows):.0f}" if to_rows else "–"
        lines.append(f"| {way} | {seconds(times)} | {len(times)} of {len(rows)} | {rows_cell} | "
                     f"{spread([r['final_acc'] for r in rows])} | {statistics.mean(r['padding_ratio'] for r in rows):.3f} | "
                     f"{statistics.mean(r['curve'][-1]['seconds'] for r in rows):.0f} | {per_seed} |")

    def mean_tta(way: str) -> float | None:
        times = [r["tta_s"] for r in by_way.get(way, [])]
        return statistics.mean(times) if times and all(t is not None for t in times) else None

    def ratio(other: str) -> str:
        mine, theirs = mean_tta("lit-peft"), mean_tta(other)
        return f"{mine / theirs:.3f}" if mine and theirs else "nan"

    # the same curves read at lower targets too: where a seed misses the main target by one
    # evaluation, the ratios at the targets every seed reached still compare the ways
    targets = sorted({round(t, 4) for t in (args.target - 0.03, args.target - 0.02, args.target - 0.01, args.target)})
    lines += ["", "Time to each target (s, mean ± std; seeds that reached it of those run), and lit-peft's mean over "
              "each way's where every seed of both reached it:", "",
              "| way | " + " | ".join(f"{t:.0%}" for t in targets) + " |", "|---|" + "---|" * len(targets)]
    for way, rows in by_way.items():
        cells = []
        for t in targets:
            times = [time_to(r["curve"], t) for r in rows]
            reached = [x for x in times if x is not None]
            cell = f"{seconds(reached)} ({len(reached)}/{len(rows)})"
            mine = [time_to(r["curve"], t) for r in by_way.get("lit-peft", [])]
            if way != "lit-peft" and mine and reached and None not in mine and None not in times:
                cell += f", ratio {statistics.mean(mine) / statistics.mean(times):.3f}"
            cells.append(cell)
        lines.append(f"| {way} | " + " | ".join(cells) + " |")

    # a seed that never reached the target took longer than its whole run: counting its run's wall
    # time still bounds lit-peft's ratio from above, where the plain mean is not defined
    bounds = []
    for other in (w for w in by_way if w != "lit-peft"):
        mine, theirs = mean_tta("lit-peft"), [r["tta_s"] or r["curve"][-1]["seconds"] for r in by_way[other]]
        if mine and theirs and mean_tta(other) is None:
            bounds.append(f"{other}: at most {mine / statistics.mean(theirs):.3f}")
    if bounds:
        lines += ["", f"Where a way's seed never reached {args.target:.0%}, counting its whole run as its time, "
                  "lit-peft's ratio is " + "; ".join(bounds) + "."]

    acc = {w: [r["final_acc"] for r in rows] for w, rows in by_way.items()}
    delta = (statistics.mean(acc["lit-peft"]) - statistics.mean(acc["trainer"])) if acc.get("lit-peft") and acc.get("trainer") else float("nan")
    padding = statistics.mean(r["padding_ratio"] for r in by_way.get("lit-peft", [])) if by_way.get("lit-peft") else float("nan")
    last = f"tta_vs_trainer={ratio('trainer')} tta_vs_trainer_grouped={ratio('trainer_grouped')} padding_ratio={padding:.3f} acc_delta={delta:+.4f}"
    p = welch(acc.get("lit-peft", []), acc.get("trainer", []))
    lines += ["", "Time to accuracy counts from the start of training, evaluations included; a ratio is lit-peft's mean "
              "over the other way's.", "",
              f"Final dev accuracy, lit-peft minus Trainer: {delta:+.4f} (Welch's t-test over the seeds: p = "
              f"{p:.2f}; one dev sentence is {1 / 872:.4f})." if p is not None else "", "", last]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))



if __name__ == "__main__":
    main()
