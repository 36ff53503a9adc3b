"""Score an in-memory causal LM with EleutherAI's lm-evaluation-harness, offline, on local task files.

lm-eval (``pip install lm-eval==0.4.13``) is the reference implementation of the common LM
benchmarks: its prompts, few-shot sampling, stop strings, answer filters and metrics are what
published numbers use, so a fine-tune scored through it compares with those numbers, which
lit-peft's own eval loop (its own prompt and answer extraction) does not promise. What this module
adds around lm-eval:

- the model being fine-tuned, as it is in memory (a transformers model, or a peft ``PeftModel``
  with its adapter applied, not merged), wrapped in lm-eval's ``HFLM``; nothing is saved or reloaded;
- tasks read only from local YAML files (lit-peft's ``harness_tasks/``, e.g. ``gsm8k_local``, and the
  caller's ``task_dirs``), whose data are local files: lm-eval's own tasks read theirs from the
  Hugging Face hub, which a cluster node often cannot reach. A task that would reach the hub, or an
  unknown one, is a ``ConfigError`` before anything runs, and the run itself is held offline
  (``HF_HUB_OFFLINE``), so nothing waits on the network;
- relative ``data_files`` in a task YAML are read from a folder the caller names per task
  (``data_dirs``), else from the YAML's own folder, so a packaged task need not know where the data
  lives;
- plain-float metrics and per-problem records (prompt, raw and filtered responses, target, metric
  per filter) that a caller can compare with its own scoring, e.g. ``gsm8k_rescore``.
"""

from __future__ import annotations

import functools
import glob
import json
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional
from unittest import mock

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lit_peft.errors import ConfigError

#: a GSM8K target's final answer line, which lit-peft's own scoring of lm-eval's generations needs
FINAL_LINE = re.compile(r"####\s*-?[$\d.,]+")
#: lit-peft's packaged task YAMLs (gsm8k_local, gsm8k_lit_peft)
TASKS_DIR = Path(__file__).parent / "harness_tasks"
#: datasets' builders that read local files named by ``dataset_kwargs.data_files``
FILE_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}
LOCAL_TASK_HINT = "give a task YAML whose dataset is local (dataset_path: json, dataset_kwargs: {data_files: {test: <file>}})"


def run_harness(model, tokenizer, tasks: Sequence[str], *, task_dirs: Sequence[str] = (),
                data_dirs: Optional[Mapping[str, str]] = None, limit: Optional[int] = None, batch_size: int = 8,
                num_fewshot: Optional[int] = None, max_new_tokens: Optional[int] = None,
                apply_chat_template: bool = False) -> dict[str, Any]:
    """Run lm-eval tasks on ``model`` where it is (its device and dtype), offline.

    Args:
        model: a transformers causal LM or a peft ``PeftModel`` around one. lm-eval switches it to
            eval mode; its training mode is restored afterwards.
        tokenizer: its tokenizer (lm-eval sets a pad token on it if it has none).
        tasks: task names from ``harness_tasks/`` or ``task_dirs`` (YAML tasks, not groups or tags).
        task_dirs: folders of further task YAMLs; a task there overrides a packaged one of the same name.
        data_dirs: task name -> folder that its YAML's relative ``data_files`` are read from
            (default: the YAML's folder); ``gsm8k_local`` needs one, e.g. ``../shared/data/gsm8k``.
        limit: score the first ``limit`` test documents of each task.
        num_fewshot: override the tasks' few-shot count (a task whose YAML says 0 keeps 0).
        max_new_tokens: cap generation (lm-eval's ``max_gen_toks``, default 256) in generative tasks.
        apply_chat_template: format prompts with the tokenizer's chat template (few-shot examples
            as earlier turns), as lm-eval's ``--apply_chat_template`` does.

    Returns:
        ``{"metrics": {task: {"metric,filter": float}}, "n_shot": {task: int},
        "samples": {task: [record per document, in test-file order]}}``; a record holds ``doc_id``,
        ``doc`` (the JSON row), ``prompt`` (the context the model saw, few-shot examples and chat
        template included), ``target``, ``resps`` (raw responses: ``[generation]``, or
        ``[(loglikelihood, is_greedy)]`` per choice), and, keyed by filter (``none`` for a task
        without filters), ``filtered_resps`` (e.g. ``{"strict-match": ["18"]}``) and ``metrics``
        (e.g. ``{"strict-match": {"exact_match": 1.0}}``).
    """
    lm_eval = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    dirs = [TASKS_DIR, *map(Path, task_dirs)]
    for folder in dirs[1:]:
        if not folder.is_dir():
            raise ConfigError(f"task_dirs folder '{folder}' does not exist; give folders of lm-eval task YAMLs")
    manager = TaskManager(include_path=[str(d) for d in dirs], include_defaults=False)
    configs = [_local_config(name, manager, (data_dirs or {}).get(name)) for name in tasks]
    was_training = model.training
    try:
        with _offline():
            out = lm_eval.simple_evaluate(
                HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size), tasks=configs,
                task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                gen_kwargs=None if max_new_tokens is None else {"max_gen_toks": max_new_tokens},
                apply_chat_template=apply_chat_template,
                # leave the caller's random generators alone (lm-eval reseeds them by default; a
                # fine-tune evaluated mid-run would then resume from other states). Few-shot
                # sampling keeps lm-eval's own fixed seed, so prompts match lm-eval's.
                random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    finally:
        model.train(was_training)
    return {"metrics": {task: {key: float(value) for key, value in row.items()
                               if "," in key and isinstance(value, numbers.Real)}
                        for task, row in out["results"].items()},
            "n_shot": {task: int(n) for task, n in out["n-shot"].items()},
            "samples": {task: _per_document(rows) for task, rows in out["samples"].items()}}


def gsm8k_rescore(records: Sequence[dict]) -> list[dict]:
    """lit-peft's GSM8K scoring of lm-eval's own generations, per problem, beside lm-eval's.

    lm-eval's ``strict-match`` takes the number after ``#### `` and ``flexible-extract`` the last
    number-like run in the generation, each compared as text (case, commas, ``$`` and a final ``.``
    ignored); lit-peft's ``extract_answer`` takes the number after ``####``, else the last number, and
    compares normalised numbers (``3.50`` equals ``3.5``). Rows where the columns differ are the
    problems on which the scorings disagree.

    Returns, per record of ``run_harness(...)["samples"]["gsm8k_local"]``: ``doc_id``, ``question``,
    ``reference`` (the normalised final answer), ``response`` (the raw generation), ``lit_peft``
    (1.0 where lit-peft counts it right) and lm-eval's ``strict-match`` / ``flexible-extract`` exact match.
    """
    from lit_peft.data.gsm8k import FINAL, extract_answer, normalize_number

    rows = []
    for record in records:
        reference = normalize_number(FINAL.search(record["target"]).group(1))
        response = record["resps"][0]
        rows.append({"doc_id": record["doc_id"], "question": record["doc"]["question"], "reference": reference,
                     "response": response, "lit_peft": float(extract_answer(response) == reference),
                     **{name: metrics["exact_match"] for name, metrics in record["metrics"].items()}})
    return rows


def _import_lm_eval():
    try:
        import lm_eval
    except ImportError as err:
        raise ConfigError("run_harness needs lm-eval: pip install lm-eval==0.4.13") from err
    return lm_eval


def _local_config(name: str, manager, data_dir: Optional[str]) -> dict:
    """The task's YAML config with its local data files made absolute; a ConfigError where the task is
    unknown, not a plain YAML task, or reads data that is not a local file."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    if entry is None:
        known = ", ".join(sorted(manager.all_subtasks))
        if name in _lm_eval_task_names():
            raise ConfigError(f"task '{name}' is one of lm-eval's own, which read their data from the Hugging Face hub "
                              f"(offline here); {LOCAL_TASK_HINT} in task_dirs (known local tasks: {known})")
        raise ConfigError(f"task '{name}' is not in lit-peft's harness tasks or task_dirs (known: {known}); "
                          f"{LOCAL_TASK_HINT} and pass its folder in task_dirs")
    if entry.kind is not Kind.TASK:
        raise ConfigError(f"task '{name}' ({entry.yaml_path or 'no YAML'}) is an lm-eval {entry.kind.name.lower()}; "
                          "run_harness takes YAML tasks: name each task")
    cfg = load_yaml(entry.yaml_path)
    if cfg.get("custom_dataset"):  # the YAML's own Python code builds the data
        return cfg
    base = Path(data_dir).expanduser() if data_dir else entry.yaml_path.parent
    source = str(cfg.get("dataset_path"))
    if source in FILE_BUILDERS:
        kwargs = cfg["dataset_kwargs"] = dict(cfg.get("dataset_kwargs") or {})
        if not kwargs.get("data_files"):
            raise ConfigError(f"task '{name}' ({entry.yaml_path}) reads {source} files but names none; "
                              "give dataset_kwargs: {data_files: {test: <file>}}")
        kwargs["data_files"] = _local_files(kwargs["data_files"], base, name)
    elif "://" not in source and (base / source).exists():  # a local folder (or file) that datasets reads
        cfg["dataset_path"] = str((base / source).resolve())
    else:
        raise ConfigError(f"task '{name}' ({entry.yaml_path}) reads '{source}', which is not a local file or folder "
                          f"(the Hugging Face hub is offline here); {LOCAL_TASK_HINT}")
    return cfg


def _local_files(files, base: Path, name: str):
    """``data_files`` (a path, list, or split -> path(s)) with relative paths read from ``base``."""
    if isinstance(files, Mapping):
        return {split: _local_files(f, base, name) for split, f in files.items()}
    if isinstance(files, (list, tuple)):
        return [_local_files(f, base, name) for f in files]
    path = base / Path(str(files)).expanduser()
    if "://" in str(files) or not glob.glob(str(path)):
        raise ConfigError(f"task '{name}': data file '{path}' does not exist locally; give "
                          f"data_dirs={{'{name}': <folder holding {files}>}} or a local path in its YAML's data_files")
    return str(path.resolve())


@functools.cache
def _lm_eval_task_names() -> frozenset[str]:
    """lm-eval's own task, group and tag names: only for the error message of a name run_harness lacks
    (indexing lm-eval's ~15k YAMLs takes seconds)."""
    import lm_eval.tasks
    from lm_eval.tasks._index import TaskIndex

    return frozenset(TaskIndex.build([Path(lm_eval.tasks.__file__).parent]))


@contextmanager
def _offline():
    """Hold the Hugging Face libraries offline: they read the environment variables once, at import,
    so their module constants are set as well."""
    import datasets.config
    import huggingface_hub.constants

    with mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}), \
            mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True), \
            mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True):
        yield


def _per_document(rows: list[dict]) -> list[dict]:
    """lm-eval logs a sample per document and filter; merge them into one record per document."""
    records: dict[int, dict] = {}
    for row in rows:
        record = records.setdefault(row["doc_id"], {
            "doc_id": row["doc_id"], "doc": row["doc"], "prompt": row["arguments"][0][0], "target": row["target"],
            "resps": [r[0] if len(r) == 1 else list(r) for r in row["resps"]],
            "filtered_resps": {}, "metrics": {}})
        record["filtered_resps"][row["filter"]] = row["filtered_resps"]
        record["metrics"][row["filter"]] = {metric: float(row[metric]) for metric in row["metrics"]}
    return [records[i] for i in sorted(records)]


class Harness(Callback):
    """``lit-peft test --harness.tasks [gsm8k_local] --harness.data_dirs '{gsm8k_local: ../shared/data/gsm8k}'``:
    after the test loop, lm-eval's tasks on the tested model (adapter applied, no merge), on rank 0.

    Each task's metrics go into ``summary.json`` and the logger as ``harness_<task>_<metric>[_<filter>]``
    (a GSM8K task also gets ``harness_<task>_lit_peft_exact_match``: lit-peft's own answer extraction
    of lm-eval's generations, see ``gsm8k_rescore``), and every scored document into
    ``harness_samples.jsonl`` in the run folder. Under DDP the other ranks wait at a barrier (within the
    process group's timeout, 30 minutes by default: a long harness run on a large model is best
    tested on one device); a failure on rank 0 passes the barrier first, then stops every rank. A
    sharded (FSDP) model is refused: merge the checkpoint and test it unsharded.
    """

    def __init__(self, tasks: Optional[list[str]] = None, task_dirs: Optional[list[str]] = None,
                 data_dirs: Optional[dict[str, str]] = None, limit: Optional[int] = None, batch_size: int = 8,
                 num_fewshot: Optional[int] = None, max_new_tokens: Optional[int] = None,
                 apply_chat_template: bool = False) -> None:
        """
        Args:
            tasks: lm-eval task names (lit-peft's ``harness_tasks/``: ``gsm8k_local``, ``gsm8k_lit_peft``;
                or YAMLs in ``task_dirs``); none: no harness run.
            task_dirs: folders of further task YAMLs whose data are local files.
            data_dirs: task -> folder its YAML's relative ``data_files`` are read from.
            limit: the first ``limit`` test documents of each task.
            batch_size, num_fewshot, max_new_tokens, apply_chat_template: as lm-eval's options.
        """
        self.tasks, self.task_dirs, self.data_dirs = list(tasks or []), list(task_dirs or []), dict(data_dirs or {})
        self.options = dict(limit=limit, batch_size=batch_size, num_fewshot=num_fewshot, max_new_tokens=max_new_tokens,
                            apply_chat_template=apply_chat_template)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.tasks or stage != "test":
            return
        _import_lm_eval()
        if getattr(pl_module, "peft_task_type", None) != "CAUSAL_LM":
            raise ConfigError(f"harness tasks score causal LMs; the task is {type(pl_module).__name__}: drop harness.tasks")
        from lit_peft import sharding

        if sharding.is_sharded(trainer.strategy):
            raise ConfigError("harness tasks need the whole model on one process; merge the checkpoint (lit-peft merge) "
                              "and test it with a single-device or DDP strategy")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.tasks:
            return
        from lit_peft.metrics import run_dir

        folder = run_dir(trainer)  # on every rank: it broadcasts
        failure: Optional[BaseException] = None
        if trainer.is_global_zero:
            try:
                self._run(trainer, pl_module, folder)
            except BaseException as err:  # the other ranks wait at the barrier: let them pass, then fail
                failure = err
        trainer.strategy.barrier("harness")
        if failure is not None:
            raise failure

    def _run(self, trainer: Trainer, pl_module: LightningModule, folder: Path) -> None:
        from lit_peft.files import write_text

        out = run_harness(pl_module.backbone, pl_module.tokenizer, self.tasks, task_dirs=self.task_dirs,
                          data_dirs=self.data_dirs, **self.options)
        write_text(folder / "harness_samples.jsonl", "".join(  # first: a scoring error below loses no results
            json.dumps({"task": task, **record}, default=str) + "\n"
            for task, records in out["samples"].items() for record in records))
        values: dict[str, float] = {}
        for task, metrics in out["metrics"].items():
            for key, value in metrics.items():
                metric, _, filt = key.partition(",")
                if not metric.endswith("_stderr"):
                    values["_".join(["harness", task, metric] + ([filt] if filt != "none" else []))] = value
            if task.startswith("gsm8k") and all(FINAL_LINE.search(str(r.get("target", ""))) for r in out["samples"][task]):
                rows = gsm8k_rescore(out["samples"][task])  # GSM8K targets ('#### N'): lit-peft's scoring beside
                values[f"harness_{task}_lit_peft_exact_match"] = sum(r["lit_peft"] for r in rows) / max(len(rows), 1)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})  # into summary.json
        if trainer.logger is not None:
            trainer.logger.log_metrics(values, step=trainer.global_step)
