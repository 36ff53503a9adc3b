"""Cost of a causal-LM training step: lit-peft's response-only LM head against transformers' ``labels=``.

``CausalLM.loss`` projects only the positions that predict a response token onto the vocabulary
(transformers' ``logits_to_keep`` with a boolean mask); the baseline is the usual
``model(input_ids, attention_mask, labels=labels).loss``, which builds ``batch x length x vocab``
logits. Both run forward + backward on the same GSM8K training batches with SmolLM2-135M-Instruct
and LoRA (r=16 on every linear layer, as ``benchmarks/gsm8k.py``), alternating over ``--rounds``
rounds in one process; the median seconds per step of each are compared. Also reported: the share
of positions projected and the bytes of the fp32 logits each way. Results go to
``benchmarks/results/causal_lm_loss.{md,json}``. Last line:

    step_time_ratio=<lit-peft / labels=> logits_bytes_ratio=<...>

    python benchmarks/causal_lm_loss.py [--batches 8] [--rounds 3] [--batch_size 4]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "gsm8k"))
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")

    from lit_peft.data import GSM8KData
    from lit_peft.methods import LoRA
    from lit_peft.tasks import CausalLM

    task = CausalLM(backbone="smollm2")
    torch.manual_seed(0)
    LoRA(r=16, alpha=32, dropout=0.0, targets="all-linear").attach(task)
    data = GSM8KData(data_dir=args.data_dir, max_length=384, max_response_length=256, batch_size=args.batch_size,
                     limit_train_rows=args.batches * args.batch_size, val_size=8)
    data._tokenizer = lambda: task.tokenizer
    data.setup("fit")
    batches = list(data.train_dataloader())[: args.batches]
    task.train()
    assert task.response_logits_only()

    def ours(batch):
        return task.loss(batch)

    def labels_path(batch):
        return task(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss

    ways = {"lit-peft": ours, "labels=": labels_path}
    times: dict[str, list[float]] = {name: [] for name in ways}
    losses: dict[str, float] = {}
    for fn in ways.values():  # warm-up
        fn(batches[0]).backward()
    for _ in range(args.rounds):
        for name, fn in ways.items():
            total, start = 0.0, time.perf_counter()
            for batch in batches:
                task.zero_grad(set_to_none=True)
                loss = fn(batch)
                loss.backward()
                total += float(loss)
            times[name].append((time.perf_counter() - start) / len(batches))
            losses[name] = total / len(batches)
    median = {name: statistics.median(v) for name, v in times.items()}
    positions = sum(b["labels"].numel() for b in batches)
    kept = sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in batches)
    vocab = task.backbone.get_output_embeddings().weight.shape[0]
    result = {"seconds_per_step": times, "median": median, "mean_loss": losses, "positions": positions,
              "kept": kept, "vocab": vocab, "batch_size": args.batch_size, "threads": torch.get_num_threads()}
    ratios = (f"step_time_ratio={median['lit-peft'] / median['labels=']:.3f} "
              f"logits_bytes_ratio={kept / positions:.3f}")
    lines = [f"SmolLM2-135M-Instruct + LoRA r=16 (all-linear), {len(batches)} GSM8K train batches of {args.batch_size}, "
             f"{args.rounds} rounds, {torch.get_num_threads()} threads", "",
             "| loss | median s/step | every round | mean loss | fp32 logits per step (MB) |", "|---|---|---|---|---|",
             *[f"| {name} | {median[name]:.3f} | {', '.join(f'{t:.3f}' for t in times[name])} | {losses[name]:.4f} | "
               f"{4 * vocab * (kept if name == 'lit-peft' else positions) / len(batches) / 2**20:.0f} |" for name in ways],
             "", ratios]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "causal_lm_loss.md").write_text("\n".join(lines) + "\n")
    (out / "causal_lm_loss.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
