"""Causal language modelling: fine-tune a decoder on prompt -> response pairs, score by generation.

Training minimises cross-entropy on the response tokens only (the data module masks the prompt).
The vocabulary projection runs only at the positions that predict a response token (transformers'
``logits_to_keep`` with a boolean mask): prompt and padding positions, often half a batch, never
become ``batch x length x vocab`` logits, which saves the LM head's compute and the largest tensor
of the step. Models without ``logits_to_keep``, and peft's prompt-learning methods (which lengthen
the sequence), project every position; both give the same loss.
Evaluation generates greedily in batches (left-padded prompts, KV cache, ``max_new_tokens``, stop at
EOS) and scores with the data's metric: exact match of the extracted final answer (GSM8K) or
ROUGE-1/2/L (summarization, torchmetrics). ``test`` always generates; ``validate`` generates when
``generate_in_validation`` (on a CPU, generation dominates the cost). ``predict`` returns the
generations, sampled when ``do_sample``, which ``lit-peft predict`` writes to JSONL. The first test
generations (prompt, generation, reference) go into ``summary.json`` as ``generation_samples``.
Generation stops on the model's own stop ids, EOS and the chat template's end of turn.
A packed batch (``pack: true``) carries ``position_ids`` and no attention mask (see ``inputs``).

``gradient_checkpointing`` recomputes activations in the backward pass; it works with frozen
embeddings and adapters (the embeddings' output is made to require grad).
"""

from __future__ import annotations

import inspect
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from lit_peft import backbones, sharding
from lit_peft.data.chat import ChatFormat
from lit_peft.data.gsm8k import extract_answer
from lit_peft.errors import ConfigError
from lit_peft.tasks.rouge import RougeMean
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lit_peft.tasks.base import PeftTask, eager

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
SAMPLES = 3  # test generations kept in summary.json (rank 0's first)


class CausalLM(PeftTask):
    """A decoder-only LM trained on responses and scored on what it generates."""

    task_name = "causal_lm"
    peft_task_type = "CAUSAL_LM"

    def __init__(
        self,
        backbone: str = "smollm2",
        dtype: str = "default",
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        lr_schedule: Literal["linear", "cosine", "constant"] = "cosine",
        warmup_ratio: float = 0.03,
        lr_multipliers: Optional[dict[str, float]] = None,
        weight_decay_multipliers: Optional[dict[str, float]] = None,
        compile: bool = False,
        attn_implementation: Optional[str] = None,
        revision: Optional[str] = None,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        metric: Literal["auto", "exact_match", "rouge"] = "auto",
        max_new_tokens: int = 256,
        generate_in_validation: bool = False,
        do_sample: bool = False,
        temperature: float = 0.7,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
    ) -> None:
        """
        Args:
            metric: what generations are scored with; ``auto`` takes the data module's.
            max_new_tokens: generation budget per prompt.
            generate_in_validation: also generate (and score) in validation, not only in test.
            do_sample, temperature, top_p: sampling for ``predict`` (evaluation is always greedy).
            repetition_penalty, no_repeat_ngram_size: transformers' guards against the repetition loops
                small models fall into under greedy decoding (1.0 and 0 are off); they apply to
                evaluation and ``predict`` alike, so a before/after comparison decodes the same way.
        """
        super().__init__(backbone=backbone, dtype=dtype, learning_rate=learning_rate, weight_decay=weight_decay,
                         lr_schedule=lr_schedule, warmup_ratio=warmup_ratio, lr_multipliers=lr_multipliers,
                         weight_decay_multipliers=weight_decay_multipliers, compile=compile, attn_implementation=attn_implementation, revision=revision,
                         trust_remote_code=trust_remote_code, gradient_checkpointing=gradient_checkpointing,
                         optimizer=optimizer, lr_scheduler=lr_scheduler)
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be positive (1.0 is off), got {repetition_penalty}")
        if no_repeat_ngram_size < 0:
            raise ConfigError(f"no_repeat_ngram_size must be 0 (off) or more, got {no_repeat_ngram_size}")
        self.metric_name = metric
        self.generation = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                               repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size)
        self.generate_in_validation = generate_in_validation
        self.val_exact_match, self.test_exact_match = torchmetrics.MeanMetric(), torchmetrics.MeanMetric()
        self.val_rouge, self.test_rouge = RougeMean(ROUGE_KEYS), RougeMean(ROUGE_KEYS)
        self.generation_samples: list[dict[str, str]] = []

    def load_backbone(self, **kwargs: Any) -> nn.Module:
        from transformers import AutoModelForCausalLM

        model = backbones.load_model(self.backbone_name, AutoModelForCausalLM, dtype=self.loading_dtype(),
                                     **self.hub_kwargs(), **kwargs)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def setup(self, stage: str) -> None:
        if self.metric_name == "auto":
            datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            self.metric_name = getattr(datamodule, "metric", "exact_match")

    # ---- training ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], **kwargs: Any) -> Any:
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if not getattr(getattr(getattr(self.trainer, "datamodule", None), "cfg", None), "pack", False):
            return
        config = getattr(self.backbone, "active_peft_config", None)
        if config is not None and config.is_prompt_learning:
            raise ConfigError(f"pack: true keeps packed examples apart through position_ids, which peft's "
                              f"{config.peft_type.value} drops or shifts (the examples would attend to each other); "
                              "set data.init_args.pack: false with this method")
        self.check_packing()

    @torch.no_grad()
    def check_packing(self) -> None:
        """Refuse ``pack: true`` for a backbone that does not keep packed examples apart: transformers reads
        restarting ``position_ids`` as sequence bounds in most decoders (Llama, Qwen, Mistral, Gemma,
        GPT-2), but models that ignore them (OPT, Bloom, MPT) would let an example attend to the one
        before it. Checked on the backbone itself: an 8-token example after another, packed, must give
        the logits it gives alone, far closer than the same positions with attention across both."""
        device = next(self.backbone.parameters()).device
        first, second = torch.arange(3, 11, device=device)[None], torch.arange(20, 28, device=device)[None]
        both, positions = torch.cat([first, second], 1), torch.arange(8, device=device).repeat(2)[None]
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            alone = self.backbone(input_ids=second, use_cache=False).logits.float()
            packed = self.backbone(input_ids=both, attention_mask=None, position_ids=positions,
                                   use_cache=False).logits[:, 8:].float()
            crossed = self.backbone(input_ids=both, attention_mask=torch.ones_like(both), position_ids=positions,
                                    use_cache=False).logits[:, 8:].float()  # the same positions, attention across
        finally:
            self.backbone.train(was_training)
        leak, reach = (packed - alone).abs().max(), (crossed - alone).abs().max()
        if not leak <= 0.1 * reach:
            kind = getattr(getattr(self.backbone, "config", None), "model_type", type(self.backbone).__name__)
            raise ConfigError(f"pack: true needs a model that keeps packed examples apart by their position_ids; "
                              f"this one ({kind}) lets them attend to each other (logits move by {float(leak):.3g} "
                              "packed); set data.init_args.pack: false")

    def flash_attention(self) -> bool:
        config = getattr(self.backbone, "config", None)
        return "flash" in str(getattr(config, "_attn_implementation", "") or "")

    @staticmethod
    def inputs(batch: dict[str, Any]) -> dict[str, Any]:
        """The model's inputs: a packed batch gives ``position_ids`` and no attention mask (transformers
        then keeps each example's attention to itself; a cache would turn that detection off)."""
        if "position_ids" in batch:
            return dict(input_ids=batch["input_ids"], attention_mask=None, position_ids=batch["position_ids"],
                        use_cache=False)
        return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean cross-entropy of the batch's response tokens (0 where it has none)."""
        total, count = self.loss_terms(batch)
        return total / count.clamp(min=1)

    def loss_terms(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy of the response tokens and how many there are: training takes the mean
        over the optimizer step's tokens on every process (``TokenMean``). Computed here, never by
        passing ``labels=``: peft's AdaLoRA adds its orthogonality term to a model-computed loss, and
        the method callback adds it again in ``training_step`` (and it would leak into validation and
        test losses). Model-side extras that need ``labels=`` (a mixture-of-experts router's auxiliary
        loss) are not added."""
        if "position_ids" in batch and self.flash_attention():
            # flash-attention reads packed sequences from position_ids only in a batch of one row: the rows go
            # end to end (each row starts with an example's first token, which no label predicts)
            batch = {k: batch[k].reshape(1, -1) for k in ("input_ids", "labels", "position_ids", "attention_mask")}
        labels = batch["labels"]
        if self.response_logits_only():
            targets = torch.full_like(labels, -100)
            targets[:, :-1] = labels[:, 1:]  # position t predicts token t + 1
            keep = targets.ne(-100)
            logits = self(**self.inputs(batch), logits_to_keep=keep).logits  # (kept, vocab)
            return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), keep.sum()
        logits = self(**self.inputs(batch)).logits
        virtual = logits.shape[1] - labels.shape[1]  # prompt tuning's virtual tokens come first
        # the last virtual token predicts the first real one (a packed block may start inside a response)
        logits, targets = (logits[:, virtual - 1:-1], labels) if virtual > 0 else (logits[:, :-1], labels[:, 1:])
        keep = targets.ne(-100)
        return F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum"), keep.sum()

    def response_logits_only(self) -> bool:
        """Whether the backbone can project just the kept positions (see the module's docstring)."""
        config = getattr(self.backbone, "active_peft_config", None)
        if config is not None and config.is_prompt_learning:
            return False
        base = self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone
        return "logits_to_keep" in inspect.signature(base.forward).parameters

    def step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        total, count = self.loss_terms(batch)  # training goes through ``PeftTask.training_step``
        loss = total / count.clamp(min=1)
        # the mean over all response tokens of the split, whatever the eval batch size
        self.log_mean(f"{stage}_loss", loss, int(count), prog_bar=True)
        if stage == "test" or (stage == "val" and self.generate_in_validation):
            generations = self.generate(batch)
            self.score(generations, batch["references"], stage)
            if stage == "test" and len(self.generation_samples) < SAMPLES:  # kept in summary.json, to read
                self.generation_samples += [{"prompt": p, "generation": g, "reference": r} for p, g, r in
                                            zip(batch["prompts"], generations, batch["references"])]
                self.generation_samples = self.generation_samples[:SAMPLES]
        return loss

    def discard_step(self, batch: dict[str, Any], stage: str) -> None:
        """The forward passes ``step`` runs, scoring nothing (a sharded model's ranks must all join them)."""
        self.loss(batch)
        if stage == "test" or (stage == "val" and self.generate_in_validation):
            self.generate_ids(batch)

    # ---- generation and scoring -------------------------------------------------------------------
    def generate(self, batch: dict[str, Any], sample: bool = False) -> list[str]:
        """Decoded continuations of the batch's left-padded prompts."""
        return self.tokenizer.batch_decode(self.generate_ids(batch, sample), skip_special_tokens=True)

    def stop_ids(self) -> list[int]:
        """Where a generated turn ends: the model's own stop ids (``generation_config.eos_token_id``, a
        list for Llama-3-Instruct), the tokenizer's EOS, and the chat template's end of turn."""
        ids: list[int] = []
        config = getattr(self.backbone, "generation_config", None)
        own = getattr(config, "eos_token_id", None)
        chat = getattr(self, "_chat", None)
        if chat is None or chat.tok is not self.tokenizer:  # built once: it renders a probe conversation
            chat = self._chat = ChatFormat(self.tokenizer)
        for token in [*(own if isinstance(own, (list, tuple)) else [own]), *chat.stop_ids]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
        return ids

    @torch.no_grad()
    def generate_ids(self, batch: dict[str, Any], sample: bool = False) -> torch.Tensor:
        """The new token ids generated for the batch's left-padded prompts (right-padded)."""
        g = self.generation
        options: dict[str, Any] = dict(max_new_tokens=g["max_new_tokens"], pad_token_id=self.tokenizer.pad_token_id,
                                       eos_token_id=self.stop_ids(), use_cache=True,
                                       repetition_penalty=g["repetition_penalty"],  # 1.0 and 0: transformers adds no
                                       no_repeat_ngram_size=g["no_repeat_ngram_size"])  # processor
        if sample and g["do_sample"]:
            options.update(do_sample=True, temperature=g["temperature"], top_p=g["top_p"])
        else:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self._trainer is not None and self.trainer.world_size > 1 and sharding.is_sharded(self.trainer.strategy):
            options["synced_gpus"] = True  # a sharded forward is a collective: ranks that stop early keep joining
        prompts = batch["prompt_input_ids"]
        with eager(self.backbone):  # a compiled forward would recompile at every new cache length
            out = self.backbone.generate(input_ids=prompts, attention_mask=batch["prompt_attention_mask"], **options)
        return out[:, prompts.shape[1]:]

    def score(self, generations: list[str], references: list[str], stage: str) -> None:
        if self.metric_name == "exact_match":
            metric = getattr(self, f"{stage}_exact_match")
            hits = [float(extract_answer(g) == r) for g, r in zip(generations, references)]
            metric.update(torch.tensor(hits, device=self.device))
        elif self.metric_name == "rouge":
            getattr(self, f"{stage}_rouge").update(generations, references)
        else:
            raise ConfigError(f"unknown metric '{self.metric_name}'; use exact_match or rouge")

    def _log_scores(self, stage: str) -> None:
        """The stage's generation scores, once at the epoch's end (only a metric that was updated logs)."""
        self.log_accumulated(getattr(self, f"{stage}_exact_match"), lambda value: {f"{stage}_exact_match": value})
        self.log_accumulated(getattr(self, f"{stage}_rouge"),
                             lambda values: {f"{stage}_{k}": values[f"{k}_fmeasure"] for k in ROUGE_KEYS})

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    def on_test_start(self) -> None:
        self.generation_samples = []

    def on_test_epoch_end(self) -> None:
        self._log_scores("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        generations = self.generate(batch, sample=True)
        rows: dict[str, Any] = {"prompt": batch["prompts"], "generation": generations, "reference": batch["references"]}
        if self.metric_name in ("exact_match", "auto"):
            rows["answer"] = [extract_answer(g) for g in generations]
        return rows
