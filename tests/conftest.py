"""Shared fixtures: a tiny BERT built from a config (no download), toy sentiment files, and a
helper that runs a short fit."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

H, LAYERS, INTER, POSITIONS = 32, 2, 64, 64

POSITIVE = "good great superb lovely fine wonderful moving brilliant".split()
NEGATIVE = "bad awful dull boring poor weak tedious clumsy".split()
FILLER = "the film was a story with acting and plot that felt".split()


def needs_shared(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test where the shared data is absent (a user's clone)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the project's shared reference data), which is absent in this checkout")
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """Folder with a randomly initialised 2-layer BERT (hidden 32) and the MiniLM tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from lit_peft.backbones import resolve

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve("minilm"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=H, num_hidden_layers=LAYERS,
                        num_attention_heads=4, intermediate_size=INTER, max_position_embeddings=POSITIONS,
                        num_labels=2, initializer_range=0.2)  # wider than BERT's 0.02, so random features separate
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def toy_rows(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(FILLER, 4) + rng.sample(POSITIVE if label else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """train.tsv (256 rows) and dev.tsv (64 rows) in SST-2's layout; the label follows the sentiment words."""
    folder = tmp_path_factory.mktemp("toy-sst2")
    for name, n, seed in (("train.tsv", 256, 1), ("dev.tsv", 64, 2)):
        lines = ["sentence\tlabel"] + [f"{text}\t{label}" for text, label in toy_rows(n, seed)]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def quiet_trainer(**kwargs):
    from lightning.pytorch import Trainer

    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False, num_sanity_val_steps=0, deterministic=True)
    defaults.update(kwargs)
    return Trainer(**defaults)


def seed_model_builds(seed: int = 0) -> None:
    """Seed torch each time a task builds its model (a new head, LoRA's A), so runs laid out differently
    (1 or 2 processes, accumulated or not) start from the same weights: for the torchrun workers."""
    from lit_peft.tasks.base import PeftTask

    build = PeftTask.configure_model

    def seeded(self) -> None:
        torch.manual_seed(seed)
        build(self)

    PeftTask.configure_model = seeded


def torchrun(script: Path, nproc: int, *args: str, timeout: int = 900) -> "subprocess.CompletedProcess[str]":
    """Run a test worker under ``torch.distributed.run`` with ``nproc`` CPU processes (gloo) on a free port.
    Without the suite's ``PL_GLOBAL_SEED`` (an earlier test's ``seed_everything``): Lightning's DDP reseeds
    every rank from it at setup, which one process does not, so the two would start from other weights."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_addr", "127.0.0.1", "--master_port", str(port), str(script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in os.environ.items() if k != "PL_GLOBAL_SEED"})


LLAMA_H, LLAMA_KV, LLAMA_INTER = 32, 16, 64  # hidden, key/value width (2 of 4 heads), feed-forward


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """Folder with a randomly initialised 2-layer Llama (hidden 32, grouped-query attention, tied
    embeddings) and SmolLM2's tokenizer and chat template (the packaged GGUF, converted once)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lit_peft.backbones import resolve

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(resolve("smollm2"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=LLAMA_H, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=LLAMA_INTER, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def toy_gsm8k(tmp_path_factory) -> Path:
    """train.jsonl (96) and test.jsonl (16) in GSM8K's layout: small sums with worked answers."""
    import json

    folder = tmp_path_factory.mktemp("toy-gsm8k")
    rng = random.Random(3)
    for name, n in (("train.jsonl", 96), ("test.jsonl", 16)):
        lines = []
        for _ in range(n):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            lines.append(json.dumps({"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
                                     "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}))
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


# ---- forecasting: tiny TimesFM and PatchTST built from configs, a toy hourly table ------------------
TS_CONTEXT, TS_HORIZON = 64, 32


def warm_start(model, folder: Path, steps: int = 100) -> None:
    """Train a randomly initialised forecaster briefly on sines of random period, phase and scale
    (not the toy table), then save it: a small 'pretrained' model whose fine-tuning on the toy table
    starts from forecasts that mean something, as a real fine-tune does."""
    from lit_peft.tasks import Forecasting

    task = Forecasting(backbone=None, from_config={"model_type": model.config.model_type})
    task.backbone = model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    steps_axis = torch.arange(TS_CONTEXT + TS_HORIZON, dtype=torch.float32)
    for _ in range(steps):
        period = torch.randint(6, 30, (32, 1), generator=generator).float()
        phase = torch.rand(32, 1, generator=generator) * 6.28
        series = torch.sin(2 * torch.pi * steps_axis / period + phase) * (0.5 + torch.rand(32, 1, generator=generator))
        series = series + 0.1 * torch.randn(series.shape, generator=generator)
        batch = {"past_values": series[:, :TS_CONTEXT], "future_values": series[:, TS_CONTEXT:],
                 "freq": torch.zeros(32, dtype=torch.long)}
        optimizer.zero_grad()
        task.loss(batch).backward()
        optimizer.step()
    model.eval().save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_timesfm(tmp_path_factory) -> str:
    """Folder with a randomly initialised 2-layer TimesFM (hidden 32, patches of 16, 32-step horizon)."""
    from transformers import TimesFmConfig, TimesFmModelForPrediction

    folder = tmp_path_factory.mktemp("tiny-timesfm")
    torch.manual_seed(0)
    config = TimesFmConfig(patch_length=16, context_length=TS_CONTEXT, horizon_length=TS_HORIZON, num_hidden_layers=LAYERS,
                           hidden_size=32, intermediate_size=32, head_dim=8, num_attention_heads=4)
    warm_start(TimesFmModelForPrediction(config), folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_timesfm2_5(tmp_path_factory) -> str:
    """Folder with a randomly initialised 2-layer TimesFM 2.5 (hidden 32, patches of 16, 32-step horizon)."""
    from transformers import TimesFm2_5Config, TimesFm2_5ModelForPrediction

    folder = tmp_path_factory.mktemp("tiny-timesfm2_5")
    torch.manual_seed(0)
    config = TimesFm2_5Config(patch_length=16, context_length=TS_CONTEXT, horizon_length=TS_HORIZON, num_hidden_layers=LAYERS,
                              hidden_size=32, intermediate_size=32, head_dim=8, num_attention_heads=4, num_key_value_heads=4,
                              output_quantile_len=TS_HORIZON)
    warm_start(TimesFm2_5ModelForPrediction(config), folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_patchtst(tmp_path_factory) -> str:
    """Folder with a randomly initialised 2-layer PatchTST (d_model 16, batch norm, one channel)."""
    from transformers import PatchTSTConfig, PatchTSTForPrediction

    folder = tmp_path_factory.mktemp("tiny-patchtst")
    torch.manual_seed(0)
    config = PatchTSTConfig(num_input_channels=1, context_length=TS_CONTEXT, prediction_length=TS_HORIZON, patch_length=8,
                            patch_stride=8, d_model=16, num_attention_heads=2, num_hidden_layers=LAYERS, ffn_dim=32)
    warm_start(PatchTSTForPrediction(config), folder)
    return str(folder)


@pytest.fixture(scope="session")
def toy_series(tmp_path_factory) -> Path:
    """toy.csv: 800 hourly rows of two noisy periodic series (periods 24 and 12) on different scales."""
    import numpy as np
    import pandas as pd

    folder = tmp_path_factory.mktemp("toy-series")
    n = 800
    rng = np.random.default_rng(0)
    steps = np.arange(n)
    table = pd.DataFrame({"date": pd.date_range("2020-01-01", periods=n, freq="h"),
                          "load": 10 + 3 * np.sin(2 * np.pi * steps / 24) + rng.normal(0, 0.2, n),
                          "temp": np.cos(2 * np.pi * steps / 12) + rng.normal(0, 0.2, n)})
    table.to_csv(folder / "toy.csv", index=False)
    return folder / "toy.csv"
