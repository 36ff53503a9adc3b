"""Training throughput of LoRA (r=8 on query, value) on the packaged all-MiniLM-L6-v2, three ways
over the same SST-2 batches in one run:

1. lit-peft: ``Trainer.fit`` with ``SequenceClassification`` + ``LoRA`` + ``SST2Data``;
2. a hand-written PyTorch loop over the same model, optimizer, schedule and batches;
3. transformers' ``Trainer`` with the same peft model, rows, order and batch size.

Each measures samples per second over the whole pass (data loading and framework overhead
included); a warm-up pass of each runs first. The ways alternate over ``--rounds`` rounds, in an
order that rotates from round to round (with a multiple of three rounds each way runs first, second
and third equally often), and the median is kept. Every round's figures, the medians and the
round-by-round ratios (median, mean and its standard error) go to ``benchmarks/results/throughput.md``
and ``throughput.json``. Last line: ``ratio_vs_loop=<x> ratio_vs_trainer=<y>`` (lit-peft's median
samples/s over theirs).

``--tiny`` swaps MiniLM for a randomly initialised 2-layer BERT of width 32 (MiniLM's tokenizer), so
that the model's own compute is small and the ratios (and the ms per step printed with them) show
what each framework adds per step; its results go to ``throughput_tiny.{md,json}``.

    python benchmarks/throughput.py --data_dir ../shared/data/sst2 [--rows 2048] [--rounds 3] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
BATCH, LR, MAX_LENGTH = 32, 1e-3, 64


def lit_peft_way(data_dir: str, rows: int, backbone: str) -> float:
    from lightning.pytorch import Trainer

    from lit_peft.data import SST2Data
    from lit_peft.metrics import EfficiencyReport
    from lit_peft.methods import LoRA
    from lit_peft.tasks import SequenceClassification

    task = SequenceClassification(backbone=backbone, learning_rate=LR, warmup_ratio=0.0)
    data = SST2Data(data_dir=data_dir, limit_train_rows=rows, batch_size=BATCH, max_length=MAX_LENGTH)
    report = EfficiencyReport(enabled=False)
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0, callbacks=[LoRA(r=8, alpha=16, dropout=0.1), report])
    trainer.fit(task, datamodule=data)
    return report.samples / report.train_seconds


def shared_batches(data_dir: str, rows: int, backbone: str):
    """The model lit-peft builds (before the method) and lit-peft's epoch-0 batches, for the others."""
    from lit_peft.data import SST2Data
    from lit_peft.tasks import SequenceClassification

    task = SequenceClassification(backbone=backbone, learning_rate=LR, warmup_ratio=0.0)
    data = SST2Data(data_dir=data_dir, limit_train_rows=rows, batch_size=BATCH, max_length=MAX_LENGTH)
    data._tokenizer = lambda: task.tokenizer
    data.setup("fit")
    order = list(data.train_dataloader().sampler)
    return task, data, order


def peft_model(backbone: str):
    from peft import LoraConfig, get_peft_model

    from lit_peft.backbones import resolve
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(resolve(backbone), num_labels=2)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"],
                        modules_to_save=["classifier"], task_type="SEQ_CLS")
    return get_peft_model(model, config).train()


def loop_way(data_dir: str, rows: int, backbone: str) -> float:
    task, data, _ = shared_batches(data_dir, rows, backbone)
    model = peft_model(backbone)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.01, fused=True)  # as lit-peft and Trainer
    loader = data.train_dataloader()
    steps = len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
    samples, start = 0, time.perf_counter()
    for batch in loader:
        labels = batch.pop("labels")
        loss = F.cross_entropy(model(**batch).logits, labels)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        samples += len(labels)
    return samples / (time.perf_counter() - start)


def trainer_way(data_dir: str, rows: int, backbone: str) -> float:
    from torch.utils.data import SequentialSampler
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    task, data, order = shared_batches(data_dir, rows, backbone)
    model = peft_model(backbone)
    # lit-peft's rows in lit-peft's order, read sequentially; as lists, the way a Trainer user's
    # tokenized dataset holds them (DataCollatorWithPadding would first turn tensors back into lists)
    dataset = [{k: v.tolist() if torch.is_tensor(v) else v for k, v in data.datasets["train"][i].items()} for i in order]

    class SameOrderTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, learning_rate=LR, num_train_epochs=1,
                                 weight_decay=0.01, lr_scheduler_type="linear", report_to=[], save_strategy="no",
                                 logging_strategy="no", eval_strategy="no", disable_tqdm=True, use_cpu=True,
                                 dataloader_num_workers=0, seed=42)
        trainer = SameOrderTrainer(model=model, args=args, train_dataset=dataset,
                                   data_collator=DataCollatorWithPadding(task.tokenizer))
        metrics = trainer.train().metrics
    return len(dataset) / metrics["train_runtime"]


def tiny_bert(folder: Path) -> str:
    """A random 2-layer BERT of width 32 with MiniLM's tokenizer: the overhead-bound case."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from lit_peft.backbones import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve("minilm"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def paired_ratios(ours: list[float], theirs: list[float]) -> dict:
    """lit-peft over another way round by round: median, mean, its standard error, rounds won."""
    ratios = [a / b for a, b in zip(ours, theirs)]
    se = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else None  # JSON has no NaN
    return {"ratios": ratios, "median": statistics.median(ratios), "mean": statistics.fmean(ratios), "se": se,
            "faster": sum(r > 1 for r in ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer width-32 BERT: what the frameworks add per step")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        backbone = tiny_bert(Path(tmp)) if args.tiny else "minilm"
        torch.manual_seed(0)
        ways = {"lit-peft": lit_peft_way, "loop": loop_way, "trainer": trainer_way}
        for fn in ways.values():  # warm-up: first-call costs (imports, allocator) out of the measurement
            fn(args.data_dir, 4 * BATCH, backbone)
        results: dict[str, list[float]] = {name: [] for name in ways}
        names = list(ways)
        for r in range(args.rounds):  # the order rotates, so no way always runs first or after the same one
            for name in names[r % len(names):] + names[:r % len(names)]:
                results[name].append(ways[name](args.data_dir, args.rows, backbone))
                print(f"round {r + 1} {name}: {results[name][-1]:.1f} samples/s", flush=True)
    median = {name: statistics.median(v) for name, v in results.items()}
    model = "a random 2-layer width-32 BERT (--tiny)" if args.tiny else "all-MiniLM-L6-v2"
    setting = f"threads={torch.get_num_threads()} rows={args.rows} batch={BATCH} rounds={args.rounds}"
    ratios = f"ratio_vs_loop={median['lit-peft'] / median['loop']:.3f} ratio_vs_trainer={median['lit-peft'] / median['trainer']:.3f}"
    lines = [f"LoRA r=8 (query, value) on {model}, SST-2 batches, {setting}", "",
             "| way | median samples/s | ms per step (batch 32) | every round |", "|---|---|---|---|"]
    lines += [f"| {name} | {median[name]:.1f} | {1000 * BATCH / median[name]:.2f} | {', '.join(f'{v:.1f}' for v in values)} |"
              for name, values in results.items()]
    paired = {other: paired_ratios(results["lit-peft"], results[other]) for other in ("loop", "trainer")}
    lines += ["", "Round by round (lit-peft over the other way in the same round, which cancels drift in the "
              "machine's speed between rounds):", "",
              "| vs | median | mean ± standard error | rounds lit-peft was faster |", "|---|---|---|---|"]
    lines += [f"| {other} | {p['median']:.4f} | {p['mean']:.4f} ± {'-' if p['se'] is None else format(p['se'], '.4f')} | {p['faster']} of {len(p['ratios'])} |"
              for other, p in paired.items()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "throughput_tiny" if args.tiny else "throughput"
    (out / f"{stem}.md").write_text("\n".join(lines + ["", ratios]) + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"model": model, "setting": setting, "rounds": results, "median": median,
                                                 "paired": paired}, indent=2) + "\n")
    print(setting + " " + " ".join(f"{k}={v:.1f}" for k, v in median.items()))
    print(ratios)


if __name__ == "__main__":
    main()
