"""The GPU run, prepared: every GPU path of lit-peft for a fixed number of steps on one CUDA GPU.

    bash benchmarks/gpu_check.sh                  # SmolLM2-135M on ../shared/data/gsm8k, ~5 min on an H100
    python benchmarks/gpu_check.py --cpu --backbone <folder> --steps 2   # the same paths on the CPU (the test)

Each case fits ``CausalLM`` with one method under bf16-mixed (the GPU preset's settings: TF32, no deterministic
kernels) and reports tokens/s and MFU (Lightning's ``ThroughputMonitor``, with 6 x parameters x tokens as the
FLOPs of a step), peak GPU memory, and what the checkpoint holds. Cases: LoRA, DoRA, QLoRA (bf16 compute),
GaLore, Houlsby, SIFT; LoRA under FSDP2 (``ModelParallelStrategy``) and full fine-tuning under FSDP1
(``FSDPStrategy``: on one process lit-peft refuses FSDP1 with frozen weights, see docs/scaling-out.md), LoRA
with ``compile: true``. Then LoRA is fitted 2 x steps with a checkpoint half way, resumed from it, and the
trained weights compared. Results: a JSON file (``--out``) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def cases(cpu: bool) -> list[tuple[str, dict, str]]:
    from lit_peft import methods

    rows = [
        ("lora", {}, "LoRA"), ("dora", {}, "DoRA"), ("galore", {}, "GaLore"), ("houlsby", {}, "Houlsby"),
        ("sift", {}, "SIFT"), ("qlora", {}, "QLoRA"), ("lora-fsdp2", {"strategy": "fsdp2"}, "LoRA"),
        ("full-fsdp1", {"strategy": "fsdp1"}, "FullFineTune"), ("lora-compile", {"compile": True}, "LoRA"),
    ]
    small = 4 if cpu else 64  # the CPU check runs a tiny model
    make = {"LoRA": lambda: methods.LoRA(r=16, alpha=32, targets="all-linear"), "DoRA": lambda: methods.DoRA(r=16, alpha=32),
            "GaLore": lambda: methods.GaLore(rank=small, update_proj_gap=50), "Houlsby": lambda: methods.Houlsby(bottleneck=small),
            "SIFT": lambda: methods.SIFT(density=0.01, selection_batches=2), "QLoRA": lambda: methods.QLoRA(r=16, alpha=32),
            "FullFineTune": methods.FullFineTune}
    if cpu:  # bitsandbytes and FSDP1 need a GPU for what this script measures; compile takes minutes on a CPU
        rows = [r for r in rows if r[0] not in ("qlora", "full-fsdp1", "lora-compile")]
    return [(name, opts, make[cls]) for name, opts, cls in rows]


def strategy(kind: str | None, cpu: bool):
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if kind == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1, save_distributed_checkpoint=False,
                                     process_group_backend="gloo" if cpu else None)
    if kind == "fsdp1":
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        return FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, state_dict_type="full")
    return "auto"


def last_logged(csv_file: Path) -> dict[str, float]:
    """The last value of each column of a CSVLogger's metrics.csv."""
    import csv

    found: dict[str, float] = {}
    if csv_file.is_file():
        for row in csv.DictReader(csv_file.open()):
            found.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return found


def fit(args, name: str, opts: dict, make_method, folder: Path, steps: int, ckpt_path=None, every: int = 0) -> dict:
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor
    from lightning.pytorch.loggers import CSVLogger

    from lit_peft.data import GSM8KData
    from lit_peft.tasks import CausalLM

    task = CausalLM(backbone=args.backbone, learning_rate=2e-4, compile=opts.get("compile", False), max_new_tokens=8)
    data = GSM8KData(data_dir=args.data_dir, batch_size=args.batch_size, max_length=args.max_length, tokenizer=args.backbone,
                     val_size=8, limit_train_rows=args.batch_size * steps * 2)
    monitor = ThroughputMonitor(batch_size_fn=lambda b: b["input_ids"].shape[0],
                                length_fn=lambda b: int(b["attention_mask"].sum()), window_size=max(2, steps // 2))
    callbacks = [make_method(), monitor]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=every, save_top_k=-1))
    trainer = Trainer(accelerator="cpu" if args.cpu else "gpu", devices=1, precision="bf16-mixed", max_steps=steps,
                      strategy=strategy(opts.get("strategy"), args.cpu), deterministic=False, logger=CSVLogger(str(folder)),
                      enable_checkpointing=bool(every), limit_val_batches=0, enable_progress_bar=False,
                      enable_model_summary=False, log_every_n_steps=1, default_root_dir=str(folder), callbacks=callbacks)
    if not args.cpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()

    trainer.fit(task, datamodule=data, ckpt_path=ckpt_path)
    seconds = time.perf_counter() - start
    metrics = last_logged(Path(trainer.logger.log_dir) / "metrics.csv")  # ThroughputMonitor's, via the CSV logger
    params = sum(p.numel() for p in task.parameters())
    tokens_per_s = next((v for k, v in metrics.items() if k.endswith("device/items_per_sec")), None)
    peak = torch.cuda.max_memory_allocated() / 2**20 if not args.cpu else None
    flops = 6 * params * tokens_per_s if tokens_per_s else None
    available = None
    if not args.cpu:
        from lightning.fabric.utilities.throughput import get_available_flops

        available = get_available_flops(torch.device("cuda"), torch.bfloat16)
    return {"case": name, "steps": trainer.global_step, "seconds": round(seconds, 1), "tokens_per_s": tokens_per_s,
            "mfu": (flops / available) if flops and available else None, "peak_gpu_mb": peak,
            "trainable": sum(p.numel() for p in task.parameters() if p.requires_grad), "params": params,
            "checkpoint_keys": len(task.trained_keys()), "task": task}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smollm2")
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "gsm8k"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--cpu", action="store_true", help="run the same paths on the CPU (a check, not a benchmark)")
    parser.add_argument("--only", nargs="*", help="case names to run")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; use --cpu to check the paths on the CPU", file=sys.stderr)
        return 2
    torch.set_float32_matmul_precision("high")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, opts, make in cases(args.cpu):
            if args.only and name not in args.only:
                continue
            row = fit(args, name, opts, make, Path(tmp) / name, args.steps)
            row.pop("task")
            rows.append(row)
            print(json.dumps(row), flush=True)
        # exact resume: 2 x steps straight, against steps + resumed steps from the half-way checkpoint
        from lit_peft import methods

        lora = lambda: methods.LoRA(r=16, alpha=32, dropout=0.0)  # noqa: E731
        folder = Path(tmp) / "resume"
        whole = fit(args, "resume-whole", {}, lora, folder, 2 * args.steps, every=args.steps)["task"]
        resumed = fit(args, "resume-second-half", {}, lora, Path(tmp) / "resumed", 2 * args.steps,
                      ckpt_path=str(folder / f"step={args.steps}.ckpt"))["task"]
        keys = whole.trained_keys()
        a = {k: v for k, v in whole.state_dict().items() if k in keys}
        b = {k: v for k, v in resumed.state_dict().items() if k in keys}
        diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        rows.append({"case": "resume", "max_abs_difference": diff, "tensors": len(a)})
        print(json.dumps(rows[-1]), flush=True)
    device = "cpu" if args.cpu else torch.cuda.get_device_name()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": device, "steps": args.steps, "batch_size": args.batch_size,
                                          "backbone": args.backbone, "rows": rows}, indent=1) + "\n")
    print(f"| case | tokens/s | MFU | peak GPU MB | trainable | checkpoint tensors | ({device})")
    for r in rows:
        if "tokens_per_s" in r:
            mfu = f"{r['mfu']:.3f}" if r["mfu"] else "-"
            print(f"| {r['case']} | {r['tokens_per_s'] or 0:.0f} | {mfu} | {r['peak_gpu_mb'] or '-'} | {r['trainable']:,} | {r['checkpoint_keys']} |")
    print(f"resume: max |difference| {rows[-1]['max_abs_difference']:.3g} over {rows[-1]['tensors']} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
