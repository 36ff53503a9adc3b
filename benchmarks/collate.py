"""Padding a batch: transformers' ``DataCollatorWithPadding`` (what Trainer uses) against lit-peft's
``PadCollator`` over ``TokenColumns``, on the same random batches of SST-2 training rows (MiniLM's
tokenizer, max_length 64). Both are checked to give the same tensors first. Last line:
``collate_speedup=<DataCollatorWithPadding ms over PadCollator ms>``.

    python benchmarks/collate.py [--data_dir ../shared/data/sst2] [--batches 300] [--batch_size 32]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from transformers import DataCollatorWithPadding

    from lit_peft.backbones import load_tokenizer
    from lit_peft.data.base import PadCollator, TokenColumns
    from lit_peft.data.text_classification import read_rows

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    tokenizer = load_tokenizer("minilm")
    rows = [row for _, row in read_rows(Path(args.data_dir) / "train.tsv")]
    enc = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=64)
    labels = [int(r["label"]) for r in rows]
    lists = [{**{k: enc[k][i] for k in enc}, "labels": labels[i]} for i in range(len(rows))]  # a Trainer user's rows
    columns = TokenColumns(dict(enc), {"labels": labels})
    theirs = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    ours = PadCollator({"input_ids": tokenizer.pad_token_id}, tokenizer.padding_side)
    rng = random.Random(0)
    batches = [rng.sample(range(len(rows)), args.batch_size) for _ in range(args.batches)]
    for b in batches[:10]:
        a, c = theirs([lists[i] for i in b]), ours(columns.__getitems__(b))
        assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a), "the two collators disagree"
    ways = {"DataCollatorWithPadding": lambda b: theirs([lists[i] for i in b]),
            "PadCollator": lambda b: ours(columns.__getitems__(b))}
    ms = {}
    for name, fn in ways.items():
        for b in batches[:20]:  # warm-up
            fn(b)
        start = time.perf_counter()
        for b in batches:
            fn(b)
        ms[name] = 1000 * (time.perf_counter() - start) / len(batches)
        print(f"{name}: {ms[name]:.3f} ms a batch of {args.batch_size}")
    print(f"threads={torch.get_num_threads()} rows={len(rows)} batches={args.batches}")
    print(f"collate_speedup={ms['DataCollatorWithPadding'] / ms['PadCollator']:.1f}")


if __name__ == "__main__":
    main()
