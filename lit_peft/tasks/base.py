"""The small base every task shares: a pretrained backbone, the method applied to it, the
optimizer built from the method's parameter groups, and checkpoints that hold only what trained.

A subclass says how the backbone loads (``load_backbone``), which top-level modules are its head
(``head_modules``: newly initialised, they train under every method), which modules a linear probe
trains (``probe_modules``: the head by default), and how a batch becomes a loss (``step``). A task
whose backbone reads no text (a forecaster) sets ``uses_tokenizer = False`` and has no tokenizer.

Batch-norm layers (PatchTST's) are part of the contract too: a frozen one keeps its pretrained
running statistics (it stays in eval mode while the rest trains), and the statistics of one that
trains are saved with what trained, so a resumed or merged model normalises as the trained one did.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import random
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Literal, Optional

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from lit_peft import backbones, checkpoints, sharding
from lit_peft.data.samplers import EvalShard
from lit_peft.errors import ConfigError
from lit_peft.methods.base import Method, default_param_groups
from lit_peft.schedules import lazy_schedule, settle
from lit_peft.tasks.token_mean import TokenMean

#: attribute names of classification / regression heads in transformers models
HEAD_NAMES = ("classifier", "score", "pre_classifier", "qa_outputs")


@contextlib.contextmanager
def eager(module: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, calls of ``module`` run its eager forward even where ``compile: true``
    compiled it. Generation needs this: every decoding step grows the KV cache by one, so a compiled
    forward would recompile step after step and spend far longer compiling than decoding."""
    compiled = getattr(module, "_compiled_call_impl", None)
    module._compiled_call_impl = None  # what nn.Module.__call__ checks before its compiled forward
    try:
        yield module
    finally:
        module._compiled_call_impl = compiled


def build(spec: dict[str, Any]) -> Any:
    """Instantiate ``{"class_path": ..., "init_args": {...}}``."""
    module_name, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    return cls(**spec.get("init_args", {}))


class PeftTask(LightningModule, abc.ABC):
    """Base of every task: owns ``backbone``, ``tokenizer`` and the optimizer."""

    #: a short name for summaries
    task_name = "task"
    #: peft's ``TaskType`` value for adapters on this task
    peft_task_type: Optional[str] = None
    #: whether the backbone comes with a tokenizer (``self.tokenizer``; ``None`` where it does not)
    uses_tokenizer = True

    def __init__(
        self,
        backbone: str = "minilm",
        dtype: str = "default",
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        lr_schedule: Literal["linear", "cosine", "constant"] = "linear",
        warmup_ratio: float = 0.06,
        lr_multipliers: Optional[dict[str, float]] = None,
        weight_decay_multipliers: Optional[dict[str, float]] = None,
        compile: bool = False,
        attn_implementation: Optional[str] = None,
        revision: Optional[str] = None,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        """
        Args:
            backbone: hub id, local folder, or a packaged alias (``minilm``).
            dtype: the weights' dtype as loaded: ``default`` (bf16 where the run computes in bf16 on a GPU,
                as the GPU presets do; float32 otherwise, the CPU included), ``auto`` (the checkpoint's own),
                float32, bfloat16 or float16. Under mixed precision the weights that train are kept in float32.
            learning_rate: peak learning rate (methods may scale it per parameter group).
            weight_decay: AdamW weight decay, not applied to biases and norms.
            lr_schedule: shape of the schedule after warm-up.
            warmup_ratio: fraction of the training steps spent warming up linearly from 0.
            lr_multipliers: regular expression (searched in parameter names) -> learning-rate factor,
                e.g. ``{lora_B: 16}`` (LoRA+) or ``{"\\.value\\.": 4}`` (W_v at 4x); products where several match.
            weight_decay_multipliers: the same for weight decay, e.g. ``{embeddings: 0}`` (no decay there).
            compile: run the backbone's forward (and backward) through ``torch.compile``, once the
                method has rewritten it. Compiled in place (``nn.Module.compile``), so parameter names,
                checkpoints and resumes are those of an uncompiled run. Generation is not compiled.
            attn_implementation: transformers' attention kernel: unset, transformers' choice (``sdpa``, torch's fused
                attention, where the architecture has it, else ``eager``); or ``sdpa``, ``eager``,
                ``flash_attention_2`` (needs the flash-attn package and a CUDA GPU), ``flex_attention``.
            revision: the hub revision (branch, tag or commit) of backbone and tokenizer.
            trust_remote_code: allow a hub backbone's own modelling code to run (off: only transformers' code).
            gradient_checkpointing: recompute each block's activations in the backward pass (less activation
                memory, about a third more compute); works with frozen embeddings and adapters. Under FSDP the
                strategy's ``activation_checkpointing_policy`` does the same per wrapped block.
            optimizer: any optimizer by ``class_path`` (LightningCLI's ``OptimizerCallable``), built over the
                method's parameter groups (their learning rates and weight decays win over its own):
                ``torch.optim.AdamW`` with ``fused: true``, ``bitsandbytes.optim.PagedAdamW8bit`` for QLoRA
                (``configs/optim/``). Unset: torch's AdamW (fused where it can be) with ``learning_rate``.
            lr_scheduler: any scheduler by ``class_path`` (``LRSchedulerCallable``), stepped every optimizer
                step; unset: warm-up then ``lr_schedule``.
        """
        super().__init__()
        # what rebuilds this task (its class's own arguments under LightningCLI); the optimizer is the run's,
        # not the model's, and a checkpoint records it in the optimizer state
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        backbones.check_loading(dtype, attn_implementation)  # fail early on a typo
        self.backbone_name, self.backbone_dtype, self.compile_backbone = backbone, dtype, compile
        self.loading = SimpleNamespace(attn_implementation=attn_implementation, revision=revision,
                                       trust_remote_code=trust_remote_code)
        self.gradient_checkpointing = gradient_checkpointing
        self.optim = SimpleNamespace(lr=learning_rate, weight_decay=weight_decay, schedule=lr_schedule,
                                     warmup_ratio=warmup_ratio, multipliers=dict(lr_multipliers or {}),
                                     wd_multipliers=dict(weight_decay_multipliers or {}))
        if not 0.0 <= warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.backbone: Optional[nn.Module] = None
        self.method: Optional[Method] = None
        self._token_mean = TokenMean()  # used by tasks whose loss_terms gives (sum, count)
        self._built = False  # configure_model has run: backbone loaded, method applied
        self.built_empty = False  # this rank built the backbone on the meta device (it gets rank 0's weights)
        self.tokenizer = (backbones.load_tokenizer(backbone, revision=revision, trust_remote_code=trust_remote_code or None)
                          if self.uses_tokenizer else None)
        self.strict_loading = False  # checkpoints hold only what trained; on_load_checkpoint checks the rest

    # ---- the backbone ------------------------------------------------------------------------
    @property
    def backbone_source(self) -> str:
        """The folder or hub id the backbone loads from."""
        return backbones.resolve(self.backbone_name)

    @abc.abstractmethod
    def load_backbone(self, **kwargs: Any) -> nn.Module:
        """Load the pretrained model; ``kwargs`` go to ``from_pretrained``."""

    def loading_dtype(self) -> str:
        """The ``dtype`` the backbone loads in, ``default`` resolved: bf16 (fp16) where the run's precision
        is bf16 (16) on a CUDA device that has it, float32 elsewhere; the CPU keeps float32 unless asked.
        Also float32 where the method trains the pretrained weights themselves (full, partial, GaLore: they
        start from the checkpoint's values, not bf16-rounded ones) and under FSDP1, whose flat buffers hold
        one dtype (its mixed precision computes in bf16 from float32 storage)."""
        if self.backbone_dtype != "default":
            return self.backbone_dtype
        trainer = self._trainer
        if trainer is None or trainer.strategy.root_device.type != "cuda" or sharding.is_fsdp1(trainer.strategy):
            return "float32"
        if self.method is None or self.method.trains_pretrained_weights:
            return "float32"
        precision = str(getattr(trainer.precision_plugin, "precision", ""))
        if precision.startswith("bf16") and torch.cuda.is_bf16_supported():
            return "bfloat16"
        return "float16" if precision.startswith("16") else "float32"

    def hub_kwargs(self) -> dict[str, Any]:
        """``from_pretrained`` options of every backbone: attention kernel, revision, remote code, and
        whether this rank builds it empty (``builds_empty``)."""
        return {"attn_implementation": self.loading.attn_implementation, "revision": self.loading.revision,
                "trust_remote_code": self.loading.trust_remote_code or None, "meta": self.builds_empty() or None}

    def builds_empty(self) -> bool:
        """Whether this rank builds the backbone on the meta device, reading no weights, and gets rank 0's:
        every rank but 0 under FSDP2 (``sharding.shard`` broadcasts rank 0's weights into each rank's
        shards) and under FSDP1 with ``sync_module_states: true`` (FSDP broadcasts them unit by unit as it
        wraps). Host memory is then one copy of the weights in the job, on rank 0, not one a rank. Not
        where the method reads the weights to apply itself (PiSSA, OLoRA, EVA, QLoRA, RoSA)."""
        trainer = self._trainer
        if trainer is None or trainer.global_rank == 0 or trainer.world_size < 2:
            return False
        if self.method is not None and self.method.initializes_from_weights:
            return False
        strategy = trainer.strategy
        return sharding.is_fsdp2(strategy) or bool(sharding.is_fsdp1(strategy) and strategy.kwargs.get("sync_module_states"))

    @property
    def weights_dtype(self) -> torch.dtype:
        """The dtype the backbone's frozen weights hold (the first floating-point parameter's)."""
        return next((p.dtype for p in self.backbone.parameters() if p.is_floating_point()), torch.float32)

    def configure_backbone(self, **kwargs: Any) -> nn.Module:
        """Load the pretrained backbone once (no method applied); ``kwargs`` go to ``from_pretrained``."""
        if self.backbone is None:
            # from_pretrained returns eval mode, and Lightning keeps modules' modes: dropout must be on
            self.built_empty = self.builds_empty()  # what load_backbone does on this rank (hub_kwargs' meta)
            self.backbone = self.load_backbone(**kwargs).train()
            if self.gradient_checkpointing:
                enable_gradient_checkpointing(self.backbone)
        elif kwargs:
            raise ConfigError("the backbone is already loaded, so the method's loading options cannot apply")
        return self.backbone

    def use_method(self, method: Optional[Method]) -> None:
        """Name the method ``configure_model`` applies (a Method's ``setup`` calls this; Lightning runs
        callbacks' ``setup`` before ``configure_model``). Naming the same one again is a no-op."""
        if method is self.method:
            return
        if self.method is not None:
            raise ConfigError(f"the model already has method '{self.method.name}' applied; give one method per run "
                              f"(found '{method.name if method is not None else None}' as well)")
        if self._built:
            raise ConfigError(f"method '{method.name}' was given after the model was built; name the method "
                              "before the model is configured (it is applied in configure_model)")
        self.method = method

    def configure_model(self) -> None:
        """Build the model where Lightning builds models: the backbone loads (with the method's loading
        options, under the strategy's init context: on the GPU itself where the strategy puts it
        there), the method rewrites it, the strategy's own sharding (FSDP2) goes on, then ``compile``.
        Lightning calls this once per ``fit`` / ``validate`` / ``test``; the model is built once. A
        backbone loaded before (``configure_backbone``) gets the method applied to it."""
        trainer = self._trainer
        if not self._built:
            if self.method is not None:
                self.configure_backbone(**self.method.backbone_kwargs(trainer))
                self.method.apply(self, trainer)
                self.method.task = self
            else:
                self.configure_backbone()
            self._built = True
            self.check_trainable()
        if trainer is not None:  # also for a model built before the run (attach): what the strategy needs
            self.keep_trainable_in_float32()
            sharding.shard(self, trainer.strategy)
        if self.compile_backbone and getattr(self.backbone, "_compiled_call_impl", None) is None:
            self.backbone.compile()  # lazily: the first batch compiles; a new batch shape may recompile once

    def keep_trainable_in_float32(self) -> None:
        """Under mixed precision (autocast), frozen weights stay in the loading dtype (bf16 on a GPU) and
        trained ones are upcast to float32, so the optimizer steps in full precision (bf16 keeps 8 bits
        of mantissa: small updates vanish). Under FSDP1 a flat buffer holds one dtype, so there everything
        takes the frozen weights' dtype (float32 under ``dtype: default``); without autocast the layers would
        meet two dtypes, so there too everything keeps the loading dtype."""
        trainer = self._trainer
        if trainer is None:
            return
        if sharding.is_fsdp1(trainer.strategy):
            # one dtype a flat buffer: adapters peft or a method built in float32 follow the frozen weights
            dtype = self.weights_dtype
            for param in self.parameters():
                if param.is_floating_point() and param.dtype != dtype:
                    param.data = param.data.to(dtype)
            return
        if not str(getattr(trainer.precision_plugin, "precision", "")).endswith("-mixed"):
            return
        for param in self.parameters():
            if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
                param.data = param.data.float()

    def head_modules(self) -> list[str]:
        """Top-level modules of the backbone that form the task head; they always train."""
        model = self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone
        return [name for name, _ in model.named_children() if name in HEAD_NAMES]

    def probe_modules(self) -> list[str]:
        """Modules a linear probe (and a partial fine-tune, besides its blocks) trains: the head."""
        return self.head_modules()

    def check_trainable(self) -> None:
        if not any(p.requires_grad for p in self.parameters()):
            raise ConfigError(f"method '{self.method_name}' left no parameter to train")

    @property
    def method_name(self) -> str:
        return self.method.name if self.method is not None else "full"

    def fresh_copy(self) -> "PeftTask":
        """A new task from the same arguments with a new instance of the same method applied."""
        task = build(self.spec())
        if self.method is not None:
            task.use_method(build(self.method.spec()))
        task.configure_model()
        return task

    def spec(self) -> dict[str, Any]:
        cls = sharding.task_class(self)  # under FSDP2 type(self) is a generated FSDP<Task>
        init_args = {k: v for k, v in self.hparams.items() if not k.startswith("_")}
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}

    # ---- training ----------------------------------------------------------------------------
    @abc.abstractmethod
    def step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        """Loss of one batch; logs the stage's metrics."""

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Loss of one batch without logging: what methods that look at gradients before training
        (SIFT's and RoSA's mask selection) differentiate."""
        raise NotImplementedError(f"{type(self).__name__} does not define `loss(batch)`, which this method needs")

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(summed loss, how many items it sums) for a task whose training loss is a mean over items of
        varying number per row (a language model's response tokens): trained as the mean over the whole
        optimizer step (``TokenMean``). ``None`` (the default): ``step``'s per-batch mean is the loss."""
        return None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        terms = self.loss_terms(batch)
        if terms is None:
            loss, closing = self.step(batch, "train"), True
        else:
            loss, closing = self._token_mean.micro_batch(self, *terms, batch_idx)
        extra = self.method.regularization(self) if self.method is not None and closing else None
        if extra is not None:
            self.log("train_regularization", extra, on_step=True, on_epoch=True, sync_dist=True)
            loss = loss + (extra if terms is None else self._token_mean.unscaled(extra, self.trainer.accumulate_grad_batches))
        return loss

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        super().backward(loss, *args, **kwargs)
        self._token_mean.rescale(self.parameters())  # a no-op but after a token-weighted window's last micro-batch

    def log_mean(self, name: str, value: torch.Tensor, weight: float, **kwargs: Any) -> None:
        """Log ``value`` for the epoch as the mean over every process's rows (or tokens), each batch weighted
        by ``weight``. The weight goes to Lightning as a float: its running weight total is an integer
        tensor that its cross-process mean truncates (51 + 50 rows on 2 ranks average to 50, so the loss
        was divided by 100), and a float weight makes the total a float."""
        self.log(name, value, on_epoch=True, batch_size=float(weight), sync_dist=True, **kwargs)  # type: ignore[arg-type]

    def log_accumulated(self, metric: Any, names: Callable[[Any], dict[str, torch.Tensor]], prog_bar: bool = True) -> None:
        """Log a metric (or MetricCollection) that accumulated over a stage's batches, once, at the
        epoch's end, then reset it; ``names`` turns ``compute()``'s result into the logged names.
        Tasks update their metrics per batch and call this from the ``on_*_epoch_end`` hooks rather
        than logging the Metric objects every step, which makes Lightning move each one to the
        device on every call (0.7 ms a step for two on a CPU, ``benchmarks/throughput.py --tiny``)."""
        parts = metric.values() if hasattr(metric, "values") else [metric]
        updates = torch.tensor(float(sum(m.update_count for m in parts)))
        if self._trainer is not None and self.trainer.world_size > 1:  # a rank with no rows still joins the sync
            updates = self.trainer.strategy.reduce(updates.to(self.device), reduce_op="sum")
        if updates > 0:  # compute() syncs across processes
            self.log_dict(names(metric.compute()), prog_bar=prog_bar, sync_dist=True)  # equal on every rank
        metric.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluate(batch, batch_idx, "val", dataloader_idx)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluate(batch, batch_idx, "test", dataloader_idx)

    def evaluate(self, batch: dict[str, Any], batch_idx: int, stage: str, dataloader_idx: int = 0) -> None:
        """Score the rows of the batch this process owns (``EvalShard``: under several processes a rank
        short of a row repeats one another rank scores). A batch with none of its own still runs the
        forward where the model is sharded (every rank must join FSDP's gathers), and scores nothing."""
        own = self.own_rows(batch, batch_idx, stage, dataloader_idx)
        if own is not None:
            self.step(own, stage)
            return
        if self._trainer is not None and sharding.is_sharded(self.trainer.strategy):
            with torch.no_grad():
                self.discard_step(batch, stage)
        # weight 0: the loss is logged on every rank, so one with no rows at all still joins its epoch-end sync
        self.log_mean(f"{stage}_loss", torch.zeros((), device=self.device), 0.0, prog_bar=True)

    def discard_step(self, batch: dict[str, Any], stage: str) -> None:
        """What ``step`` runs on the model, scoring nothing: a sharded model's collectives for a batch
        that is only another rank's rows."""
        self.loss(batch)

    def own_rows(self, batch: dict[str, Any], batch_idx: int, stage: str, dataloader_idx: int = 0) -> Optional[dict[str, Any]]:
        """The batch cut to this process's own rows (``None`` where it has none)."""
        if self._trainer is None:
            return batch
        loaders = getattr(self.trainer, f"{stage}_dataloaders", None)
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        sampler = getattr(loader, "sampler", None)
        return sampler.own(batch, batch_idx, loader.batch_size) if isinstance(sampler, EvalShard) else batch

    def configure_optimizers(self) -> dict[str, Any]:
        lr, wd = self.optim.lr, self.optim.weight_decay
        mult, wd_mult = self.optim.multipliers, self.optim.wd_multipliers
        groups = (self.method.param_groups(self, lr, wd, mult, wd_mult) if self.method is not None
                  else default_param_groups(self, lr, wd, mult, wd_mult))
        own = self.method.build_optimizer(groups) if self.method is not None else None
        if own is not None and self.optimizer_factory is not None:
            raise ConfigError(f"method '{self.method_name}' brings its own optimizer ({type(own).__name__}), so "
                              "model.init_args.optimizer cannot apply; remove it (or choose another method)")
        if own is not None:
            optimizer = own
        elif self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(groups)  # the groups' lr and weight_decay override the defaults
            if optimizer.defaults.get("fused") and not self._fused_optimizer_ok():
                raise ConfigError(f"a fused {type(optimizer).__name__} cannot run in this run: Lightning refuses an "
                                  "optimizer that unscales its own gradients with gradient clipping under mixed "
                                  f"precision and under the {type(self.trainer.precision_plugin).__name__} plugin; "
                                  "set fused: false (or trainer.gradient_clip_val: null)")
        else:
            optimizer = adamw(groups, lr, fused=self._fused_optimizer_ok())
        if self.scheduler_factory is not None:
            scheduler = self.scheduler_factory(optimizer)
        else:
            scheduler = lazy_schedule(optimizer, self.optim.schedule, self.optim.warmup_ratio,
                                      lambda: self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _fused_optimizer_ok(self) -> bool:
        """Lightning refuses gradient clipping under AMP (16-mixed, bf16-mixed) with an optimizer that
        unscales its gradients itself, as a fused one does; precision plugins other than 32/16/bf16
        (FSDP, DeepSpeed, bitsandbytes, double, Transformer Engine, XLA) keep torch's default AdamW."""
        from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision

        if self._trainer is None:
            return True
        plugin = self.trainer.precision_plugin
        if isinstance(plugin, MixedPrecision):
            return not (self.trainer.gradient_clip_val or 0) > 0
        return type(plugin) in (Precision, HalfPrecision)

    # ---- checkpoints: only what trained, plus what rebuilds the run ---------------------------
    def trained_keys(self) -> set[str]:
        """Canonical names (no FSDP / compile / activation-checkpointing segments) of what a checkpoint
        keeps: the names of the gathered state dict, whichever strategy wrapped the model."""
        keys = (self.method.checkpoint_keys(self) if self.method is not None
                else {name for name, p in self.named_parameters() if p.requires_grad})
        return {sharding.canonical(k) for k in keys | self.running_stat_keys()}

    def _batch_norms(self, trained: bool) -> list[tuple[str, nn.Module]]:
        return [(name, m) for name, m in self.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                and any(p.requires_grad for p in m.parameters()) == trained]

    def running_stat_keys(self) -> set[str]:
        """Running statistics of the batch-norm layers that train: they change with the weights."""
        return {f"{name}.{buffer}" for name, m in self._batch_norms(trained=True)
                for buffer, value in m.named_buffers(recurse=False) if value is not None}

    def train(self, mode: bool = True) -> "PeftTask":
        """As ``nn.Module.train``, but a frozen batch norm stays in eval mode: its running statistics
        are the pretrained ones, and checkpoints (which hold only what trained) do not carry them."""
        super().train(mode)
        if mode:
            self.keep_frozen_batch_norms()
        return self

    def keep_frozen_batch_norms(self) -> None:
        for _, module in self._batch_norms(trained=False):
            module.eval()

    def on_fit_start(self) -> None:
        if self.method is not None and not self._built:
            raise ConfigError(f"{type(self).__name__}.configure_model did not build the model: a subclass that overrides "
                              "configure_model must call super().configure_model(), which loads the backbone and "
                              "applies the method")

    def on_train_start(self) -> None:
        # Lightning keeps each module's mode rather than calling train(): the backbone loaded in train mode
        self.keep_frozen_batch_norms()
        for config in self.trainer.lr_scheduler_configs:  # the run's length is known now
            settle(config.scheduler)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keys = self.trained_keys()  # canonical; the gathered state dict's names are too, except under compile
        checkpoint["state_dict"] = {sharding.canonical(k): v for k, v in checkpoint["state_dict"].items()
                                    if sharding.canonical(k) in keys}
        checkpoint["lit_peft"] = {
            "task": self.spec(),
            "method": self.method.spec() if self.method is not None else None,
            "rng": rng_state(),
        }
        # every rank's stream (dropout masks differ per rank): a resumed DDP run continues each one
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            per_rank: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_rank, checkpoint["lit_peft"]["rng"])
            checkpoint["lit_peft"]["rng_per_rank"] = per_rank

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoints.check_belongs(checkpoint, self.spec(), self.method.spec() if self.method else None)
        if self.method is not None:
            self.method.adopt_checkpoint(self, checkpoint)
        expected = self.trained_keys()
        # a distributed checkpoint's weights are loaded by the strategy itself and are not in the dict
        saved = set(checkpoint["state_dict"]) if "state_dict" in checkpoint else expected
        missing, unexpected = sorted(expected - saved), sorted(saved - sharding.canonical_keys(self))
        if missing or unexpected:
            problem = f"lacks {len(missing)} trained weights (first: {missing[0]})" if missing else \
                f"holds {len(unexpected)} weights this model does not have (first: {unexpected[0]})"
            raise ConfigError(
                f"the checkpoint {problem}: it was saved with another method or backbone. "
                f"Resume with the config it was trained with (method '{self.method_name}' now)"
            )
        forget_an_exhausted_train_iterator(checkpoint)
        # restored at the first training batch: what runs between here and there (sanity checks,
        # other callbacks) must not shift the random stream an uninterrupted run would have seen
        meta = checkpoint.get("lit_peft", {})
        per_rank = meta.get("rng_per_rank")
        world = self.trainer.world_size if self._trainer is not None else 1
        self._rng_to_restore = per_rank[self.global_rank] if per_rank and len(per_rank) == world else meta.get("rng")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        rng = getattr(self, "_rng_to_restore", None)
        if rng:
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and torch.cuda.is_available() and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
            random.setstate(rng["python"])
            kind, keys, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
            self._rng_to_restore = None


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass. transformers' own (non-reentrant) where the
    model supports it, with the embeddings' output made to require grad so checkpointed blocks behind
    frozen embeddings still reach their adapters; elsewhere (TimesFM, PatchTST) torch's ``checkpoint_wrapper``
    around each block of the longest ``nn.ModuleList``, whose ``_checkpoint_wrapped_module`` name segment
    checkpoints leave out (``lit_peft.sharding.canonical``)."""
    if getattr(model, "supports_gradient_checkpointing", False):
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        try:
            model.enable_input_require_grads()
        except NotImplementedError:  # no input embeddings
            pass
    else:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

        from lit_peft.methods.freeze import find_blocks

        _, blocks = find_blocks(model)
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False


def forget_an_exhausted_train_iterator(checkpoint: dict[str, Any]) -> None:
    """A checkpoint written at the end of an epoch's last batch (a step-count checkpoint, a
    preemption there) holds the train loader's state with every batch yielded. Lightning resumes
    the next epoch by loading that state into the new epoch's iterator, which then does not give
    the order an uninterrupted run draws (LoRA resumed at step 16 of 16 an epoch ended 0.015 off).
    Without the state, the next epoch's iterator starts fresh; ``SplitDataModule._epoch`` says which
    epoch it draws for."""
    fit = checkpoint.get("loops", {}).get("fit_loop", {})
    if fit.get("epoch_loop.batch_progress", {}).get("is_last_batch"):
        fit.get("state_dict", {}).pop("combined_loader", None)


def rng_state() -> dict[str, Any]:
    """This process's random streams: torch's (and the current CUDA device's), Python's, NumPy's."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
            "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()]}


def adamw(groups: list[dict[str, Any]], lr: float, fused: bool = True) -> torch.optim.AdamW:
    """torch's AdamW, fused (one kernel over every tensor rather than a Python loop over them) when
    ``fused`` and every trainable tensor is floating point on a CPU or CUDA device, as transformers'
    Trainer does by default with torch 2.8 or later. For LoRA r=8 on MiniLM's query and value (26
    tensors, 74,498 values) a step takes 0.18 ms against 0.70 ms on one CPU thread here; the update
    is the same AdamW, up to rounding.

    Loading a state dict (a resume) would put back the saved groups' ``fused`` flag, while torch
    decides from the flag at construction whether a gradient scaler may hand the step its scale
    (Lightning's AMP then skips unscaling): a run resumed across the two kinds would crash under
    16-mixed. A post-load hook keeps the kind chosen here and moves ``step`` where it belongs."""
    params = [p for g in groups for p in g["params"]]
    optimizer = None
    if fused and params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        try:
            optimizer = torch.optim.AdamW(groups, lr=lr, fused=True)
        except RuntimeError:  # a torch build without the fused kernel for this device or dtype
            pass
    optimizer = optimizer or torch.optim.AdamW(groups, lr=lr)
    kind = optimizer.defaults["fused"]  # every group's, as built

    def keep_kind(opt: torch.optim.Optimizer) -> None:
        for group in opt.param_groups:
            group["fused"] = kind
            for p in group["params"]:
                step = opt.state.get(p, {}).get("step")
                if kind and isinstance(step, torch.Tensor):  # the fused kernel reads step on the param's device
                    opt.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)

    optimizer.register_load_state_dict_post_hook(keep_kind)
    return optimizer
