"""Every command the README shows names something that exists, with options its tool accepts.

Commands are the README's ``bash`` blocks and its inline code that starts with a command
(``meduet``, ``make``, ``dvc``, ``python -m``, ``python benchmarks/…``, ``prefect``, ``ray``).
Most cannot run here as written (a cluster, an hour of benchmarks, ``<placeholders>``), so each is
checked against the real thing instead: ``meduet`` lines through the CLI's own parser, with every
``--set`` key in the configuration tree; ``make`` targets in the Makefile; ``dvc repro`` stages in
dvc.yaml; modules importable; benchmark options declared by the script; ``dvc``, ``prefect`` and
``ray`` subcommands and options in that tool's ``--help``.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from flows.local import tool
from meduet.cli import build_parser
from meduet.config import load_config

REPO = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"(?:\.venv/bin/)?(?:meduet [a-z<]|make [a-z]|dvc [a-z]|python -m |python benchmarks/|"
                     r"benchmarks/\w+\.py|prefect |ray start)")
PLACEHOLDER = re.compile(r"<[^<>]+>")


def _commands(text: str) -> list[str]:
    """The README's command lines: joined continuations, comments and leading ``VAR=value`` dropped."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*", "", line).strip()
            line = re.sub(r"^(export\s+)?([A-Z_]+=\S+\s+)+", "", line)
            if COMMAND.match(line):
                found.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", prose):
        span = re.sub(r"\s+", " ", span).strip()
        if COMMAND.match(span) and "|" not in span:
            found.append(span)
    return sorted(set(found))


COMMANDS = _commands((REPO / "README.md").read_text())


def _words(command: str) -> list[str]:
    words = shlex.split(PLACEHOLDER.sub("x", command))
    return words[1:] if words[0].startswith(".venv/bin/") and words[0].endswith("python") else words


@functools.cache
def _help(*words: str) -> str:
    done = subprocess.run([tool(words[0]), *words[1:], "--help"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, f"`{' '.join(words)}` is no command of {words[0]}: {done.stderr[-2000:]}"
    return done.stdout


@functools.cache
def _config_keys() -> frozenset[str]:
    def walk(tree: object, prefix: str) -> list[str]:
        if not isinstance(tree, dict):
            return []
        return [key for name, value in tree.items() for key in (prefix + name, *walk(value, f"{prefix}{name}."))]

    return frozenset(walk(load_config(REPO / "params.yaml").model_dump(), ""))


def _declared_options(script: Path) -> set[str]:
    """Option strings the script (or a benchmarks module it imports) passes to ``add_argument``."""
    declared: set[str] = set()
    tree = ast.parse(script.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            declared.update(arg.value for arg in node.args if isinstance(arg, ast.Constant))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("benchmarks."):
            declared |= _declared_options(REPO / (node.module.replace(".", "/") + ".py"))
    return declared


def _check_meduet(words: list[str]) -> None:
    parser = build_parser()
    if len(words) == 2:  # a command named in prose (`meduet predict`), or `meduet <stage>`
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        assert words[1] in {*commands, "x"}, f"meduet has no command {words[1]}"
        return
    args = parser.parse_args(words[1:])  # an unknown command or option exits: the test fails
    for override in getattr(args, "overrides", []):
        key = override.split("=", 1)[0]
        assert key in _config_keys(), f"--set {key}: no such key in params.yaml"


def _check_tool_options(words: list[str], depth: int) -> None:
    help_text = _help(*words[:depth])
    for word in words[depth:]:
        if word.startswith("--"):
            option = word.split("=", 1)[0]
            assert re.search(rf"{re.escape(option)}\b", help_text), f"`{' '.join(words[:depth])}` has no {option}"


def _check(command: str) -> None:
    words = _words(command)
    if words[0] in ("meduet", ".venv/bin/meduet"):
        _check_meduet(words)
    elif words[0] == "make":
        targets = re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), flags=re.M)
        assert set(words[1:]) <= set(targets), f"Makefile targets: {targets}"
    elif words[:2] == ["python", "-m"]:
        assert importlib.util.find_spec(words[2]) is not None, f"no module {words[2]}"
    elif words[0] in ("python", ".venv/bin/python") or words[0].startswith("benchmarks/"):
        script = REPO / next(w for w in words if w.startswith("benchmarks/"))
        assert script.is_file(), f"{script} is missing"
        undeclared = {w.split("=", 1)[0] for w in words if w.startswith("--")} - _declared_options(script)
        assert not undeclared, f"{script.name} declares no {sorted(undeclared)}"
    elif words[0] in ("dvc", ".venv/bin/dvc"):
        words[0] = "dvc"
        _check_tool_options(words, 2)
        if words[1] == "repro":
            stages = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
            named = {w for w in words[2:] if not w.startswith("-") and w != "x"}
            assert named <= stages, f"dvc.yaml has no stage {sorted(named - stages)}"
    elif words[0] == "prefect":
        global_options = [w for w in words[1:] if w.startswith("--") and words.index(w) < 2]
        for option in global_options:
            assert option in _help("prefect"), f"prefect has no {option}"
        words = [w for w in words if w not in global_options]
        depth = 2 if words[1] == "deploy" else 3
        _check_tool_options(words, depth)
    elif words[0] == "ray":
        _check_tool_options(words, 2)
    else:
        raise AssertionError(f"no check for {command!r}")


def test_the_readme_shows_commands_of_every_kind() -> None:
    firsts = {_words(c)[0].removeprefix(".venv/bin/") for c in COMMANDS}
    assert {"meduet", "make", "dvc", "python", "prefect", "ray"} <= firsts, firsts
    assert len(COMMANDS) > 40, COMMANDS  # the extraction itself still finds the README's commands


@pytest.mark.parametrize("command", COMMANDS)
def test_a_readme_command_names_what_exists(command: str) -> None:
    _check(command)


@pytest.mark.parametrize("command", [
    "meduet harmonise", "meduet harmonize --set harmonize.no_such_key=1", "meduet predict --model m --input i",
    "make no-such-target", "dvc repro no_such_stage", "dvc repro --single-itme x", "python -m flows.no_such_module",
    "python benchmarks/ssim.py --no-such-option", "python benchmarks/no_such_script.py",
    "prefect deployment run meduet/full-pipeline --wach", "prefect --no-promt deploy --all",
    "ray start --head --num-cpu=0",
])
def test_a_command_that_would_fail_as_written_is_caught(command: str) -> None:
    with pytest.raises((AssertionError, SystemExit)):
        _check(command)
