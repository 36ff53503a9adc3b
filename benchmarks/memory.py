"""Memory benchmark: where the bytes of a training step go, per method, on all-MiniLM-L6-v2.

For full fine-tuning, LoRA, QLoRA, GaLore, SIFT, RoSA and Houlsby, each in its own process (so
peak memory is its own): three training steps through lit-peft on SST-2 batches (32 sentences,
max_length 64), then the bytes of the weights (4-bit weights with their quantization state), of
the gradients, and of the optimizer state, and the process's peak memory (RSS on a CPU, CUDA max
allocated on a GPU). Prints a table and, last,

    qlora_weight_ratio=<a> galore_optimizer_ratio=<b> sift_optimizer_ratio=<c>

a: the quantized linear layers' bytes (packed 4-bit weights + quantization state) over the same
layers' fp32 bytes; b, c: GaLore's and SIFT's optimizer-state bytes over AdamW's for full
fine-tuning. The whole model's weight bytes are in the table too (MiniLM's embeddings, half its
parameters, stay in full precision under QLoRA).

    python benchmarks/memory.py [--methods full lora qlora ...] [--accelerator cpu|gpu]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = {
    "full": ("FullFineTune", {}),
    "lora": ("LoRA", {"r": 8, "alpha": 16}),
    "qlora": ("QLoRA", {"r": 8, "alpha": 16}),
    "galore": ("GaLore", {"rank": 64, "scale": 1.0}),
    "sift": ("SIFT", {"density": 0.05, "selection_batches": 2}),
    "rosa": ("RoSA", {"r": 8, "alpha": 16, "density": 0.01, "selection_batches": 2}),
    "houlsby": ("Houlsby", {"bottleneck": 64}),
}
STEPS = 3


def measure(name: str, data_dir: str, accelerator: str) -> dict:
    """Run in a fresh process: three steps of ``name``, then the byte counts."""
    import bitsandbytes as bnb
    from lightning.pytorch import Callback, Trainer, seed_everything

    from lit_peft import methods
    from lit_peft.data import SST2Data
    from lit_peft.metrics import optimizer_state_bytes, peak_memory_mb, tensor_bytes, weight_bytes
    from lit_peft.tasks import SequenceClassification

    seed_everything(0)
    cls, kwargs = METHODS[name]
    task = SequenceClassification(backbone="minilm", num_labels=2, learning_rate=1e-4)
    data = SST2Data(data_dir=data_dir, batch_size=32, max_length=64, limit_train_rows=32 * STEPS)
    figures: dict = {"method": name}

    class Count(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            figures["gradient_bytes"] = tensor_bytes(p.grad for p in pl_module.parameters() if p.grad is not None)

    method = getattr(methods, cls)(**kwargs)
    trainer = Trainer(accelerator=accelerator, devices=1, max_steps=STEPS, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[method, Count()])
    trainer.fit(task, datamodule=data)
    quantized = [m for m in task.modules() if isinstance(m, bnb.nn.Linear4bit)]
    figures.update(
        weight_bytes=weight_bytes(task),
        trainable_params=sum(p.numel() for p in task.parameters() if p.requires_grad),
        optimizer_bytes=optimizer_state_bytes(trainer.optimizers[0]),
        peak_mb=round(peak_memory_mb(trainer.strategy.root_device), 1),
        quantized_bytes=sum(weight_bytes(m) - (tensor_bytes([m.bias]) if m.bias is not None else 0) for m in quantized),
        quantized_fp32_bytes=sum(4 * m.in_features * m.out_features for m in quantized),
    )
    return figures


def table(rows: list[dict]) -> str:
    mb = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    lines = ["| method | trainable params | weights (MB) | gradients (MB) | optimizer state (MB) | process peak (MB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {mb(r['weight_bytes'])} | {mb(r['gradient_bytes'])} | "
                     f"{mb(r['optimizer_bytes'])} | {r['peak_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one method in this process
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if args.one:
        print("MEASURED " + json.dumps(measure(args.one, args.data_dir, args.accelerator)))
        return
    rows = []
    for name in args.methods:
        cmd = [sys.executable, __file__, "--one", name, "--data_dir", args.data_dir, "--accelerator", args.accelerator]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        rows.append(json.loads(next(line for line in out.splitlines() if line.startswith("MEASURED "))[9:]))
    by = {r["method"]: r for r in rows}
    text = table(rows)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ratios, notes = {}, []
    if "qlora" in by:
        q = by["qlora"]
        ratios["qlora_weight_ratio"] = q["quantized_bytes"] / q["quantized_fp32_bytes"]
        if "lora" in by:
            notes.append(f"whole model weights, qlora over lora: {q['weight_bytes'] / by['lora']['weight_bytes']:.3f} "
                         f"({q['weight_bytes'] / 2**20:.1f} MB vs {by['lora']['weight_bytes'] / 2**20:.1f} MB)")
    if "full" in by:
        for name in ("galore", "sift"):
            if name in by:
                ratios[f"{name}_optimizer_ratio"] = by[name]["optimizer_bytes"] / by["full"]["optimizer_bytes"]
    notes.append(" ".join(f"{k}={v:.3f}" for k, v in ratios.items()))
    print("\n".join(notes))
    (out / "memory.md").write_text(f"all-MiniLM-L6-v2, batch 32 x 64 tokens, {args.accelerator}; process peak = peak RSS "
                                   "(CUDA: max allocated) of the whole process: imports, loading, mask selection and "
                                   f"three steps\n\n{text}\n\n" + "\n\n".join(notes) + "\n")
    (out / "memory.json").write_text(json.dumps({"rows": rows, "ratios": ratios}, indent=2) + "\n")


if __name__ == "__main__":
    main()
