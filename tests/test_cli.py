"""The `lit-peft` command end to end: fit writes summary.json with every figure, test and predict
run from the checkpoint, merge and export produce loadable folders, and bad input gets one clear
message with exit status 2 and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_peft.cli import main

#: what a run of batches with an attention mask adds (a forecaster's windows have none)
TOKEN_KEYS = {"train_tokens", "tokens_per_s", "padded_tokens_per_s", "padding_ratio"}
SUMMARY_KEYS = {"method", "task", "trainable_params", "total_params", "trainable_pct", "train_time_s", "samples_per_s",
                "peak_memory_mb", "checkpoint_mb"} | TOKEN_KEYS


def write_config(folder: Path, tiny_bert: str, toy_data: Path, method: dict | None = None, **trainer) -> Path:
    config = {
        "seed_everything": 7,
        "model": {"class_path": "lit_peft.tasks.SequenceClassification",
                  "init_args": {"backbone": tiny_bert, "num_labels": 2, "learning_rate": 2e-2}},
        "data": {"class_path": "lit_peft.data.SST2Data",
                 "init_args": {"data_dir": str(toy_data), "batch_size": 32, "max_length": 16}},
        "method": method or {"class_path": "lit_peft.methods.LoRA", "init_args": {"r": 4, "alpha": 8}},
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(folder / "runs"), "name": "toy"}}, **trainer},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli(*args: str) -> None:
    try:
        main(list(args))
    except SystemExit as exit:  # LightningCLI exits 0 after --help / --print_config
        if exit.code not in (0, None):
            raise


def lit_peft(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lit_peft.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def fitted(tiny_bert, toy_data, tmp_path_factory) -> tuple[Path, Path]:
    """(config, run folder) of one `lit-peft fit` with LoRA on the toy data."""
    folder = tmp_path_factory.mktemp("cli")
    config = write_config(folder, tiny_bert, toy_data)
    cli("fit", "--config", str(config))
    return config, folder / "runs" / "toy" / "version_0"


def test_fit_writes_summary_with_every_figure(fitted) -> None:
    _, run = fitted
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["method"] == "lora" and summary["task"] == "classification"
    assert summary["trainable_params"] < summary["total_params"]
    assert summary["trainable_pct"] == pytest.approx(100 * summary["trainable_params"] / summary["total_params"], abs=1e-3)
    assert summary["train_time_s"] > 0 and summary["samples_per_s"] > 0 and summary["peak_memory_mb"] > 0
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    assert summary["checkpoint_mb"] == pytest.approx(ckpt.stat().st_size / 2**20, abs=1e-3)
    for key in ("val_loss", "val_acc", "val_f1", "train_loss_epoch"):
        assert 0 <= summary[key] <= 10, key
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()


def test_summary_counts_the_real_and_the_padded_tokens(fitted, tiny_bert, toy_data) -> None:
    """2 epochs see every training row twice: train_tokens is twice the split's tokens; the padded
    count is what the epochs' batches (grouped by length, as the run drew them) compute."""
    from lit_peft.backbones import load_tokenizer
    from lit_peft.data import SST2Data

    _, run = fitted
    summary = json.loads((run / "summary.json").read_text())
    data = SST2Data(data_dir=str(toy_data), batch_size=32, max_length=16, seed=42)
    data._tokenizer = lambda: load_tokenizer(tiny_bert)
    data.setup("fit")
    lengths = data.datasets["train"].lengths()
    assert summary["train_tokens"] == 2 * int(lengths.sum())
    padded = 0
    for epoch in (0, 1):
        sampler = data.train_dataloader().sampler
        sampler.epoch_fn, sampler.epoch = None, epoch
        order = list(sampler)
        padded += sum(len(order[i:i + 32]) * int(lengths[order[i:i + 32]].max()) for i in range(0, len(order), 32))
    assert summary["padding_ratio"] == pytest.approx(padded / summary["train_tokens"], abs=1e-4)
    assert summary["tokens_per_s"] == pytest.approx(summary["samples_per_s"] * lengths.float().mean().item(), rel=1e-3)


def test_checkpoint_is_small(fitted) -> None:
    _, run = fitted
    ckpt = torch.load(next((run / "checkpoints").glob("*.ckpt")), weights_only=False)
    saved = sum(v.numel() for v in ckpt["state_dict"].values())
    summary = json.loads((run / "summary.json").read_text())
    assert saved == summary["trainable_params"]


def test_test_and_predict_from_the_checkpoint(fitted, tmp_path) -> None:
    config, run = fitted
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    cli("test", "--config", str(config), "--ckpt_path", str(ckpt),
        "--trainer.logger.init_args.save_dir", str(tmp_path))
    summary = json.loads((tmp_path / "toy" / "version_0" / "summary.json").read_text())
    fit_summary = json.loads((run / "summary.json").read_text())
    # the dev split is both validation and test for SST-2: the restored model scores what it scored
    assert summary["test_acc"] == pytest.approx(fit_summary["val_acc"], abs=1e-6)
    # a test run reports every figure: the training ones carried in the checkpoint, the tested checkpoint's size
    assert SUMMARY_KEYS <= summary.keys() and all(summary[k] is not None for k in SUMMARY_KEYS)
    assert summary["checkpoint_mb"] == pytest.approx(ckpt.stat().st_size / 2**20, abs=1e-3)
    assert 0 < summary["train_time_s"] <= fit_summary["train_time_s"]
    assert summary["samples_per_s"] == pytest.approx(fit_summary["samples_per_s"], rel=0.2)


def test_predict_writes_jsonl(fitted, toy_data, tmp_path) -> None:
    config, run = fitted
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    texts = (toy_data / "dev.tsv").read_text().splitlines()[1:]
    (tmp_path / "unlabelled.jsonl").write_text("".join(json.dumps({"text": t.split("\t")[0]}) + "\n" for t in texts))
    cli("predict", "--config", str(config), "--ckpt_path", str(ckpt),
        "--data", "lit_peft.data.TextClassificationData", "--data.init_args.predict_file", str(tmp_path / "unlabelled.jsonl"),
        "--predictions.path", str(tmp_path / "preds.jsonl"), "--trainer.logger.init_args.save_dir", str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert len(rows) == len(texts)
    labels = [int(t.split("\t")[1]) for t in texts]
    assert all(r["pred"] in (0, 1) and abs(sum(r["probs"]) - 1) < 1e-5 for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    accuracy = sum(r["pred"] == y for r, y in zip(rows, labels)) / len(rows)
    assert accuracy == pytest.approx(summary["val_acc"], abs=1e-6)
    # the same path again: one clear message, and the first predictions are kept
    before = (tmp_path / "preds.jsonl").read_text()
    result = lit_peft("predict", "--config", str(config), "--ckpt_path", str(ckpt), "--data",
                      "lit_peft.data.TextClassificationData", "--data.init_args.predict_file",
                      str(tmp_path / "unlabelled.jsonl"), "--predictions.path", str(tmp_path / "preds.jsonl"),
                      "--trainer.logger.init_args.save_dir", str(tmp_path / "again"), cwd=tmp_path)
    assert result.returncode == 2 and "preds.jsonl' already exists" in result.stderr
    assert "Traceback" not in result.stderr and (tmp_path / "preds.jsonl").read_text() == before


def test_predictions_keep_the_file_order_though_batches_run_longest_first(fitted, tmp_path) -> None:
    """Rows of very different lengths: predicted longest first (``LengthSorted``), written in the
    file's order, with the probabilities an unsorted predict gives row by row."""
    config, run = fitted
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    texts = [" ".join(["good" if i % 2 else "awful"] * (1 + (7 * i) % 13)) for i in range(20)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = {}
    for grouped in ("true", "false"):
        cli("predict", "--config", str(config), "--ckpt_path", str(ckpt), "--data", "lit_peft.data.TextClassificationData",
            "--data.init_args.predict_file", str(tmp_path / "in.jsonl"), "--data.init_args.batch_size", "4",
            "--data.init_args.group_by_length", grouped, "--predictions.path", str(tmp_path / f"{grouped}.jsonl"),
            "--trainer.logger.init_args.save_dir", str(tmp_path / grouped))
        out[grouped] = [json.loads(line) for line in (tmp_path / f"{grouped}.jsonl").read_text().splitlines()]
    assert len(out["true"]) == len(texts)
    for sorted_row, plain_row in zip(out["true"], out["false"]):
        assert sorted_row["probs"] == pytest.approx(plain_row["probs"], abs=1e-5)
    assert len({round(r["probs"][0], 4) for r in out["true"]}) > 5  # the rows differ, so an order slip would show


def test_a_failed_predict_leaves_no_parts_and_no_half_file(fitted, tmp_path, monkeypatch) -> None:
    """A predict that fails on its third batch leaves neither its part file nor a predictions file
    (a rerun to the same path then works), and a loader without dataset indices gets one message."""
    from lit_peft.errors import ConfigError
    from lit_peft.predictions import PredictionWriter
    from lit_peft.tasks import SequenceClassification

    config, run = fitted
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": f"row {i} " * (1 + i % 5)}) + "\n" for i in range(20)))
    args = ("predict", "--config", str(config), "--ckpt_path", str(ckpt), "--data", "lit_peft.data.TextClassificationData",
            "--data.init_args.predict_file", str(tmp_path / "in.jsonl"), "--data.init_args.batch_size", "4",
            "--predictions.path", str(tmp_path / "out" / "preds.jsonl"), "--trainer.logger.init_args.save_dir",
            str(tmp_path / "logs"))
    step = SequenceClassification.predict_step

    def failing(self, batch, batch_idx, *rest):
        if batch_idx == 2:
            raise RuntimeError("out of memory (simulated)")
        return step(self, batch, batch_idx, *rest)

    with monkeypatch.context() as patch:
        patch.setattr(SequenceClassification, "predict_step", failing)
        with pytest.raises(RuntimeError, match="simulated"):
            cli(*args)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # no part, no half-written file
    cli(*args)
    assert len((tmp_path / "out" / "preds.jsonl").read_text().splitlines()) == 20
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["preds.jsonl"]
    writer = PredictionWriter(path=str(tmp_path / "other.jsonl"))
    writer.written, writer._file = tmp_path / "other.jsonl", (tmp_path / ".part").open("w")
    with pytest.raises(ConfigError, match="no dataset indices"):
        writer.write_on_batch_end(None, None, {"pred": [1]}, None, None, 0, 0)


def test_merge_and_export_commands(fitted, tmp_path, tiny_bert) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    _, run = fitted
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    cli("merge", "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "merged"))
    cli("export", "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "adapter"))
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    inputs = {"input_ids": torch.tensor([[101, 2204, 3185, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    adapted = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_bert),
                                        tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (merged(**inputs).logits - adapted(**inputs).logits).abs().max() < 1e-4


def test_merge_refuses_to_overwrite(fitted, tmp_path) -> None:
    _, run = fitted
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("earlier results")
    result = lit_peft("merge", "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "taken"), cwd=tmp_path)
    assert result.returncode == 2
    assert "not empty" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "taken" / "keep.txt").read_text() == "earlier results"


def test_a_second_run_does_not_overwrite_the_first(fitted) -> None:
    config, run = fitted
    before = {p: p.read_bytes() for p in (run / "checkpoints").glob("*.ckpt")}
    cli("fit", "--config", str(config), "--trainer.max_epochs", "1")
    assert (run.parent / "version_1" / "summary.json").is_file()
    assert {p: p.read_bytes() for p in (run / "checkpoints").glob("*.ckpt")} == before


def test_help_and_print_config(capsys) -> None:
    cli("--help")
    out = capsys.readouterr().out
    assert "fit" in out and "merge" in out and "export" in out
    cli("fit", "--config", "configs/dora_sst2.yaml", "--print_config")
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["method"]["class_path"] == "lit_peft.methods.DoRA"
    assert printed["method"]["init_args"]["r"] == 8
    assert printed["report"]["enabled"] is True


@pytest.mark.parametrize("change, message", [
    ({"method": {"class_path": "lit_peft.methods.LoRA", "init_args": {"r": 4, "targets": ["qeury"]}}},
     "unknown target module 'qeury'"),
    ({"method": {"class_path": "lit_peft.methods.NoSuchMethod"}}, "NoSuchMethod"),
    ({"data": {"init_args": {"data_dir": "/nonexistent/sst2"}}}, "SST-2 folder '/nonexistent/sst2' does not exist"),
    ({"model": {"init_args": {"num_labels": 2, "learning_rat": 0.1}}}, "learning_rat"),
    ({"model": {"init_args": {"backbone": "./no/such/folder"}}}, "does not exist"),
])
def test_bad_config_gets_one_clear_message(change, message, tiny_bert, toy_data, tmp_path) -> None:
    config = yaml.safe_load(write_config(tmp_path, tiny_bert, toy_data).read_text())
    for key, value in change.items():
        if "init_args" in value and "class_path" not in value:
            config[key]["init_args"].update(value["init_args"])
        else:
            config[key] = value
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    result = lit_peft("fit", "--config", str(tmp_path / "bad.yaml"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "runs").glob("**/*.ckpt"))


def test_label_outside_num_labels_names_the_row(tiny_bert, toy_data, tmp_path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rows = (toy_data / "train.tsv").read_text().splitlines()
    rows[5] = rows[5].rsplit("\t", 1)[0] + "\t3"
    (data / "train.tsv").write_text("\n".join(rows) + "\n")
    (data / "dev.tsv").write_text((toy_data / "dev.tsv").read_text())
    config = write_config(tmp_path, tiny_bert, data)
    result = lit_peft("fit", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "train.tsv:6: label 3 is outside the model's num_labels=2" in result.stderr
    assert "Traceback" not in result.stderr


def write_gsm8k_config(folder: Path, tiny_llama: str, toy_gsm8k: Path, max_steps: int, limit_eval_rows: int,
                       **generation) -> Path:
    """A LoRA run of the tiny Llama on the toy GSM8K rows, logging to ``folder/runs/gsm``."""
    config = {
        "seed_everything": 3,
        "model": {"class_path": "lit_peft.tasks.CausalLM",
                  "init_args": {"backbone": tiny_llama, "learning_rate": 1e-2, **generation}},
        "data": {"class_path": "lit_peft.data.GSM8KData",
                 "init_args": {"data_dir": str(toy_gsm8k), "val_size": 8, "max_length": 96, "batch_size": 8,
                               "limit_eval_rows": limit_eval_rows}},
        "method": {"class_path": "lit_peft.methods.LoRA", "init_args": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}},
        "trainer": {"max_steps": max_steps, "accelerator": "cpu", "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(folder / "runs"), "name": "gsm"}}},
    }
    path = folder / "gsm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_causal_lm_fit_test_and_predict_from_the_command_line(tiny_llama, toy_gsm8k, tmp_path) -> None:
    path = write_gsm8k_config(tmp_path, tiny_llama, toy_gsm8k, max_steps=3, limit_eval_rows=8, max_new_tokens=6,
                              do_sample=True, temperature=1.0)
    cli("fit", "--config", str(path))
    run = tmp_path / "runs" / "gsm" / "version_0"
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    cli("test", "--config", str(path), "--ckpt_path", str(ckpt))
    tested = json.loads((tmp_path / "runs" / "gsm" / "version_1" / "summary.json").read_text())
    assert 0.0 <= tested["test_exact_match"] <= 1.0 and tested["method"] == "lora" and tested["task"] == "causal_lm"
    cli("predict", "--config", str(path), "--ckpt_path", str(ckpt), "--predictions.path", str(tmp_path / "gen.jsonl"))
    rows = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert len(rows) == 8  # the test split (limit_eval_rows of it): predict falls back to it
    assert set(rows[0]) == {"prompt", "generation", "reference", "answer"}
    assert rows[0]["prompt"].startswith("Solve the math problem") and rows[0]["reference"].isdigit()


def test_wandb_runs_each_get_their_own_folder(tiny_bert, toy_data, tmp_path, monkeypatch) -> None:
    """W&B's logger has no versioned log_dir: config.yaml, summary.json and checkpoints of each run
    still land in a folder of its own (save_dir/project/run id), and a second run does not collide."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    logger = {"class_path": "lightning.pytorch.loggers.WandbLogger",
              "init_args": {"project": "toy", "save_dir": str(tmp_path / "wb"), "offline": True}}
    (tmp_path / "cfg").mkdir()
    config = write_config(tmp_path / "cfg", tiny_bert, toy_data, max_epochs=1, limit_train_batches=2)
    for _ in range(2):
        cli("fit", "--config", str(config), "--trainer.logger", json.dumps(logger))
        import wandb

        wandb.finish()
    runs = sorted(p.parent for p in (tmp_path / "wb" / "toy").glob("*/summary.json"))
    assert len(runs) == 2
    for run in runs:
        assert (run / "config.yaml").is_file() and list((run / "checkpoints").glob("*.ckpt"))
        assert json.loads((run / "summary.json").read_text())["stages"] == ["fit"]
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "summary.json").exists()


USER_PROJECT = '''
import torch
import lightning as L
from torch.utils.data import DataLoader, TensorDataset

from lit_peft.tasks import SequenceClassification


class TinyRegression(L.LightningModule):
    """A plain LightningModule of a user's own: no backbone, no lit-peft method."""

    def __init__(self, width: int = 4, lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(width, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x).squeeze(-1), y)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.training_step(batch, batch_idx))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class LineData(L.LightningDataModule):
    def __init__(self, rows: int = 64):
        super().__init__()
        x = torch.randn(rows, 4, generator=torch.Generator().manual_seed(0))
        self.data = TensorDataset(x, x.sum(-1))

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=16)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=16)


class MarkedClassifier(SequenceClassification):
    """A user's subclass of a lit-peft task: it counts its training steps."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps_seen = 0

    def training_step(self, batch, batch_idx):
        self.steps_seen += 1
        self.log("steps_seen", float(self.steps_seen))
        return super().training_step(batch, batch_idx)
'''


def test_a_users_own_classes_plug_in_by_class_path(tiny_bert, toy_data, tmp_path) -> None:
    (tmp_path / "my_project.py").write_text(USER_PROJECT)
    plain = {"seed_everything": 1, "model": {"class_path": "my_project.TinyRegression", "init_args": {"lr": 0.1}},
             "data": {"class_path": "my_project.LineData"}, "method": None,
             "trainer": {"max_epochs": 2, "accelerator": "cpu", "enable_progress_bar": False,
                         "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                    "init_args": {"save_dir": "runs", "name": "plain"}}}}
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(plain))
    result = lit_peft("fit", "--config", "plain.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "runs" / "plain" / "version_0" / "summary.json").read_text())
    assert summary["trainable_params"] == 5 and summary["task"] == "TinyRegression" and "val_loss" in summary

    config = yaml.safe_load(write_config(tmp_path, tiny_bert, toy_data, max_epochs=1).read_text())
    config["model"]["class_path"] = "my_project.MarkedClassifier"
    (tmp_path / "subclass.yaml").write_text(yaml.safe_dump(config))
    result = lit_peft("fit", "--config", "subclass.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "runs" / "toy" / "version_0" / "summary.json").read_text())
    assert summary["method"] == "lora" and summary["steps_seen"] == 8  # 256 toy rows / batch 32, LoRA applied
