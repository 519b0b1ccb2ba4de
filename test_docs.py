"""The commands the documents give parse with their script's own parser.

README.md, docs/RESULTS.md and the scripts' docstrings and messages give commands (`python X.py ...`, `torchrun ...
X.py ...`). A flag renamed or removed in a script while a document still gives it fails here. The commands are parsed,
not run (their paths, /path/imagenet and the like, do not exist here): the script's main() runs up to its first
parse_args, which this test stops right after parsing. A command with a placeholder (`...`, `<...>`, `[...]`, `$var`)
is left out.
"""
import argparse
import importlib
import os
import re
import shlex

import pytest

SCRIPTS = ("train_pretrain", "train_finetune", "train_seg", "bench_mto", "bench_morph", "bench_data", "plot_log",
           "study", "morph", "test_gpu")
MARKDOWN = ("README.md", "docs/RESULTS.md")
PLACEHOLDERS = ("...", "<", "[", "$")
ROOT = os.path.dirname(os.path.abspath(__file__))
LAUNCH = re.compile(r"(?:python3?|torchrun(?: --[\w=]+)*) (\w+)\.py\b")


def _commands_in(line: str) -> list:
    """(script, args) of each command in one line of shell text; args end at a comment or a bracketed remark."""
    found = []
    for part in re.split(r"&&|;|\|", line):
        match = LAUNCH.search(part)
        if match and match.group(1) in SCRIPTS:
            args = re.split(r"\s#|\s\(|[`\"']", part[match.end():])[0]
            found.append((match.group(1), " ".join(args.split())))
    return found


def _markdown_lines(text: str) -> list:
    """Code blocks' lines (backslash continuations joined) and inline code spans (a span may wrap a line)."""
    blocks = re.findall(r"```\w*\n(.*?)```", text, re.S)
    prose = re.sub(r"```\w*\n.*?```", "", text, flags=re.S)
    lines = [line for block in blocks for line in re.sub(r"\\\n", " ", block).splitlines()]
    return lines + [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]


def _python_lines(text: str) -> list:
    """A script's source, lines that end in a backslash (two in a docstring's source) joined to the next."""
    return re.sub(r"\\\\?\n\s*", " ", text).splitlines()


def documented_commands() -> list:
    commands = []
    for path in MARKDOWN + tuple(f"{name}.py" for name in SCRIPTS):
        with open(os.path.join(ROOT, path)) as f:
            text = f.read()
        lines = _markdown_lines(text) if path.endswith(".md") else _python_lines(text)
        commands += [(path, script, args) for line in lines for script, args in _commands_in(line)
                     if not any(mark in args for mark in PLACEHOLDERS)]
    return sorted(set(commands))


COMMANDS = documented_commands()


class _Parsed(Exception):
    pass


def test_commands_found():
    """The extraction finds what it should, so that the test below cannot pass by finding nothing."""
    scripts = {script for _, script, _ in COMMANDS}
    assert scripts == set(SCRIPTS), set(SCRIPTS) - scripts
    readme = [(script, args) for path, script, args in COMMANDS if path == "README.md"]
    assert ("train_pretrain", "--mto") in readme
    assert any(script == "train_pretrain" and "--data /path/imagenet/train --teacher clip:/path/ViT-B-16.pt" in args
               for script, args in readme)  # a multi-line torchrun command, joined
    assert ("train_seg", "--eval output/seg/checkpoint-best.pth --data /path/ADEChallengeData2016") not in \
        [(script, args) for _, script, args in COMMANDS]  # "[--flip]" is a placeholder: left out
    assert _commands_in("a && python bench_mto.py --batch 16 --count_bytes  # comment") == \
        [("bench_mto", "--batch 16 --count_bytes")]


@pytest.mark.parametrize("path,script,args", COMMANDS, ids=[f"{p}: {s}.py {a}" for p, s, a in COMMANDS])
def test_documented_command_parses(path, script, args, monkeypatch, capsys):
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        raise _Parsed(parse_args(self, argv, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    argv = shlex.split(args)
    monkeypatch.setattr("sys.argv", [f"{script}.py"] + argv)
    try:
        importlib.import_module(script).main()
    except _Parsed:
        return
    except SystemExit as e:
        if e.code == 0 and "--help" in argv:
            return
        pytest.fail(f"{path} gives `{script}.py {args}`, which its parser refuses: "
                    f"{capsys.readouterr().err.strip().splitlines()[-1]}")
    pytest.fail(f"{script}.main() returned without parsing its arguments")
