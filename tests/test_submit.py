"""``lit-peft slurm``: the sbatch script it renders from the templates in ``slurm/``, what it hands
to ``sbatch``, and its errors. (``tests/slurm/`` submits to a real Slurm.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lit_peft.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "lora_sst2.yaml")


def render(capsys, *args: str) -> str:
    main(["slurm", "--config", CONFIG, "--dry_run", *args])
    return capsys.readouterr().out


def sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def bash_syntax_ok(script: str, tmp_path: Path) -> bool:
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    return subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_the_signal_lead_time_is_an_option(capsys, tmp_path) -> None:
    lines = sbatch_lines(render(capsys, "--signal_lead", "900", "--time", "08:00:00"))
    assert "#SBATCH --signal=SIGUSR1@900" in lines and not any("SIGUSR1@300" in line for line in lines)


def test_single_node_cpu_job(capsys, tmp_path) -> None:
    script = render(capsys, "--cpus_per_task", "2", "--time", "00:30:00", "--", "--trainer.max_epochs", "1")
    lines = sbatch_lines(script)
    assert "#SBATCH --nodes=1" in lines and "#SBATCH --ntasks-per-node=1" in lines
    assert "#SBATCH --cpus-per-task=2" in lines and "#SBATCH --time=00:30:00" in lines
    assert not any("gres" in line or "gpus" in line for line in lines)  # a CPU job asks for no GPU
    assert "#SBATCH --signal=SIGUSR1@300" in lines and "#SBATCH --requeue" in lines  # the default lead time
    assert f"set -- --config {CONFIG} --trainer.max_epochs 1" in script
    assert f"export LIT_PEFT_ENV={sys.prefix}" in script
    assert bash_syntax_ok(script, tmp_path)


def test_multinode_a100_job(capsys, tmp_path) -> None:
    script = render(capsys, "--nodes", "4", "--gpus_per_node", "8", "--gpu_type", "A100", "--partition", "gpu",
                    "--account", "proj42", "--sbatch=--qos=high", "--sbatch=--exclusive")
    lines = sbatch_lines(script)
    for want in ("--nodes=4", "--ntasks-per-node=8", "--gres=gpu:A100:8", "--partition=gpu", "--account=proj42",
                 "--qos=high", "--exclusive"):
        assert f"#SBATCH {want}" in lines, want
    assert len([line for line in lines if "--gres" in line]) == 1  # the template's gres line replaced, not repeated
    assert "srun lit-peft fit" in script and "--trainer.num_nodes \"$SLURM_NNODES\"" in script
    assert bash_syntax_ok(script, tmp_path)


def test_array_of_methods_and_of_configs(capsys, tmp_path) -> None:
    script = render(capsys, "--array_methods", "lora", "dora", "pissa", "--array_parallel", "2")
    assert "#SBATCH --array=0-2%2" in sbatch_lines(script)
    for i, cls in enumerate(("LoRA", "DoRA", "PiSSA")):
        assert f"  {i}) set -- --config {CONFIG} --method lit_peft.methods.{cls} ;;" in script
    other = str(ROOT / "configs" / "dora_sst2.yaml")
    script = render(capsys, "--array_configs", CONFIG, other)
    assert f"  1) set -- --config {CONFIG} --config {other} ;;" in script
    assert bash_syntax_ok(script, tmp_path)


def test_submits_with_sbatch_and_keeps_the_script(tmp_path, monkeypatch, capsys) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\necho "123;cluster"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    main(["slurm", "--config", CONFIG, "--script_dir", str(tmp_path / "scripts")])
    assert "submitted job 123" in capsys.readouterr().out
    (script,) = (tmp_path / "scripts").glob("*.sbatch")
    assert (tmp_path / "args").read_text().split() == ["--parsable", str(script)]
    assert f"set -- --config {CONFIG}" in script.read_text()


@pytest.mark.parametrize("args, message", [
    (["--config", "nope.yaml"], "config file 'nope.yaml' does not exist"),
    (["--config", CONFIG, "--array_methods", "lorra"], "unknown method 'lorra'"),
    (["--config", CONFIG, "--array_methods", "lora", "--array_configs", CONFIG], "not both"),
    (["--config", CONFIG, "--template", "nonesuch"], "no sbatch template 'nonesuch'"),
])
def test_bad_options_get_one_clear_message(args, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["slurm", *args, "--dry_run"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_templates_are_valid_scripts_by_hand() -> None:
    for template in sorted((ROOT / "slurm").glob("*.sbatch")):
        assert subprocess.run(["bash", "-n", str(template)]).returncode == 0, template
        assert "# lit-peft slurm: arguments" in template.read_text()
