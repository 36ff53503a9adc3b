"""The docs cannot drift from the code: every ``lit-peft`` command shown in the README and in
``docs/`` names files that exist and parses (``--print_config`` for the Lightning commands,
``--dry_run`` for ``slurm``), and the worked example of ``docs/extending.md`` runs: its method
fits, trains what it says, and its checkpoint tests."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

from lit_peft.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LIGHTNING = {"fit", "validate", "test", "predict"}


def commands(path: Path) -> list[str]:
    """The ``lit-peft ...`` lines of a markdown file's code (indented or fenced), continuations joined,
    comments dropped."""
    found, pending, fenced = [], "", False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        text = line.strip().removeprefix("$ ")
        if pending:
            text, pending = pending + " " + text, ""
        elif not (fenced or line.startswith("    ")) or not re.match(r"(PYTHONPATH=\S+ )?lit-peft\b", text):
            continue
        if text.endswith("\\"):
            pending = text[:-1].strip()
            continue
        found.append(re.sub(r"\s+#.*$", "", text))
    return found


CASES = [(p, c) for p in DOCS for c in commands(p)]


def test_the_docs_show_commands() -> None:
    assert len(CASES) >= 30
    assert {p.name for p, _ in CASES} >= {"README.md", "tasks.md", "scaling-out.md"}


def strip_option(args: list[str], option: str) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == option:
            skip = True
            continue
        out.append(a)
    return out


@pytest.mark.parametrize(("doc", "command"), CASES, ids=[f"{p.name}:{c[:70]}" for p, c in CASES])
def test_a_documented_command_parses(doc, command, monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.chdir(ROOT)
    words = shlex.split(command.replace("PYTHONPATH=. ", ""))[1:]
    if not words or words[0].startswith("-"):
        try:
            main(words)
        except SystemExit as done:  # --help and --print_completion exit, --version returns
            assert done.code in (0, None), command
        return
    sub, args = words[0], words[1:]
    for i, arg in enumerate(args[:-1]):
        if arg == "--config":
            assert (ROOT / args[i + 1]).is_file(), f"{doc.name}: {args[i + 1]} does not exist"
    if sub == "compare":
        studies = [a for a in args if a.endswith(".yaml")]
        assert studies and all((ROOT / s).is_file() for s in studies), command
        return
    if sub in ("merge", "export"):
        known = {"--ckpt_path", "--output_dir"} | ({"--dtype"} if sub == "merge" else set())
        assert {a for a in args if a.startswith("--")} <= known, command
        return
    if "..." in args or "<" in command:
        return  # a placeholder stands for the user's own files: the configs it names exist (above)
    if sub == "slurm":
        if "--array_configs" in args:
            return  # a.yaml b.yaml: the user's own configs
        assert main(["slurm", *args, "--dry_run"]) in (0, None)
        assert "#SBATCH" in capsys.readouterr().out
        return
    assert sub in LIGHTNING, command
    args = strip_option(args, "--ckpt_path")
    if "my_methods" in command:
        return  # docs/extending.md's own module: test_the_worked_example_runs below
    with pytest.raises(SystemExit) as done:
        main([sub, *args, "--print_config"])
    assert done.value.code in (0, None), command


def worked_example() -> str:
    text = (ROOT / "docs" / "extending.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return block


def test_the_worked_example_runs(tiny_bert, toy_data, tmp_path, monkeypatch) -> None:
    import torch
    import yaml

    (tmp_path / "my_methods.py").write_text(worked_example())
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    config = {"seed_everything": 7,
              "model": {"class_path": "lit_peft.tasks.SequenceClassification",
                        "init_args": {"backbone": tiny_bert, "num_labels": 2, "learning_rate": 1e-2}},
              "data": {"class_path": "lit_peft.data.SST2Data",
                       "init_args": {"data_dir": str(toy_data), "batch_size": 32, "max_length": 16}},
              "method": {"class_path": "my_methods.BitFit", "init_args": {"include_norms": False}},
              "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False,
                          "enable_model_summary": False}}
    path = tmp_path / "bitfit.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    (ckpt,) = (tmp_path / "runs" / "lit-peft").glob("version_0/checkpoints/*.ckpt")
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    biases = {f"backbone.{n}" for n, _ in model.named_parameters() if n.endswith(".bias")}
    head = {f"backbone.{n}" for n, _ in model.named_parameters() if n.startswith("classifier.")}
    assert set(saved["state_dict"]) == biases | head  # only the biases and the head trained
    assert saved["lit_peft"]["method"]["class_path"] == "my_methods.BitFit"
    main(["test", "--config", str(path), "--ckpt_path", str(ckpt)])
    del sys.modules["my_methods"]
