"""Validate, test, predict and resume use the method as the checkpoint recorded it: over the whole
method table, every init argument that changes the trained model is named (with both values) when a
run disagrees, and none that only shapes training (dropout, an optimizer's settings) is; through the
CLI, a config whose LoRA alpha differs from the checkpoint's is refused in one line, and a config that
names no method evaluates with the checkpoint's, giving the figures of the config it was trained with."""

from __future__ import annotations

import inspect

import pytest
import yaml

import lit_peft.methods as methods
from lit_peft.checkpoints import method_differences, method_mismatch
from lit_peft.methods.base import Method
from test_front_door import assert_short, lora_ckpt, run, tiny_config  # noqa: F401 (a fixture)

TABLE = sorted(name for name, cls in vars(methods).items()
               if inspect.isclass(cls) and issubclass(cls, Method) and not inspect.isabstract(cls)
               and inspect.signature(cls.__init__).parameters.keys() - {"self", "args", "kwargs"})


def other_value(value):
    """A value of the same kind that is not ``value``."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "_other"
    return ["some_module"] if value is None or isinstance(value, (list, tuple)) else {"other": 1}


def spec(cls, **changed):
    params = {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
              if p.name != "self" and p.default is not inspect.Parameter.empty}
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": {**params, **changed}}


@pytest.mark.parametrize("name", TABLE)
def test_every_argument_that_changes_the_model_is_named_and_training_only_ones_are_not(name) -> None:
    cls = getattr(methods, name)
    trained = spec(cls)
    assert method_differences(trained, spec(cls)) == []
    for arg, default in trained["init_args"].items():
        if default is inspect.Parameter.empty:
            continue
        changed = spec(cls, **{arg: other_value(default)})
        found = method_differences(trained, changed)
        if arg in cls.training_only:
            assert found == [], (name, arg)
        else:
            assert [a for a, _, _ in found] == [arg], (name, arg)
            assert found[0][1] != found[0][2]  # both values named (as the method keeps them)


def test_another_class_is_named_and_an_old_record_compares_with_defaults() -> None:
    assert method_mismatch(spec(methods.LoRA), spec(methods.RsLoRA)) == ["method LoRA (this run: RsLoRA)"]
    old = spec(methods.LoRA)
    del old["init_args"]["use_rslora"]  # a checkpoint from before an argument existed: its default
    assert method_differences(old, spec(methods.LoRA)) == []
    assert method_mismatch(spec(methods.LoRA, alpha=64), spec(methods.LoRA)) == ["method.init_args.alpha=64 (this run: 16)"]


def test_a_config_that_disagrees_on_alpha_is_refused_naming_both_values(lora_ckpt, tiny_bert, toy_data, monkeypatch,
                                                                         capsys, tmp_path) -> None:
    config = tiny_config(tmp_path, tiny_bert, toy_data)  # r=4, alpha=8, as the checkpoint was trained
    raw = yaml.safe_load(config.read_text())
    raw["method"]["init_args"]["alpha"] = 16
    config.write_text(yaml.safe_dump(raw))
    code, lines = run(monkeypatch, capsys, "validate", "--config", str(config), "--ckpt_path", str(lora_ckpt))
    assert_short(code, lines, ["method.init_args.alpha=8 (this run: 16)", "leave `method` out"])
    # dropout does not change the trained model: the same checkpoint evaluates with another dropout
    raw["method"]["init_args"].update(alpha=8, dropout=0.3)
    config.write_text(yaml.safe_dump(raw))
    code, lines = run(monkeypatch, capsys, "validate", "--config", str(config), "--ckpt_path", str(lora_ckpt))
    assert code == 0, lines


def test_a_config_without_a_method_uses_the_checkpoints(lora_ckpt, tiny_bert, toy_data, monkeypatch, capsys,
                                                        tmp_path) -> None:
    trained = tiny_config(tmp_path, tiny_bert, toy_data)
    bare = tmp_path / "bare.yaml"
    raw = yaml.safe_load(trained.read_text())
    del raw["method"]
    bare.write_text(yaml.safe_dump(raw))
    figures = {}
    for name, config in (("trained", trained), ("bare", bare)):
        code, lines = run(monkeypatch, capsys, "validate", "--config", str(config), "--ckpt_path", str(lora_ckpt))
        assert code == 0, lines
        figures[name] = lines
    said = [line for line in figures["bare"] if "checkpoint's is used" in line]
    assert len(said) == 1 and "'alpha': 8" in said[0] and "LoRA" in said[0]
    assert not any("checkpoint's is used" in line for line in figures["trained"])
    val = [[line for line in lines if "val_loss" in line] for lines in figures.values()]
    assert val[0] and val[0] == val[1]  # the same figures as the config it was trained with


@pytest.mark.parametrize("cls, given", [
    (methods.PartialFineTune, {"last_n_blocks": 2, "modules": None}),  # kept as [] by the method
    (methods.PeftMethod, {"config_class": "peft.LoHaConfig", "config": None, "targets": "qv"}),  # kept as {}
    (methods.LoRA, {"r": 8, "alpha": 16, "targets": ("query", "value")}),  # a tuple as a list
])
def test_a_config_and_the_method_it_builds_agree(cls, given) -> None:
    """The checkpoint records what the method kept (its ``spec``), the run gives its config: compared by
    what each builds, so a config leaving an argument to its default is not a difference."""
    saved = cls(**given).spec()
    assert method_differences(saved, {"class_path": saved["class_path"], "init_args": given}) == []
