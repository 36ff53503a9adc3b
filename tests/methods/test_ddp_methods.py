"""Every row of the method table under DDP: two processes over gloo (``torchrun``, ``ddp_worker.py``).

For each method: the trainable count is the single-process one, the validation loss (synced over
ranks) falls, both ranks end with the same trained state (values and SIFT's and RoSA's chosen
indices), and a checkpoint saved under DDP holds exactly what trained."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from test_methods import CASES

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ddp_results(tiny_bert, toy_data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp") / "results.json"
    with socket.socket() as s:  # a free port for the rendezvous (torchrun's --master_port 0 hangs)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), str(HERE / "ddp_worker.py"), tiny_bert, str(toy_data), str(out)],
                          capture_output=True, text=True, timeout=1200)
    errors = {p.name: p.read_text() for p in out.parent.glob("*.error")}
    results = json.loads(out.read_text()) if out.exists() else {}
    return {"results": results, "errors": errors, "returncode": done.returncode, "tail": done.stderr[-3000:]}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_method_under_ddp(case, ddp_results) -> None:
    got = ddp_results["results"].get(case.id)
    if got is None:
        pytest.fail(f"no DDP result for {case.id} (exit {ddp_results['returncode']}): "
                    f"{ddp_results['errors'] or ddp_results['tail']}")
    assert got["world_size"] == 2
    assert got["trainable"] == case.trainable
    assert got["val_after"] < got["val_before"]
    assert got["same_keys_on_ranks"] and got["max_rank_difference"] == 0.0
    assert got["checkpoint_keys_are_trained_keys"]
