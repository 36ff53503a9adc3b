"""Forecasting with covariates against without: LoRA on timesfm-small, the same budget and seeds.

For the oil temperature (OT) of ETTh1 and of ETTh2 (no setting was tuned on ETTh2), each setting
fine-tunes ``configs/lora_etth1.yaml`` (3 epochs, context 128, test horizon 96, split 60/20/20)
and tests it, once per seed:

- ``none``: OT alone (the univariate benchmark of ``benchmarks/ett.py``);
- ``encoder``: OT with the six load columns as past-only covariates (ETT's "MS" setting) and the hour
  of day and day of week as known-future ones, read by the covariate encoder;
- ``encoder_calendar``: the calendar features alone, by the encoder (the same inputs XReg can use);
- ``xreg``: the calendar features by TimesFM's in-context regression (XReg cannot read past-only ones).

    python benchmarks/covariates.py [--seeds 1 2 3] [--datasets ETTh1 ETTh2] [--name covariates]

Writes ``benchmarks/results/<name>.md`` and ``.json`` after each run: every run's test MSE, MAE,
MASE, CRPS and WQL, and per dataset and setting the mean ± std over seeds with Welch's test against
``none``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from ett import ROOT, latest_summary, lit_peft

LOADS = "[HUFL,HULL,MUFL,MULL,LUFL,LULL]"
CALENDAR = "[hour_of_day,day_of_week]"
SETTINGS = {
    "none": [],
    "encoder": ["--data.init_args.past_covariates", LOADS, "--data.init_args.calendar", CALENDAR],
    "encoder_calendar": ["--data.init_args.calendar", CALENDAR],
    "xreg": ["--data.init_args.calendar", CALENDAR, "--model.init_args.covariates", "xreg"],
}
SCORES = ("test_mse", "test_mae", "test_mase", "test_crps", "test_wql")


def run(dataset: str, setting: str, seed: int, args, save_dir: Path) -> dict:
    name = f"{dataset}_{setting}_seed{seed}"
    common = ["--config", str(ROOT / "configs" / "lora_etth1.yaml"), "--data.init_args.data_dir", args.data_dir,
              "--data.init_args.dataset", dataset, *SETTINGS[setting], "--seed_everything", str(seed),
              "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(save_dir),
              "--trainer.logger.init_args.name", name]
    started = time.time()
    lit_peft("fit", *common)
    fitted = latest_summary(save_dir, name)
    run_dir = sorted((save_dir / name).glob("version_*"), key=lambda p: p.stat().st_mtime)[-1]
    lit_peft("test", *common, "--ckpt_path", str(sorted((run_dir / "checkpoints").glob("*.ckpt"))[-1]))
    summary = {**fitted, **latest_summary(save_dir, name)}
    summary.update(dataset=dataset, setting=setting, seed=seed, wall_s=round(time.time() - started, 1))
    return summary


def tables(rows: list[dict]) -> str:
    from scipy.stats import ttest_ind

    lines = ["| dataset | setting | seeds | " + " | ".join(s.removeprefix("test_").upper() + " (mean ± std)" for s in SCORES)
             + " | Δ MSE vs none (Welch p) | trainable params | train time (s) |", "|" + "---|" * (len(SCORES) + 6)]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        reference = [r["test_mse"] for r in rows if r["dataset"] == dataset and r["setting"] == "none"]
        for setting in SETTINGS:
            group = [r for r in rows if r["dataset"] == dataset and r["setting"] == setting]
            if not group:
                continue
            cells = []
            for score in SCORES:
                values = [r[score] for r in group if r.get(score) is not None]
                spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
                cells.append(f"{statistics.fmean(values):.4f}{spread}" if values else "-")
            mse = [r["test_mse"] for r in group]
            if setting != "none" and len(mse) > 1 and len(reference) > 1:
                p = ttest_ind(mse, reference, equal_var=False).pvalue
                delta = f"{statistics.fmean(mse) - statistics.fmean(reference):+.4f} (p={p:.3f})"
            else:
                delta = "reference" if setting == "none" else "-"
            lines.append(f"| {dataset} | {setting} | {len(group)} | " + " | ".join(cells) + f" | {delta} | "
                         f"{group[0]['trainable_params']:,} | {statistics.fmean(r['train_time_s'] for r in group):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "ett"))
    parser.add_argument("--datasets", nargs="+", default=["ETTh1", "ETTh2"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", default="covariates")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_dir = out / "runs" / f"{args.name}_{time.strftime('%Y%m%d-%H%M%S')}"
    header = ("LoRA on timesfm-small, OT with and without covariates (configs/lora_etth1.yaml: 3 epochs, context 128, "
              "test horizon 96, split 60/20/20, normalised scale); CPU, each run in its own process\n\n")
    rows: list[dict] = []
    for seed in args.seeds:  # a whole seed at a time: a stopped run still compares every setting
        for dataset in args.datasets:
            for setting in args.settings:
                rows.append(run(dataset, setting, seed, args, save_dir))
                (out / f"{args.name}.md").write_text(header + tables(rows) + "\n")
                (out / f"{args.name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(tables(rows))


if __name__ == "__main__":
    main()
