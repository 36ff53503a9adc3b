"""LoRA and the variants that differ only in scaling or initialization, all through peft.

- ``LoRA`` (Hu et al. 2021, arXiv 2106.09685): W + (alpha/r) B A with A, B of rank r; B starts at 0.
- ``DoRA`` (Liu et al. 2024, arXiv 2402.09353): splits W into magnitude and direction and adapts the
  direction with LoRA; the magnitude vector trains too.
- ``RsLoRA`` (Kalajdzievski 2023, arXiv 2312.03732): scales by alpha/sqrt(r) so higher ranks learn.
- ``PiSSA`` (Meng et al. 2024, arXiv 2404.02948): A, B start from the top-r singular vectors of W and
  the residual stays frozen.
- ``OLoRA`` (Büyükakyüz 2024, arXiv 2406.01775): A, B start from a QR decomposition of W.
- ``EVA`` (Paischer et al. 2024, arXiv 2410.07170): A starts from the right singular vectors of the
  layer's input activations on the first training batches; ranks are redistributed by explained
  variance (``rho``).

PiSSA and OLoRA change the frozen base weights, so their adapters are exported converted to plain
LoRA against the original weights (peft's ``path_initial_model_for_weight_conversion``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional, Union

from lightning.pytorch import Trainer

from lit_peft.errors import ConfigError
from lit_peft.methods.peft_adapter import PeftAdapter
from lit_peft.methods.targets import Targets, name_matches


class LoRA(PeftAdapter):
    """Low-rank adapters on the ``targets`` modules."""

    name = "lora"
    #: peft's ``init_lora_weights`` value
    init: Union[bool, str] = True

    def __init__(self, r: int = 8, alpha: float = 16, dropout: float = 0.1, targets: Targets = "qv",
                 bias: str = "none", use_dora: bool = False, use_rslora: bool = False) -> None:
        super().__init__(targets=targets)
        if r <= 0:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {r}")
        self.r, self.alpha, self.dropout, self.bias = r, alpha, dropout, bias
        self.use_dora, self.use_rslora = use_dora, use_rslora

    def lora_kwargs(self) -> dict[str, Any]:
        return {}

    def peft_config(self, task, target_modules: Optional[list[str]]) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=target_modules,
                          bias=self.bias, use_dora=self.use_dora, use_rslora=self.use_rslora,
                          init_lora_weights=self.init, **self.lora_kwargs())


class DoRA(LoRA):
    """Weight-decomposed LoRA: a trained magnitude vector and a LoRA-adapted direction."""

    name = "dora"

    def __init__(self, r: int = 8, alpha: float = 16, dropout: float = 0.1, targets: Targets = "qv",
                 bias: str = "none", use_rslora: bool = False) -> None:
        super().__init__(r=r, alpha=alpha, dropout=dropout, targets=targets, bias=bias, use_dora=True,
                         use_rslora=use_rslora)


class RsLoRA(LoRA):
    """Rank-stabilized LoRA: scaling alpha/sqrt(r)."""

    name = "rslora"

    def __init__(self, r: int = 8, alpha: float = 16, dropout: float = 0.1, targets: Targets = "qv",
                 bias: str = "none", use_dora: bool = False) -> None:
        super().__init__(r=r, alpha=alpha, dropout=dropout, targets=targets, bias=bias, use_dora=use_dora,
                         use_rslora=True)


class _ConvertedOnExport(LoRA):
    """A LoRA variant whose initialization rewrites the frozen base weights (from an SVD or QR of them).

    Its adapter only makes sense on the rewritten base, so ``export`` rebuilds the initial adapter
    (the initialization is deterministic) and lets peft convert the trained one to a plain LoRA of
    rank 2r that loads on the original weights.
    """

    initializes_from_weights = True

    def export(self, task, output_dir: Path) -> None:
        from peft import get_peft_model_state_dict
        from safetensors.torch import load_file, save_file

        initial = task.fresh_copy()
        with tempfile.TemporaryDirectory() as tmp:
            initial.backbone.peft_config["default"].init_lora_weights = True
            initial.backbone.save_pretrained(tmp)
            task.backbone.save_pretrained(str(output_dir), path_initial_model_for_weight_conversion=tmp)
        # peft's conversion keeps only the LoRA matrices; the trained head (modules_to_save) goes back in
        path = output_dir / "adapter_model.safetensors"
        saved = load_file(str(path))
        extra = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(task.backbone).items()
                 if "lora_" not in k and k not in saved}
        if extra:
            save_file({**saved, **extra}, str(path), metadata={"format": "pt"})


class PiSSA(_ConvertedOnExport):
    """LoRA initialized from the principal singular vectors of each target weight."""

    name = "pissa"
    init = "pissa"

    def __init__(self, r: int = 8, alpha: float = 8, dropout: float = 0.0, targets: Targets = "qv",
                 bias: str = "none") -> None:
        super().__init__(r=r, alpha=alpha, dropout=dropout, targets=targets, bias=bias)


class OLoRA(_ConvertedOnExport):
    """LoRA initialized from a QR decomposition of each target weight."""

    name = "olora"
    init = "olora"

    def __init__(self, r: int = 8, alpha: float = 16, dropout: float = 0.0, targets: Targets = "qv",
                 bias: str = "none") -> None:
        super().__init__(r=r, alpha=alpha, dropout=dropout, targets=targets, bias=bias)

    def peft_config(self, task, target_modules: Optional[list[str]]) -> Any:
        config = super().peft_config(task, target_modules)
        if _conv1d_targets(task, target_modules):
            config.init_lora_weights = True  # initialize() does OLoRA's QR, the right way round for Conv1D
        return config

    def initialize(self, task, trainer: Optional[Trainer]) -> None:
        """peft's ``olora_init`` takes the QR of the stored weight as if it were (out, in); GPT-2's
        ``Conv1D`` stores (in, out), so peft's A and B would not even have the layer's shapes
        (fused ``c_attn``) and the base would lose the transpose of what the adapter adds. Where a
        target is a Conv1D, every target is initialized here: Linear layers by peft's own
        ``olora_init``, Conv1D layers by the same QR of the (out, in) weight."""
        if task.backbone.peft_config["default"].init_lora_weights != "olora":
            from peft.tuners.lora import LoraLayer
            from transformers.pytorch_utils import Conv1D

            for layer in task.backbone.modules():
                if isinstance(layer, LoraLayer) and "default" in layer.lora_A:
                    if isinstance(layer.get_base_layer(), Conv1D):
                        _olora_conv1d(layer, "default")
                    else:
                        layer.olora_init("default")
        super().initialize(task, trainer)


def _conv1d_targets(task, names: Optional[list[str]]) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in task.backbone.named_modules() if isinstance(m, Conv1D)
            and any(name_matches(n, t) for t in names or [])]


def _olora_conv1d(layer, adapter: str) -> None:
    """OLoRA's initialization for a Conv1D (weight stored (in, out)): W = QR, A = R[:r], B = Q[:, :r],
    and the frozen base keeps W - scale B A."""
    import torch

    base = layer.get_base_layer()
    weight = base.weight.data.T.to(torch.float32)  # (out, in)
    q, r_mat = torch.linalg.qr(weight)
    rank, scale = layer.r[adapter], layer.scaling[adapter]
    a, b = r_mat[:rank].contiguous(), q[:, :rank].contiguous()
    layer.lora_A[adapter].weight.data = a.to(layer.lora_A[adapter].weight.dtype)
    layer.lora_B[adapter].weight.data = b.to(layer.lora_B[adapter].weight.dtype)
    base.weight.data = (weight - scale * b @ a).T.contiguous().to(base.weight.dtype)


class _Unlabelled:
    """Re-iterable view of the training loader without per-sequence class labels (EVA forwards inputs only).

    EVA runs in configure_model, which Lightning calls with the root device (a GPU) as torch's default
    device; the loader's samplers make their tensors and draw from CPU generators, which fails under another
    default device. So the loader is made, and each batch fetched, with the CPU as the default device; the
    model's forward (outside those blocks) keeps Lightning's."""

    def __init__(self, make_loader) -> None:
        import torch

        self.make_loader = make_loader
        with torch.device("cpu"):
            self.loader = make_loader()

    def __iter__(self):
        import torch

        with torch.device("cpu"):
            batches = iter(self.loader)
        while True:
            with torch.device("cpu"):
                batch = next(batches, None)
            if batch is None:
                return
            yield {k: v for k, v in batch.items() if not (k == "labels" and v.dim() == 1)}

    def __len__(self) -> int:
        return len(self.loader)


def _flat_positions(layer_input, model_input, layer_name: str):
    """A layer's input as (positions, features) for EVA's SVD (peft's default views, which fails on
    PatchTST's non-contiguous inputs)."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    return x.reshape(-1, x.shape[-1])


class EVA(LoRA):
    """LoRA with A initialized from the SVD of input activations on the first training batches.

    With ``rho > 1`` EVA redistributes ranks between layers (and may drop a layer). The resulting
    ``layout`` (target modules, rank and alpha patterns) is kept as an init argument, so every
    checkpoint and export records it and a rebuilt method has the trained shapes.
    """

    name = "eva"
    # what EVA's data-driven initialisation chose is ``layout`` (the ranks), saved in the checkpoint and
    # taken from it; the values it started from are overwritten by the trained ones
    training_only = frozenset({"dropout", "rho", "tau", "whiten", "layout"})
    init = "eva"
    initializes_from_weights = True

    def __init__(self, r: int = 8, alpha: float = 16, dropout: float = 0.1, targets: Targets = "qv",
                 rho: float = 2.0, tau: float = 0.99, whiten: bool = False, layout: Optional[dict] = None) -> None:
        """
        Args:
            layout: set by EVA after its initialization (leave empty in configs).
        """
        super().__init__(r=r, alpha=alpha, dropout=dropout, targets=targets)
        if rho < 1.0:
            raise ConfigError(f"EVA's rho must be >= 1 (1 keeps every layer at rank r), got {rho}")
        self.rho, self.tau, self.whiten, self.layout = rho, tau, whiten, layout

    def lora_kwargs(self) -> dict[str, Any]:
        from peft import EvaConfig

        return {"eva_config": EvaConfig(rho=self.rho, tau=self.tau, whiten=self.whiten)}

    def peft_config(self, task, target_modules: Optional[list[str]]) -> Any:
        config = super().peft_config(task, target_modules)
        if self.layout:  # rebuilt: EVA's shapes; the weights come from the checkpoint or adapter
            config.target_modules = list(self.layout["target_modules"])
            config.rank_pattern = dict(self.layout["rank_pattern"])
            config.alpha_pattern = dict(self.layout["alpha_pattern"])
            config.init_lora_weights = True
        return config

    def initialize(self, task, trainer: Optional[Trainer]) -> None:
        from peft import initialize_lora_eva_weights

        if self.layout is not None or trainer is None or trainer.datamodule is None or trainer.state.fn != "fit":
            return  # rebuilt for merge/export, or test/validate/predict: the trained weights come from the checkpoint
        loader = _Unlabelled(trainer.datamodule.train_dataloader)
        device = trainer.strategy.root_device
        backbone = task.backbone.to(device)

        def forward(model, inputs):
            inputs = {k: v.to(device) for k, v in inputs.items()}
            # a task whose batches are not the model's keyword arguments (a forecaster's windows) says how to run one
            run = getattr(task, "activation_forward", None)
            return run(inputs) if run is not None else model(**inputs)

        # token data: peft's language-modelling defaults skip padded positions; windows of series have none,
        # and each layer's input is flattened to (positions, features)
        windows = getattr(task, "activation_forward", None) is not None
        kwargs = {"prepare_model_inputs_fn": None, "prepare_layer_inputs_fn": _flat_positions} if windows else {}
        initialize_lora_eva_weights(backbone, dataloader=loader, forward_fn=forward,
                                    show_progress_bar=False, **kwargs)
        config = backbone.peft_config["default"]
        self.layout = {"target_modules": sorted(config.target_modules), "rank_pattern": dict(config.rank_pattern),
                       "alpha_pattern": dict(config.alpha_pattern)}

    def adopt_checkpoint(self, task, checkpoint: dict[str, Any]) -> None:
        """Take the checkpoint's layout where it differs (a config without one, resumed or tested):
        the adapters are rebuilt with its shapes before its weights load (optimizers come later)."""
        saved = ((checkpoint.get("lit_peft") or {}).get("method") or {}).get("init_args", {}).get("layout")
        if saved and saved != self.layout:
            self.layout = saved
            task.backbone = task.backbone.unload()
            self.apply(task, None)
            task.check_trainable()
