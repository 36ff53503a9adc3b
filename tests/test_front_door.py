"""What a new user sees: every bad input ends in one short message (the key or file named, the
closest accepted names where there are some, a pointer to --help), exit status 2 and no
traceback; a normal run prints no library notes that do not concern them; a run always gets a
folder of its own; --version and shell completion work."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_peft.cli import main

ROOT = Path(__file__).resolve().parents[1]
LORA_SST2 = str(ROOT / "configs" / "lora_sst2.yaml")


def tiny_config(folder: Path, tiny_bert: str, toy_data: Path, method: str = "LoRA", **trainer) -> Path:
    config = {
        "seed_everything": 7,
        "model": {"class_path": "lit_peft.tasks.SequenceClassification",
                  "init_args": {"backbone": tiny_bert, "num_labels": 2, "learning_rate": 2e-2}},
        "data": {"class_path": "lit_peft.data.SST2Data",
                 "init_args": {"data_dir": str(toy_data), "batch_size": 32, "max_length": 16}},
        "method": {"class_path": f"lit_peft.methods.{method}", "init_args": {"r": 4, "alpha": 8}},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(folder / "runs"), **trainer},
    }
    path = folder / f"{method.lower()}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(monkeypatch, capsys, *args: str) -> tuple[int, list[str]]:
    """``lit-peft ARGS`` as the shell runs it (``sys.argv``): exit status and the lines printed."""
    monkeypatch.setattr(sys, "argv", ["lit-peft", *args])
    code = 0
    try:
        main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    out = capsys.readouterr()
    return code, [line for line in (out.err + out.out).splitlines() if line.strip()]


@pytest.fixture(scope="module")
def lora_ckpt(tiny_bert, toy_data, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("front-door")
    config = tiny_config(folder, tiny_bert, toy_data)
    main(["fit", "--config", str(config)])
    (ckpt,) = (folder / "runs").glob("lit-peft/version_0/checkpoints/*.ckpt")
    return ckpt


def bad_files(folder: Path, ckpt: Path) -> dict[str, Path]:
    truncated = folder / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:20_000])
    text = folder / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    plain = folder / "plain.ckpt"
    torch.save({"weights": torch.zeros(2)}, plain)
    foreign = folder / "lightning.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    saved.pop("lit_peft")
    torch.save(saved, foreign)
    broken = folder / "broken.yaml"
    broken.write_text("model:\n  class_path: x\n bad: [\n")
    typo = folder / "typo.yaml"
    typo.write_text("trainer:\n  max_epoch: 3\n")
    return {"truncated": truncated, "text": text, "plain": plain, "foreign": foreign, "broken": broken, "typo": typo}


# (arguments, what the message must hold); {name} is a file from bad_files, {ckpt} the real checkpoint
PARSE_ERRORS = [
    (["fit", "--config", LORA_SST2, "--model.init_args.learning_rat", "0.1"],
     ["SequenceClassification has no option 'learning_rat'", "did you mean 'learning_rate'"]),
    (["fit", "--config", LORA_SST2, "--config", "{typo}"], ["unknown option 'trainer.max_epoch'", "'trainer.max_epochs'"]),
    (["fit", "--config", "{folder}/absent.yaml"], ["absent.yaml", "does not exist"]),
    (["fit", "--config", "{broken}"], ["broken.yaml, line 3, column 2", "not valid YAML"]),
    (["fit", "--config", LORA_SST2, "--method.class_path", "lit_peft.methods.LoRAA"],
     ["method: no class 'lit_peft.methods.LoRAA'", "did you mean 'LoRA'"]),
    (["fit", "--config", LORA_SST2, "--data.class_path", "lit_peft.data.SST2Dta"], ["did you mean 'SST2Data'"]),
    (["fit", "--config", LORA_SST2, "--trainer.max_epochs", "abc"], ["trainer.max_epochs: expected int, got 'abc'"]),
    (["fit", "--config", LORA_SST2, "--method.init_args.r", "abc"], ["method.init_args.r: expected int, got 'abc'"]),
    (["fit", "--config", LORA_SST2, "--method.init_args.rr", "3"], ["LoRA has no option 'rr'", "did you mean 'r'"]),
    (["fit", "--model.init_args.learning_rate", "0.1", "--config", LORA_SST2],
     ["--model.init_args.learning_rate was given before the class", "put --config"]),
    (["fitt"], ["unknown command 'fitt'", "did you mean 'fit'"]),
    (["fit"], ["no data and model given", "--config"]),
]
CHECKPOINT_ERRORS = [
    ("{folder}/absent.ckpt", ["absent.ckpt", "does not exist"]),
    ("{truncated}", ["truncated.ckpt", "cannot be read", "truncated"]),
    ("{text}", ["notes.ckpt", "cannot be read"]),
    ("{plain}", ["plain.ckpt", "not a Lightning checkpoint"]),
    ("{foreign}", ["lightning.ckpt", "not written by lit-peft"]),
    ("{folder}", ["is a folder", ".ckpt"]),
]


def fill(args: list[str], files: dict[str, Path], folder: Path) -> list[str]:
    return [a.format(folder=folder, **files) for a in args]


def assert_short(code: int, lines: list[str], expected: list[str]) -> None:
    assert code == 2, lines
    assert len(lines) <= 2, lines  # the message (and at most one genuine warning)
    assert not any("Traceback" in line or "usage:" in line for line in lines), lines
    message = lines[-1]
    assert message.startswith("lit-peft: error: "), lines
    for part in expected:
        assert part in message, (part, message)


PARSE_IDS = ["key_typo", "key_typo_in_stacked_config", "missing_config", "yaml_error", "unknown_method_class",
             "unknown_data_class", "wrong_type", "wrong_type_in_class", "unknown_class_option", "wrong_order",
             "unknown_command", "no_config"]


@pytest.mark.parametrize(("args", "expected"), PARSE_ERRORS, ids=PARSE_IDS)
def test_a_bad_command_line_gets_one_short_message(args, expected, monkeypatch, capsys, tmp_path) -> None:
    files = bad_files(tmp_path, _dummy_ckpt(tmp_path))
    code, lines = run(monkeypatch, capsys, *fill(args, files, tmp_path))
    assert_short(code, lines, expected)
    if "did you mean" in " ".join(expected) or "unknown" in lines[-1]:
        assert "--help" in lines[-1]


def _dummy_ckpt(folder: Path) -> Path:
    path = folder / "dummy.ckpt"
    torch.save({"state_dict": {}, "lit_peft": {}}, path)
    return path


@pytest.mark.parametrize("command", ["merge", "export", "test"])
@pytest.mark.parametrize(("ckpt", "expected"), CHECKPOINT_ERRORS, ids=[c[0].strip("{}").split("/")[-1] for c in CHECKPOINT_ERRORS])
def test_a_bad_checkpoint_gets_one_short_message(command, ckpt, expected, lora_ckpt, tiny_bert, toy_data, monkeypatch,
                                                 capsys, tmp_path) -> None:
    files = bad_files(tmp_path, lora_ckpt)
    path = ckpt.format(folder=tmp_path, **files)
    if command == "test":
        args = ["test", "--config", str(tiny_config(tmp_path, tiny_bert, toy_data)), "--ckpt_path", path]
    else:
        args = [command, "--ckpt_path", path, "--output_dir", str(tmp_path / "out")]
    code, lines = run(monkeypatch, capsys, *args)
    assert_short(code, lines, expected)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_another_method_is_refused_by_name(lora_ckpt, tiny_bert, toy_data, monkeypatch, capsys,
                                                           tmp_path) -> None:
    # RsLoRA has LoRA's keys and shapes: without the check the checkpoint would load with the wrong scale
    config = tiny_config(tmp_path, tiny_bert, toy_data, method="RsLoRA")
    code, lines = run(monkeypatch, capsys, "test", "--config", str(config), "--ckpt_path", str(lora_ckpt))
    assert_short(code, lines, ["does not belong to this run", "method LoRA (this run: RsLoRA)", "config.yaml"])


def test_debug_shows_the_traceback(monkeypatch, capsys, tmp_path) -> None:
    from lit_peft.errors import ConfigError

    monkeypatch.setattr(sys, "argv", ["lit-peft", "fit", "--config", str(tmp_path / "absent.yaml"), "--debug"])
    with pytest.raises(ConfigError, match="absent.yaml"):
        main()
    monkeypatch.setenv("LIT_PEFT_DEBUG", "1")
    monkeypatch.setattr(sys, "argv", ["lit-peft", "fit", "--config", str(tmp_path / "absent.yaml")])
    with pytest.raises(ConfigError):
        main()


def test_version(monkeypatch, capsys) -> None:
    import lit_peft

    code, lines = run(monkeypatch, capsys, "--version")
    assert code == 0 and lines == [f"lit-peft {lit_peft.__version__}"]


def test_bash_completion_completes_commands_and_keys(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setattr(sys, "argv", ["lit-peft", "--print_completion", "shtab-bash"])
    with pytest.raises(SystemExit):
        main()
    script = tmp_path / "lit-peft.bash"
    script.write_text(capsys.readouterr().out)

    def complete(*words: str) -> list[str]:
        line = " ".join(("lit-peft",) + words)
        probe = (f'source {script}; COMP_WORDS=(lit-peft {" ".join(words)}); COMP_CWORD={len(words)}; '
                 f'COMP_LINE="{line}"; COMP_POINT={len(line)}; _shtab_lit_peft; printf "%s\\n" "${{COMPREPLY[@]}}"')
        done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=60)
        return done.stdout.split()

    assert {"fit", "validate", "test", "predict"} <= set(complete(""))
    assert "--trainer.max_epochs" in complete("fit", "--trainer.max_ep")


def fit_output(folder: Path, *args: str) -> list[str]:
    done = subprocess.run([sys.executable, "-m", "lit_peft.cli", "fit", *args], cwd=folder, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]


@pytest.fixture(scope="module")
def headless_bert(tiny_bert, tmp_path_factory) -> str:
    """The tiny BERT saved without a classification head, as pretrained encoders come."""
    from transformers import AutoTokenizer, BertModel

    folder = tmp_path_factory.mktemp("headless-bert")
    BertModel.from_pretrained(tiny_bert).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    return str(folder)


NOISE = ["gemm_4bit_forward", "💡 Tip", "litlogger", "litmodels", "LOAD REPORT", "args parameter is intended",
         "is deprecated", "Loading weights", "srun", "Traceback"]


def test_a_normal_run_is_quiet(headless_bert, toy_data, tmp_path) -> None:
    config = tiny_config(tmp_path, headless_bert, toy_data)
    lines = fit_output(tmp_path, "--config", str(config), "--trainer.log_every_n_steps", "1")
    for noise in NOISE:
        assert not any(noise in line for line in lines), (noise, lines)
    # the new head is said once, in lit-peft's words
    said = [line for line in lines if "new, trained from scratch" in line]
    assert len(said) == 1 and "classifier.weight" in said[0] and "classifier.bias" in said[0]
    assert any(line.startswith("[lit-peft] lora on SST2Data: val_acc=") for line in lines)
    assert len(lines) <= 10, lines


def test_runs_without_a_logger_get_folders_of_their_own(tiny_bert, toy_data, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path, tiny_bert, toy_data)
    main(["fit", "--config", str(config), "--trainer.logger", "false", "--trainer.max_steps", "2"])
    main(["fit", "--config", str(config), "--trainer.fast_dev_run", "1"])
    main(["fit", "--config", str(config), "--trainer.logger", "false", "--trainer.max_steps", "3"])
    root = tmp_path / "runs" / "lit-peft"
    assert sorted(p.name for p in root.iterdir()) == ["version_0", "version_1", "version_2"]
    samples = [json.loads((root / v / "summary.json").read_text())["train_samples"] for v in ("version_0", "version_1", "version_2")]
    assert samples == [2 * 32, 1 * 32, 3 * 32]  # steps of 32 rows: each folder holds its own run
    assert list((root / "version_0" / "checkpoints").glob("*.ckpt")) and not (tmp_path / "summary.json").exists()
    assert not (tmp_path / "runs" / "checkpoints").exists()


def test_default_root_dir_moves_the_run(tiny_bert, toy_data, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path, tiny_bert, toy_data, max_steps=1)
    yaml_config = yaml.safe_load(config.read_text())
    yaml_config["trainer"].pop("default_root_dir")
    yaml_config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"name": "toy"}}
    config.write_text(yaml.safe_dump(yaml_config))
    main(["fit", "--config", str(config)])
    main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "elsewhere")])
    assert (tmp_path / "runs" / "toy" / "version_0" / "summary.json").is_file()  # runs/ by default
    assert (tmp_path / "elsewhere" / "toy" / "version_0" / "summary.json").is_file()
    assert not (tmp_path / "runs" / "toy" / "version_1").exists()


def test_every_config_leaves_save_dir_to_the_root() -> None:
    for path in (ROOT / "configs").rglob("*.yaml"):
        loggers = (yaml.safe_load(path.read_text()).get("trainer") or {}).get("logger")
        for spec in loggers if isinstance(loggers, list) else [loggers]:
            if isinstance(spec, dict):
                assert (spec.get("init_args") or {}).get("save_dir") in (None, "{default_root_dir}"), path


def test_parse_errors_name_the_options_from_the_parser() -> None:
    from lit_peft.cli_errors import init_options, short_message

    # the options of a class include its parents' through **kwargs
    assert {"backbone", "learning_rate", "num_labels"} <= set(init_options("lit_peft.tasks.SequenceClassification"))
    text = 'Parser key "trainer.precision":\n  Expected a <class \'int\'>. Got value: fast'
    assert re.match(r"trainer\.precision: expected int, got 'fast'", short_message(text))


def test_result_lines_come_after_the_progress_bar_and_the_summary_claims_no_flops(tiny_bert, toy_data, monkeypatch,
                                                                                  capsys, tmp_path) -> None:
    """The bar's last frame used to come out below lit-peft's result lines (Rich's live bar stops only in
    Lightning's teardown), and the model summary printed ``Total FLOPs: 0`` (nothing measured them)."""
    config = tiny_config(tmp_path, tiny_bert, toy_data, enable_progress_bar=True, enable_model_summary=True)
    monkeypatch.setattr(sys, "argv", ["lit-peft", "fit", "--config", str(config)])
    main()
    out = capsys.readouterr().out
    bar, result = out.rfind("Epoch 0/0"), out.find("[lit-peft] lora on")
    assert bar != -1 and result != -1 and bar < result, out[-2000:]
    assert "Trainable params" in out and "Total params" in out  # the summary is there
    assert "FLOPs" not in out
