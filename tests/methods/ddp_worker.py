"""Run by ``test_ddp_methods.py`` under ``torchrun --nproc_per_node 2``: every row of the method table
(``test_methods.CASES``) fits the tiny BERT with DDP over gloo, two processes, and rank 0 writes what
the test checks to a JSON file: the trainable count, the validation loss before and after (synced
over ranks), whether both ranks end with the same trained state (values and chosen indices), and
the keys of a checkpoint saved under DDP."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from conftest import quiet_trainer  # noqa: E402
from test_methods import CASES, make_data, make_task, trainable, trained_state  # noqa: E402

STEPS = 24  # three epochs: 256 rows, batches of 16 a rank, two ranks (AdaLoRA needs tinit + tfinal < steps)


def run_case(case, tiny_bert: str, toy_data: str, folder: Path) -> dict:
    task, method = make_task(tiny_bert, case), case.make()
    trainer = quiet_trainer(devices=2, strategy="ddp", max_steps=STEPS, callbacks=[method],
                            limit_val_batches=2, default_root_dir=str(folder))
    data = make_data(Path(toy_data))
    before = trainer.validate(task, datamodule=data, verbose=False)[0]["val_loss"]
    trainer = quiet_trainer(devices=2, strategy="ddp", max_steps=STEPS, callbacks=[method],
                            limit_val_batches=2, default_root_dir=str(folder))
    trainer.fit(task, datamodule=data)
    after = trainer.validate(task, datamodule=data, verbose=False)[0]["val_loss"]
    state = {k: v.cpu() for k, v in trained_state(task).items()}
    states = [None, None]
    dist.all_gather_object(states, state)
    ckpt = folder / f"{case.id}.ckpt"
    trainer.save_checkpoint(ckpt)  # on every rank; rank 0 writes
    result = {"trainable": trainable(task), "val_before": before, "val_after": after}
    if trainer.is_global_zero:
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        result["max_rank_difference"] = max(
            (states[0][k].double() - states[1][k].double()).abs().max().item() for k in states[0])
        result["same_keys_on_ranks"] = set(states[0]) == set(states[1])
        result["checkpoint_keys_are_trained_keys"] = set(saved["state_dict"]) == set(task.trained_keys())
        result["world_size"] = trainer.world_size
    return result


def main() -> None:
    tiny_bert, toy_data, out, *only = sys.argv[1:]
    folder = Path(out).parent / "ddp-ckpts"
    results = {}
    for case in CASES:
        if only and case.id not in only:
            continue
        try:
            results[case.id] = run_case(case, tiny_bert, toy_data, folder)
        except Exception:  # the row's error for the test to show; the other rank may be stuck, so stop
            Path(f"{out}.rank{dist.get_rank()}.error").write_text(f"{case.id}\n{traceback.format_exc()[-3000:]}")
            raise
        if dist.get_rank() == 0:  # after every row: what ran is kept if a later row fails
            Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
