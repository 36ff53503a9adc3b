"""The training loss of an optimizer step as the mean over every response token the step saw, on
every process and across every accumulated micro-batch: what one big batch would give.

Lightning divides each micro-batch's loss by ``accumulate_grad_batches`` and DDP averages gradients
over processes, so a per-micro-batch mean weights a 3-token response in a short micro-batch as much
as a 300-token one elsewhere: the gradient then depends on how rows fall into micro-batches and ranks
(4 x 2 accumulated is not 8 at once, 2 GPUs are not 1). The fix torchtune and transformers' Trainer
(``num_items_in_batch``) use is to divide the summed loss by the step's global token count; both look
ahead at the window's batches to know it. Lightning hands the task one micro-batch at a time, so
``TokenMean`` divides each micro-batch's summed loss by a stand-in ``D`` (the window's first
micro-batch's global token count per process, one all-reduce), so the loss keeps its usual scale,
and, once the window's last micro-batch has run its backward, multiplies the gradients by
``A * W * D / N`` (``N``: the window's global token count, a second all-reduce): the gradient of
``sum / N`` exactly. (The previous window's count would save the first all-reduce, but a resumed run
does not have it, and its gradients would then round differently from the uninterrupted run's.) With
one micro-batch a step (``A = 1``) the factor is 1 and nothing is rescaled. Gradient clipping and the fp16 scaler run after that backward,
so they see the exact gradient.

Our own rather than a library's: Lightning has no token-weighted accumulation (its loss normalisation
is a fixed division by ``accumulate_grad_batches``)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from lit_peft import patches


class TokenMean:
    """One optimizer step's running sums, for a task whose ``loss_terms`` gives (summed loss, tokens)."""

    def __init__(self) -> None:
        self.divisor: Optional[torch.Tensor] = None
        self.total = self.count = None
        self.factor: Optional[torch.Tensor] = None

    @staticmethod
    def window(trainer: Any, batch_idx: int) -> tuple[bool, bool]:
        """Whether micro-batch ``batch_idx`` opens and whether it closes an accumulation window: the
        rules Lightning itself zeroes gradients and steps by (``_make_zero_grad_fn``; ``patches.closes_window``:
        the last window of an epoch may be short)."""
        first = batch_idx % trainer.accumulate_grad_batches == 0
        return first, patches.closes_window(trainer)

    def micro_batch(self, task: Any, total: torch.Tensor, count: torch.Tensor, batch_idx: int) -> tuple[torch.Tensor, bool]:
        """The loss to back-propagate for this micro-batch (``total / D``), and whether it closes its window;
        at a window's last micro-batch it also logs ``train_loss`` (the window's global token mean) and
        readies the gradient factor."""
        trainer, strategy = task.trainer, task.trainer.strategy
        first, last = self.window(trainer, batch_idx)
        count = count.detach().to(total.dtype)
        if first or self.divisor is None:
            # from this window's own first micro-batch: with one micro-batch a step it is exactly the step's
            # count (no rescale at all), and a resumed run computes the same one (bit-exact resume)
            self.divisor = strategy.reduce(count.clone(), reduce_op="sum").clamp(min=1) / trainer.world_size
            self.total, self.count = torch.zeros_like(count), torch.zeros_like(count)
        self.total, self.count = self.total + total.detach(), self.count + count
        loss = total / self.divisor
        self.factor = None
        if last:
            sums = strategy.reduce(torch.stack([self.total, self.count]), reduce_op="sum")
            tokens = sums[1].clamp(min=1)
            task.log("train_loss", sums[0] / tokens, on_step=True, on_epoch=True, prog_bar=True,
                     batch_size=int(tokens))  # already global: equal on every rank
            steps = trainer.accumulate_grad_batches
            if steps > 1:
                self.factor = steps * trainer.world_size * self.divisor / tokens
            self.divisor = None
        return loss, last

    def unscaled(self, term: torch.Tensor, steps: int) -> torch.Tensor:
        """A term added to a window's last micro-batch loss (a method's regularization) so that, after
        Lightning's division by ``steps`` and ``rescale``, it adds to the gradient once, unweighted."""
        return term if self.factor is None else term * steps / self.factor

    def rescale(self, parameters: Any) -> None:
        """After the window's last backward: make the accumulated gradients those of the token mean."""
        if self.factor is None:
            return
        factor = float(self.factor)  # a plain number: sharded (DTensor) gradients take it as they are
        for p in parameters:
            if p.grad is not None:
                p.grad.mul_(factor)
        self.factor = None
