"""ETTh1 forecasting benchmark: seasonal naive, the offline-pretrained timesfm-small zero-shot, and
after linear probing, LoRA, DoRA and full fine-tuning.

Context 128, fine-tuned on 128-step horizons, scored on the first 96 steps of every test window
(stride 1), split 60 / 20 / 20 by time, on the normalised scale (the training rows' statistics),
for target ``OT`` alone (univariate), for all seven channels (each a univariate series), and with
``--settings ot_cov`` for OT with covariates (the six load columns past-only, hour and weekday ahead;
``benchmarks/covariates.py`` compares settings over seeds). Each
fine-tune and each test runs its config from ``configs/`` in its own ``lit-peft`` process, so peak
memory is per run. The seasonal naive forecast repeats the context's last day (24 values).

    python benchmarks/ett.py [--epochs 3] [--backbone timesfm-small] [--settings ot all] [--name ett]

Runs on ``timesfm-small`` (shipped in ``lit_peft/weights``; a copy re-pretrained with
``configs/pretrain_timesfm_small.yaml`` comes first) or ``--backbone`` another TimesFM (``google/timesfm-2.0-500m-pytorch`` where the hub is reachable).
Writes ``benchmarks/results/<name>.md`` and ``.json`` after each run; the last line printed is
``naive_mse=<a> zero_shot_mse=<b> lora_mse=<c> linear_probe_mse=<d> full_mse=<e>`` for ``OT``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["linear_probe", "lora", "dora", "full"]
SETTINGS = {"ot": ["--data.init_args.target_columns", "[OT]"], "all": ["--data.init_args.target_columns", "null"],
            # OT with the six load columns as past-only covariates (ETT's "MS") and calendar features, by the encoder
            "ot_cov": ["--data.init_args.target_columns", "[OT]", "--data.init_args.past_covariates",
                       "[HUFL,HULL,MUFL,MULL,LUFL,LULL]", "--data.init_args.calendar", "[hour_of_day,day_of_week]"]}


def seasonal_naive(data_dir: str, target: str, season: int = 24) -> dict:
    """Test scores of repeating each context's last ``season`` values over the 96-step horizon (a point
    forecast: its CRPS is its MAE, its WQL the absolute error over the absolute values)."""
    import torch

    from lit_peft.data import ForecastingData
    from lit_peft.tasks.forecast_metrics import MASE, QuantileScores

    data = ForecastingData(data_dir=data_dir, target_columns=None if target == "all" else ["OT"], context_len=128,  # ot_cov: OT
                           horizon_len=128, eval_horizon_len=96, eval_batch_size=512)
    data.setup("test")
    squared = absolute = count = 0.0
    mase, quantile = MASE(), QuantileScores()
    for batch in data.test_dataloader():
        last_day = batch["past_values"][:, -season:]
        forecast = last_day.repeat(1, -(-96 // season))[:, :96]
        target = batch["future_values"]
        error = forecast - target
        squared += float((error ** 2).sum())
        absolute += float(error.abs().sum())
        count += error.numel()
        mase.update(forecast, target, batch["past_values"], batch["season"])
        scale, loc = batch["scale"][:, None], batch["loc"][:, None]
        quantile.update(forecast[..., None], target, torch.tensor([0.5]), (forecast * scale + loc)[..., None],
                        target * scale + loc)
    scores = quantile.compute()
    return {"method": "seasonal naive", "test_mse": squared / count, "test_mae": absolute / count,
            "test_mase": float(mase.compute()), "test_crps": float(scores["crps"]), "test_wql": float(scores["wql"]),
            "trainable_params": 0, "trainable_pct": 0.0, "train_time_s": 0.0, "peak_memory_mb": None}


def lit_peft(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lit_peft.cli", *args], check=True, cwd=ROOT)


def latest_summary(save_dir: Path, name: str) -> dict:
    summaries = sorted((save_dir / name).glob("version_*/summary.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(summaries[-1].read_text())


def run(method: str, setting: str, args, save_dir: Path) -> dict:
    """Fit ``configs/<method>_etth1.yaml`` (or none: zero-shot), then test; the summary of both."""
    config = ROOT / "configs" / f"{'full' if method == 'zero-shot' else method}_etth1.yaml"
    name = f"{method}_{setting}"
    common = ["--config", str(config), "--data.init_args.data_dir", args.data_dir, *SETTINGS[setting],
              "--model.init_args.backbone", args.backbone, "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.logger.init_args.name", name]
    started = time.time()
    if method == "zero-shot":
        lit_peft("test", *common)
        summary = latest_summary(save_dir, name)
        summary.update(method="zero-shot", trainable_params=0, trainable_pct=0.0, train_time_s=0.0)
    else:
        lit_peft("fit", *common, "--trainer.max_epochs", str(args.epochs))
        fitted = latest_summary(save_dir, name)
        run_dir = sorted((save_dir / name).glob("version_*"), key=lambda p: p.stat().st_mtime)[-1]
        ckpt = sorted((run_dir / "checkpoints").glob("*.ckpt"))[-1]
        lit_peft("test", *common, "--ckpt_path", str(ckpt))
        summary = {**fitted, **latest_summary(save_dir, name)}
        summary["peak_memory_mb"] = fitted["peak_memory_mb"]  # training's, not the test process's
    summary.update(setting=setting, epochs=0 if method == "zero-shot" else args.epochs, wall_s=round(time.time() - started, 1))
    return summary


def table(rows: list[dict]) -> str:
    lines = ["| setting | method | epochs | test MSE | test MAE | MASE | CRPS | WQL | trainable params | trainable % | "
             "train time (s) | peak RSS (MB) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    score = lambda r, k: f"{r[k]:.4f}" if r.get(k) is not None else "-"  # noqa: E731
    for r in rows:
        memory = f"{r['peak_memory_mb']:.0f}" if r.get("peak_memory_mb") else "-"
        lines.append(f"| {r['setting']} | {r['method']} | {r.get('epochs', 0)} | {r['test_mse']:.4f} | {r['test_mae']:.4f} | "
                     f"{score(r, 'test_mase')} | {score(r, 'test_crps')} | {score(r, 'test_wql')} | "
                     f"{r['trainable_params']:,} | {r['trainable_pct']:.2f} | {r['train_time_s']:.0f} | {memory} |")
    return "\n".join(lines)


def summary_line(rows: list[dict], setting: str) -> str:
    mse = {r["method"]: r["test_mse"] for r in rows if r["setting"] == setting}
    keys = [("naive", "seasonal naive"), ("zero_shot", "zero-shot"), ("lora", "lora"), ("linear_probe", "linear_probe"),
            ("full", "full")]
    line = " ".join(f"{k}_mse={mse[m]:.4f}" for k, m in keys if m in mse)
    return line + (f" dora_mse={mse['dora']:.4f}" if "dora" in mse and setting != "ot" else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "ett"))
    parser.add_argument("--backbone", default="timesfm-small")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=["ot", "all"], choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", default="ett")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_dir = out / "runs" / f"{args.name}_{time.strftime('%Y%m%d-%H%M%S')}"
    rows: list[dict] = []
    header = (f"ETTh1, context 128, test horizon 96 (fine-tuned on 128), split 60/20/20, normalised scale; backbone "
              f"{args.backbone}; CPU, each run in its own process\n\n")
    for setting in sorted(args.settings, key=lambda s: s != "ot"):
        rows.append({**seasonal_naive(args.data_dir, setting), "setting": setting})
        for method in ["zero-shot", *args.methods]:
            rows.append(run(method, setting, args, save_dir))
            (out / f"{args.name}.md").write_text(header + table(rows) + "\n")  # kept after every run
            (out / f"{args.name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))
    for setting in sorted(args.settings, key=lambda s: s == "ot"):  # OT's line last
        print(f"[{setting}] " if setting != "ot" else "", end="")
        print(summary_line(rows, setting))


if __name__ == "__main__":
    main()
