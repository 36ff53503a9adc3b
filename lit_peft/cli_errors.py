"""jsonargparse's and LightningCLI's parse errors, as one short message.

jsonargparse (with ``exit_on_error=False``) raises an ``ArgumentError`` whose text nests the
union-validation of ``model`` / ``data`` / ``method`` (15-20 lines ending in a ``NestedArg`` repr),
and would print the whole usage (50 lines) before it. ``short_message`` reads that text and says
what is wrong, where, and the closest accepted names (difflib). jsonargparse has no such
summary of its own, hence this file; anything it does not recognise keeps jsonargparse's first
line, and ``LIT_PEFT_DEBUG=1`` shows the full error.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from typing import Iterable, Optional

#: the base class each subclass-mode key takes, for a did-you-mean over class names
BASES = {"model": "lightning.pytorch.LightningModule", "data": "lightning.pytorch.LightningDataModule",
         "method": "lit_peft.methods.base.Method"}
#: where lit-peft's own classes of each kind live
HOMES = {"model": "lit_peft.tasks", "data": "lit_peft.data", "method": "lit_peft.methods"}


def closest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    choices = sorted(set(choices))
    found = difflib.get_close_matches(word, choices, n=n, cutoff=0.6)
    return found or [c for c in choices if word.lower() in c.lower()][:n]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    found = closest(word, choices)
    return f"; did you mean {' or '.join(repr(f) for f in found)}?" if found else ""


def init_options(class_path: str) -> list[str]:
    """The options a class takes: its ``__init__`` parameters and, through ``**kwargs``, its parents'."""
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in inspect.getmro(cls):
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def class_names(key: str) -> list[str]:
    """lit-peft's classes that ``key`` (model, data, method) accepts, as full class paths."""
    home, base = HOMES.get(key.split(".")[-1]), BASES.get(key.split(".")[-1])
    if home is None:
        return []
    module = importlib.import_module(home)
    base_module, _, base_name = base.rpartition(".")
    base_cls = getattr(importlib.import_module(base_module), base_name)
    return [f"{home}.{name}" for name, obj in vars(module).items()
            if inspect.isclass(obj) and issubclass(obj, base_cls) and not inspect.isabstract(obj)
            and not name.startswith("_")]


def yaml_problem(paths: Iterable[str]) -> Optional[str]:
    """The first of ``paths`` that is not valid YAML, with the line and column where it breaks."""
    import yaml

    for path in paths:
        try:
            with open(path) as f:
                yaml.safe_load(f)
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark
            where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else path
            return f"{where}: {err.problem}"
        except (OSError, yaml.YAMLError):
            continue
    return None


def config_paths(args: Iterable[str]) -> list[str]:
    """The files given to ``--config`` / ``-c`` in ``args``."""
    args, found = list(args), []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            found.append(args[i + 1])
        elif arg.startswith("--config="):
            found.append(arg.split("=", 1)[1])
    return found


def short_message(text: str, keys: Iterable[str] = (), command: str = "fit", args: Iterable[str] = (),
                  commands: Iterable[str] = ()) -> str:
    """One message for jsonargparse's error ``text``; ``keys`` are the subcommand's accepted options,
    ``args`` the command line (for the config files it names), ``commands`` those beyond LightningCLI's."""
    help_hint = f"(see: lit-peft {command} --help)"
    key_m = re.match(r'Parser key "([^"]+)":', text)
    key = key_m.group(1) if key_m else None

    m = re.search(r"does not accept option '([^']+)'", text) or re.search(r"Unrecognized arguments: (\S+)", text)
    if m:
        option = m.group(1).lstrip("-")
        return f"unknown option '{option}'{did_you_mean(option, keys)} {help_hint}"

    m = re.search(r"Problem with given class_path '([^']+)':\s*module '([^']+)' has no attribute '([^']+)'", text) or \
        re.search(r"Problem with given class_path '([^']+)':\s*(No module named) '([^']+)'", text)
    if m and key:
        choices = class_names(key)
        short = [c.rpartition(".")[2] for c in choices]
        hint = did_you_mean(m.group(3), short)
        listing = "" if hint else f"; lit-peft's: {', '.join(sorted(short))}"
        return f"{key}: no class '{m.group(1)}'{hint}{listing} {help_hint}"

    m = re.search(r"Problem with given class_path '([^']+)':\s*Option '([^']+)' is not accepted", text)
    if m and key and m.group(1).rpartition(".")[2] == BASES.get(key, "").rpartition(".")[2]:
        # the base class itself: a class's argument came before the --config that names the class
        return (f"--{key}.init_args.{m.group(2)} was given before the class it belongs to: put --config (or "
                f"--{key}.class_path) first, then the options that change it")
    if m and key:
        cls = m.group(1).rpartition(".")[2]
        return (f"{key}: {cls} has no option '{m.group(2)}'"
                f"{did_you_mean(m.group(2), init_options(m.group(1)))} {help_hint}")

    m = re.search(r"Problem with given class_path '([^']+)':\s*Parser key \"([^\"]+)\":\s*(.*)", text)
    if m and key:
        return f"{key}.init_args.{m.group(2)}: {_expected(m.group(3), text)} {help_hint}"

    m = re.search(r'File does not exist: (\S+)', text)
    if m:
        return f"config file {m.group(1)} does not exist; give the path to a YAML file (ready ones in configs/)"

    if text.startswith("Problems parsing config"):
        where = yaml_problem(config_paths(args))
        return f"the config is not valid YAML: {where or ' '.join(text.split(chr(10), 1)[-1].split())}"

    m = re.search(r"the following arguments are required: (.*)", text)
    if m:
        missing = [k.split(".", 1)[-1] for k in m.group(1).split(", ")]
        if set(missing) <= {"model", "data"}:
            return f"no {' and '.join(missing)} given: pass --config CONFIG.yaml (ready ones in configs/) {help_hint}"
        return f"missing required option {', '.join(missing)} {help_hint}"
    m = re.search(r'Key "([^"]+)" is required', text)
    if m:
        return f"missing required option {m.group(1)} {help_hint}"

    m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", text)
    if m:
        choices = re.findall(r"'([^']+)'", m.group(2)) + list(commands)
        return (f"unknown command '{m.group(1)}'{did_you_mean(m.group(1), choices)} (commands: {', '.join(choices)}; "
                "see: lit-peft --help)")

    if key:
        return f"{key}: {_expected(text, text)} {help_hint}"
    return f"{text.splitlines()[0]} {help_hint}"


def _expected(part: str, text: str) -> str:
    wanted = [t for t in re.findall(r"Expected a <class '([^']+)'>", part) if t != "NoneType"]
    got = re.search(r"Got value: (.*)", part) or re.search(r"Given value: (.*)", text)
    value = got.group(1).strip() if got else "?"
    if wanted:
        return f"expected {' or '.join(wanted)}, got {value!r}"
    return " ".join(part.split())[:200]
