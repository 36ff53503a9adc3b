"""What the ``lit-peft`` command keeps out of a normal run's output, each with the reason.

The libraries print notes of their own that do not concern the user of a run, and that no
setting turns off one by one; the CLI drops exactly those messages (matched by logger or
warning text), and everything else, genuine warnings included, goes through:

- bitsandbytes, on import (peft imports it for every method), on CPUs with AVX512-BF16: it could
  not fetch an optional bf16 4-bit kernel from the hub. lit-peft does not use that kernel (its
  4-bit CPU path dequantizes, ``methods.qlora.exact_cpu_compute``).
- Lightning's "💡 Tip" adverts for litlogger and litmodels.
- Lightning's note that the trainer has a model summary already: the CLI adds lit-peft's own
  (``PeftModelSummary``), which the note would announce at every run.
- Lightning's hint that ``srun`` exists but is not used: a local run on a machine with Slurm
  installed is what the user asked for; ``lit-peft slurm`` is the way through srun.
- transformers' load report for a head the task adds: ``backbones.load_model`` says it once in
  its own words (and reports any other missing or unused weight, which is a real problem).
- Deprecation warnings raised inside a library by another library's internals (transformers'
  ``is_gradient_checkpointing`` called by peft, torchdata's ``set_vital``, Lightning's use of
  torch's ``LeafSpec``): nothing the user's config can change.
- transformers' "Loading weights" progress bar (a local load takes under a second).
"""

from __future__ import annotations

import logging
import warnings

#: logger name -> messages of it to drop
LOG_NOTES = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip:", "Trainer already configured with model summary callbacks"),
    "transformers.modeling_utils": ("LOAD REPORT",),
}
#: warnings (message starts) raised from library internals
WARNINGS = (
    r"`is_gradient_checkpointing` is deprecated",
    r"'set_vital' is deprecated",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"The `srun` command is available on your system but is not used",
)


class _DropNotes(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(s in message for s in self.starts)


def install() -> None:
    """Drop the notes above from this process's output (idempotent)."""
    for name, starts in LOG_NOTES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotes) for f in logger.filters):
            logger.addFilter(_DropNotes(starts))
    for pattern in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass

