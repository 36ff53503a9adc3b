"""The causal-LM training loss is the mean over every response token of the optimizer step, whatever
the layout: one step of LoRA on the same 8 rows (responses of 1 to about 60 tokens) gives the same
gradients and the same logged ``train_loss`` from 1 process x 8 rows, 1 process x 4 rows x 2 accumulated,
2 DDP processes x 4 rows and 2 processes x 2 rows x 2 accumulated (``token_mean_worker.py``, gloo).
With ``TokenMean.rescale`` made a no-op (a mean of per-micro-batch means, Lightning's accumulation)
the two accumulated layouts fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import torchrun

HERE = Path(__file__).resolve().parent
LAYOUTS = {"1x8": (1, 8, 1), "1x4x2": (1, 4, 2), "2x4": (2, 4, 1), "2x2x2": (2, 2, 2)}


def rows(n: int) -> list[dict]:
    out = []
    for i in range(n):  # responses from a bare answer to a long worked solution
        steps = " ".join(f"Then {j} + {i} = {i + j}." for j in range(1, [0, 1, 9, 2, 0, 6, 1, 3][i % 8] + 1))
        out.append({"question": f"What is {i} + {i + 1}?", "answer": f"{steps} #### {2 * i + 1}".strip()})
    return out


@pytest.fixture(scope="module")
def layouts(tiny_llama, tmp_path_factory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("token-mean")
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(9)))  # 8 train + 1 held out
    (folder / "test.jsonl").write_text(json.dumps(rows(1)[0]) + "\n")
    got = {}
    for name, (nproc, batch, accumulate) in LAYOUTS.items():
        out = folder / f"{name}.pt"
        done = torchrun(HERE / "token_mean_worker.py", nproc, tiny_llama, folder, batch, accumulate, out)
        assert done.returncode == 0, f"{name}: {done.stderr[-4000:]}"
        got[name] = torch.load(out, weights_only=True)
    return got


@pytest.mark.parametrize("name", ["1x4x2", "2x4", "2x2x2"])
def test_every_layout_gives_the_gradient_of_the_token_mean(layouts, name) -> None:
    reference, got = layouts["1x8"], layouts[name]
    assert reference["rows_seen"] == got["rows_seen"] == 8
    assert got["grads"].keys() == reference["grads"].keys() and reference["grads"]
    moved = [n for n, g in reference["grads"].items() if g.abs().max() > 0]
    assert moved  # LoRA's B matrices get a gradient at the first step
    for key, grad in reference["grads"].items():
        torch.testing.assert_close(got["grads"][key], grad, rtol=1e-4, atol=1e-7,
                                   msg=lambda m: f"{name}: {key}: {m}")
    assert got["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)

