"""Scale-out figures on this machine, in one run:

1. samples/s of a fixed LoRA job (r=8 on query and value of the packaged all-MiniLM-L6-v2, SST-2,
   batches of 32 a process, ``--steps`` optimizer steps) in one process against two DDP processes
   over gloo (``--trainer.devices 2 --trainer.strategy ddp``), each through ``lit-peft fit``; the
   ratio is two-process samples/s (both ranks' samples) over one-process samples/s. The runs
   alternate over ``--rounds`` rounds and the medians are kept;
2. the size of the checkpoint lit-peft writes (an HPC checkpoint is the same ``save_checkpoint``)
   against a full Lightning checkpoint of the same run (the same file with the whole state dict).

Results: ``benchmarks/results/scale_out.{md,json}``.

    python benchmarks/scale_out.py --data_dir ../shared/data/sst2 [--steps 60] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def fit(data_dir: str, steps: int, processes: int, folder: Path) -> dict:
    args = [sys.executable, "-m", "lit_peft.cli", "fit", "--config", str(ROOT / "configs" / "lora_sst2.yaml"),
            "--data.init_args.data_dir", data_dir, "--method.init_args.targets", "qv", "--method.init_args.dropout", "0",
            "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0", "--trainer.accelerator", "cpu",
            "--trainer.devices", str(processes), "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(folder), "--trainer.logger.init_args.name", f"p{processes}"]
    if processes > 1:
        args += ["--trainer.strategy", "ddp"]
    done = subprocess.run(args, capture_output=True, text=True, cwd=folder, env={**os.environ, "WANDB_SILENT": "true"})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    (summary,) = sorted((folder / f"p{processes}").glob("version_*/summary.json"))[-1:]
    return json.loads(summary.read_text()) | {"run": str(summary.parent)}


def checkpoint_sizes(run: Path) -> dict:
    """lit-peft's checkpoint of ``run`` against the same checkpoint holding the full state dict."""
    from lit_peft.export import load_checkpoint

    (ckpt,) = sorted((run / "checkpoints").glob("*.ckpt"))[-1:]
    task = load_checkpoint(str(ckpt))
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    full = dict(saved, state_dict=task.state_dict())
    with tempfile.NamedTemporaryFile(suffix=".ckpt") as f:
        torch.save(full, f.name)
        full_bytes = os.path.getsize(f.name)
    return {"lit_peft_checkpoint_bytes": ckpt.stat().st_size, "full_checkpoint_bytes": full_bytes,
            "trained_tensors": len(saved["state_dict"]), "all_tensors": len(full["state_dict"])}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data_dir", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    cfg = p.parse_args()
    data_dir = str(Path(cfg.data_dir).resolve())  # the runs start in a scratch folder
    rates: dict[int, list[float]] = {1: [], 2: []}
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(cfg.rounds):
            row = {}
            for processes in ((1, 2) if r % 2 == 0 else (2, 1)):
                summary = fit(data_dir, cfg.steps, processes, Path(tmp))
                rates[processes].append(summary["samples_per_s"])
                row[processes] = {k: summary[k] for k in ("samples_per_s", "train_samples", "train_time_s", "world_size")}
                last_run = Path(summary["run"])
            rounds.append(row)
            print(f"round {r}: {row}", flush=True)
        sizes = checkpoint_sizes(last_run)
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    result = {"steps": cfg.steps, "batch_per_process": 32, "rounds": rounds, "median_samples_per_s_1": one,
              "median_samples_per_s_2": two, "ratio_2_over_1": two / one, **sizes,
              "checkpoint_ratio": sizes["lit_peft_checkpoint_bytes"] / sizes["full_checkpoint_bytes"],
              "cpu_count": os.cpu_count()}
    out = ROOT / "benchmarks" / "results"
    (out / "scale_out.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Scale-out on this machine", "",
             f"`python benchmarks/scale_out.py --data_dir {cfg.data_dir} --steps {cfg.steps} --rounds {cfg.rounds}` "
             f"({os.cpu_count()} CPU cores, gloo).", "",
             "LoRA r=8 on query and value of all-MiniLM-L6-v2, SST-2, batches of 32 a process, "
             f"{cfg.steps} optimizer steps, validation off.", "",
             "| processes | samples/s (median) | per round |", "|---|---|---|",
             f"| 1 | {one:.1f} | {', '.join(f'{x:.1f}' for x in rates[1])} |",
             f"| 2 (DDP) | {two:.1f} | {', '.join(f'{x:.1f}' for x in rates[2])} |", "",
             f"Ratio two processes over one: **{two / one:.2f}**.", "",
             "| checkpoint | bytes | tensors |", "|---|---|---|",
             f"| lit-peft (what trained; HPC checkpoints are the same) | {sizes['lit_peft_checkpoint_bytes']:,} | {sizes['trained_tensors']} |",
             f"| full Lightning checkpoint (whole state dict) | {sizes['full_checkpoint_bytes']:,} | {sizes['all_tensors']} |", "",
             f"Ratio: **{result['checkpoint_ratio']:.4f}**."]
    (out / "scale_out.md").write_text("\n".join(lines) + "\n")
    print(f"ratio_2_over_1={two / one:.3f} checkpoint_ratio={result['checkpoint_ratio']:.4f}")


if __name__ == "__main__":
    main()
