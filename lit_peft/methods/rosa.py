"""RoSA, robust adaptation (Nikdan et al. 2024, arXiv 2401.04679): W + BA + S.

A low-rank LoRA component (peft) and a sparse component S on the same layers train together.
S's support is chosen before training from the gradients of the full weights accumulated over the
first ``selection_batches`` batches (the paper's warm-up; here with the adapters at their initial
state, where B = 0 and the model is the pretrained one), keeping the ``density`` fraction of
largest magnitude in each layer.

The reference implementation needs CUDA sparse kernels; this one computes S through
``lit_peft.methods.sparse.SparseDelta`` and runs on the CPU too. With ``quant_type`` set (``nf4`` or
``fp4``) the backbone is quantized to 4 bits on load, as for QLoRA, and S adds to the quantized
layer's output. ``merge`` folds S into the (dequantized) weights, then lets peft merge BA.
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch import Trainer
from torch import nn

from lit_peft.errors import ConfigError
from lit_peft.methods.lora import LoRA
from lit_peft.methods.qlora import check_quant_type, dequantized_twin, prepare_quantized, quantization_kwargs
from lit_peft.methods.sparse import SparseDelta, SparseMixin, fold_all, sparse_size
from lit_peft.methods.targets import Targets


class RoSA(SparseMixin, LoRA):
    """LoRA plus a gradient-chosen sparse increment on the targeted layers."""

    name = "rosa"
    training_only = frozenset({"dropout", "compute_dtype", "selection_batches"})  # the mask is saved with the weights
    initializes_from_weights = True  # optionally quantized while it loads

    def __init__(self, r: int = 8, alpha: float = 16, dropout: float = 0.1, targets: Targets = "qv",
                 density: float = 0.01, selection_batches: int = 8, quant_type: Optional[str] = None,
                 double_quant: bool = True, compute_dtype: Optional[str] = None) -> None:
        """
        Args:
            r, alpha, dropout, targets: the LoRA component, as for LoRA.
            density: fraction of each targeted weight's entries in the sparse component.
            selection_batches: training batches whose gradients choose the sparse entries.
            quant_type: ``nf4`` or ``fp4`` for a 4-bit backbone; ``null`` keeps it in full precision.
            double_quant, compute_dtype: 4-bit settings, as for QLoRA.
        """
        super().__init__(r=r, alpha=alpha, dropout=dropout, targets=targets)
        if not 0.0 < density <= 1.0:
            raise ConfigError(f"density must be in (0, 1], got {density}")
        if selection_batches < 1:
            raise ConfigError(f"selection_batches must be at least 1, got {selection_batches}")
        if quant_type is not None:
            check_quant_type(quant_type, compute_dtype)
        self.density, self.selection_batches = density, selection_batches
        self.quant_type, self.double_quant, self.compute_dtype = quant_type, double_quant, compute_dtype
        if quant_type is not None:
            self.merge_note = "the 4-bit base weights are dequantized before S and BA are merged"

    def backbone_kwargs(self, trainer: Optional[Trainer] = None) -> dict[str, Any]:
        if self.quant_type is None:
            return {}
        return quantization_kwargs(trainer, self.quant_type, self.double_quant, self.compute_dtype)

    def apply(self, task, trainer: Optional[Trainer]) -> None:
        from peft.tuners.lora import LoraLayer

        if self.quant_type is not None:
            prepare_quantized(task)
        super().apply(task, trainer)  # peft's LoRA on the targets
        for module in task.backbone.modules():
            if isinstance(module, LoraLayer) and not isinstance(module.base_layer, SparseDelta):
                module.base_layer = SparseDelta(module.base_layer, sparse_size(module.base_layer, self.density))

    def merge(self, task) -> nn.Module:
        if self.quant_type is not None:
            plain = RoSA(r=self.r, alpha=self.alpha, dropout=self.dropout, targets=self.targets, density=self.density,
                         selection_batches=self.selection_batches)
            task = dequantized_twin(task, plain)
            print(f"[lit-peft] rosa merge: dequantized the {self.quant_type} 4-bit base weights before merging")
        fold_all(task.backbone)
        return task.backbone.merge_and_unload()

    def export(self, task, output_dir) -> None:
        self.save_trained_state(task, output_dir)
