"""benchmarks/gpu_check.py is the run a lent GPU makes; here its paths run on the CPU on a tiny Llama (two cases
and the resume check), so the script a GPU session runs is known to work before the GPU is there: each case
trains and reports throughput from Lightning's ThroughputMonitor, and the resumed LoRA run ends on the
uninterrupted run's weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_paths_run_on_the_cpu(tiny_llama, toy_gsm8k, tmp_path) -> None:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu", "--backbone", tiny_llama,
                           "--data_dir", str(toy_gsm8k), "--steps", "3", "--batch_size", "4", "--max_length", "96",
                           "--only", "lora", "lora-fsdp2", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["case"]: r for r in report["rows"]}
    assert set(rows) == {"lora", "lora-fsdp2", "resume"}
    for case in ("lora", "lora-fsdp2"):
        assert rows[case]["steps"] == 3 and rows[case]["tokens_per_s"] > 0
        assert rows[case]["trainable"] == rows["lora"]["trainable"]
    assert rows["resume"]["max_abs_difference"] == 0.0 and rows["resume"]["tensors"] > 0
