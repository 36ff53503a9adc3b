"""Run by ``test_eval_shards.py`` under ``torchrun`` with 1 and with 2 processes (gloo): each task is
evaluated on a row count that 2 does not divide, and rank 0 writes the logged metrics to a JSON file.
Equal figures from both runs mean every row was scored exactly once (Lightning's padding sampler
scores one row twice on one rank).

The tiny random Llama never answers a problem or writes a summary, so generation-scored metrics would
be 0 on every row and could not tell; ``HalfRight`` runs the real generation, then replaces the output
of the rows whose reference is even (GSM8K) or whose length is even (summaries) with the reference
(ROUGE of a summary cut to its first half elsewhere), so rows score differently and a row counted
twice shows."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from conftest import quiet_trainer, seed_model_builds  # noqa: E402

seed_model_builds()  # every layout starts from the same weights
from lit_peft.data import ForecastingData, GSM8KData, SST2Data, SummarizationData  # noqa: E402
from lit_peft.tasks import CausalLM, Forecasting, SequenceClassification  # noqa: E402


class HalfRight(CausalLM):
    def generate(self, batch, sample=False):
        made = super().generate(batch, sample)
        out = []
        for generation, reference in zip(made, batch["references"]):
            if self.metric_name == "exact_match":
                out.append(f"#### {reference}" if int(reference) % 2 == 0 else generation)
            else:
                words = reference.split()
                out.append(reference if len(words) % 2 == 0 else " ".join(words[: len(words) // 2]))
        return out


def main(tiny_bert: str, toy_sst2: str, one_row: str, tiny_llama: str, toy_gsm8k: str, toy_summaries: str, tiny_patchtst: str,
         toy_series: str, out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    strategy = "ddp" if world > 1 else "auto"
    results = {}

    def trainer():
        return quiet_trainer(devices=world, strategy=strategy)

    task = SequenceClassification(backbone=tiny_bert)
    data = SST2Data(data_dir=toy_sst2, batch_size=8, eval_batch_size=8, max_length=16, tokenizer=tiny_bert)
    results["classification"] = trainer().validate(task, datamodule=data, verbose=False)[0]

    task = SequenceClassification(backbone=tiny_bert)  # a rank with no rows still joins every sync
    data = SST2Data(data_dir=one_row, batch_size=8, eval_batch_size=8, max_length=16, tokenizer=tiny_bert)
    results["one_row"] = trainer().validate(task, datamodule=data, verbose=False)[0]

    task = HalfRight(backbone=tiny_llama, max_new_tokens=4)
    data = GSM8KData(data_dir=toy_gsm8k, val_size=4, max_length=96, max_response_length=48, batch_size=4,
                     tokenizer=tiny_llama)
    results["gsm8k"] = trainer().test(task, datamodule=data, verbose=False)[0]

    task = HalfRight(backbone=tiny_llama, max_new_tokens=4)
    data = SummarizationData(source="files", train_file=toy_summaries, test_file=toy_summaries, val_size=2,
                             max_length=96, max_response_length=32, batch_size=2, tokenizer=tiny_llama)
    results["summaries"] = trainer().test(task, datamodule=data, verbose=False)[0]

    task = Forecasting(backbone=tiny_patchtst)
    data = ForecastingData(file=toy_series, target_columns=["load"], context_len=64, horizon_len=32,
                           eval_stride=7, batch_size=4)
    results["forecasting"] = trainer().validate(task, datamodule=data, verbose=False)[0]
    data.setup("validate")
    results["forecasting"]["rows"] = len(data.datasets["val"])

    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
