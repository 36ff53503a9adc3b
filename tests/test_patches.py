"""Each private Lightning attribute lit-peft touches (lit_peft/patches.py), checked against the installed
Lightning, so an upgrade that moves it fails here by name. The behaviour each patch buys is tested where it
matters: the partial sharded load in tests/test_fsdp.py (sharded FSDP1 resume), the DDP init sync in
tests/methods/test_ddp_methods.py (every method's trained state equal on both ranks)."""

from __future__ import annotations

import inspect


def test_ddp_init_sync_is_turned_off_unless_the_run_set_it() -> None:
    from lightning.pytorch.strategies import DDPStrategy

    from lit_peft.patches import ddp_without_init_sync

    strategy = DDPStrategy()
    assert ddp_without_init_sync(strategy) is True and strategy._ddp_kwargs["init_sync"] is False
    kept = DDPStrategy(init_sync=True)
    assert ddp_without_init_sync(kept) is False and kept._ddp_kwargs["init_sync"] is True
    # Lightning hands exactly these kwargs to torch's DistributedDataParallel, which knows init_sync
    from torch.nn.parallel import DistributedDataParallel

    assert "self._ddp_kwargs" in inspect.getsource(DDPStrategy._setup_model)
    assert "init_sync" in inspect.signature(DistributedDataParallel).parameters


def test_the_sharded_load_patch_replaces_the_function_lightning_calls() -> None:
    import lightning.pytorch.strategies.fsdp as pytorch_fsdp

    from lit_peft import patches

    import lightning.fabric.strategies.model_parallel as fabric_model_parallel

    assert "_distributed_checkpoint_load(module_state, path)" in inspect.getsource(pytorch_fsdp.FSDPStrategy.load_checkpoint)
    assert "_distributed_checkpoint_load(module_state, path)" in inspect.getsource(fabric_model_parallel._load_checkpoint)
    patches.partial_sharded_load()
    assert pytorch_fsdp._distributed_checkpoint_load is patches._partial_distributed_checkpoint_load
    assert fabric_model_parallel._distributed_checkpoint_load is patches._partial_distributed_checkpoint_load


def test_ddp_without_init_sync_still_starts_every_rank_from_rank_0s_adapters(tiny_bert, toy_data, tmp_path) -> None:
    """Ranks seeded differently start with different LoRA weights; with DDP's init sync off, lit-peft's own
    broadcast of what trains must still leave both ranks with the same weights after training."""
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp_init.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), str(Path(__file__).parent / "ddp_init_worker.py"),
                           tiny_bert, str(toy_data), str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["init_sync"] is False and got["tensors"] > 0
    assert got["max_rank_difference"] == 0.0
