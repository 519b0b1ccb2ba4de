"""The commands the documents give parse with their script's own parser, and the flags they name exist.

README.md, docs/RESULTS.md and the scripts' docstrings and messages give commands (`python X.py ...`, `torchrun ...
X.py ...`). A flag renamed or removed in a script while a document still gives it fails here. The commands are parsed,
not run (their paths, /path/imagenet and the like, do not exist here): the script's main() runs up to its first
parse_args, which this test stops right after parsing. A command with a placeholder (`...`, `<...>`, `[...]`, `$var`)
is left out. Every other flag that the documents, the scripts and the modules name (in prose, help texts and error
messages that tell the user what to pass) must be a flag of one of the scripts here, or one of OTHER_TOOLS' flags.
Every `module.name` the texts give for a module here (`mto.GROUP_ELEMENTS`, `engine.compile_blocks`) exists, so does
every file under docs/ that they name, and every file and section a Markdown link points to. And README's table of
files names every Python file of the top level, and its lists of log.jsonl's fields and of a checkpoint's keys are
those that tiny demo runs of the three trainers write.
"""
import argparse
import fnmatch
import glob
import importlib
import json
import os
import re
import shlex

import pytest
import torch

import engine

SCRIPTS = ("train_pretrain", "train_finetune", "train_seg", "bench_mto", "bench_morph", "bench_data", "plot_log",
           "study", "morph", "test_gpu")
MARKDOWN = ("README.md", "docs/RESULTS.md")
MODULES = ("engine.py", "data.py", "dtm.py", "mto.py")
COMMAND_TEXTS = MARKDOWN + tuple(f"{name}.py" for name in SCRIPTS)  # the texts that give commands
# flags of other tools that the texts here cite: torchrun's, pip's, and the official code's (naver-ai/dtm and BEiT's
# run_*.py, MAE's main_finetune.py) in the recipe's provenance
OTHER_TOOLS = {"--nproc_per_node", "--standalone", "--index-url", "--auto_resume", "--drop_block",
               "--imagenet_default_mean_and_std", "--init_both_rpb", "--init_scale", "--k1", "--k2", "--n1", "--n2",
               "--layer_scale_init_value", "--loss_type", "--min_mask_patches_per_block", "--num_mask_patches",
               "--opt_betas", "--shared_rel_pos_bias", "--use_cls", "--use_mean_pooling", "--abs_pos_emb",
               "--color_jitter", "--model_key", "--enable_deepspeed", "--save_periods", "--max_restarts",
               "--python-version", "--reinstall", "--nnodes", "--rdzv_backend", "--rdzv_endpoint"}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9](?![\w*-])")  # not a pattern: --demo_*, --no-X
PLACEHOLDERS = ("...", "<", "[", "$")
ROOT = os.path.dirname(os.path.abspath(__file__))
PYTHON_FILES = sorted(os.path.basename(path) for path in glob.glob(os.path.join(ROOT, "*.py")))  # the top level's
CODE_BLOCK = re.compile(r"```\w*\n(.*?)```", re.S)  # a fenced block of a Markdown file, its text as group 1
LAUNCH = re.compile(r"(?:python3?|torchrun(?: --[\w=]+)*) (\w+)\.py\b")


def _read(path: str) -> str:
    """A file of the repository, by its path from the repository's root."""
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


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
    blocks = CODE_BLOCK.findall(text)
    prose = CODE_BLOCK.sub("", text)
    lines = [line for block in blocks for line in re.sub(r"\\\n", " ", block).splitlines()]
    return lines + [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]


def _python_lines(text: str) -> list:
    """A script's source, lines that end in a backslash (two in a docstring's source) joined to the next."""
    return re.sub(r"\\\\?\n\s*", " ", text).splitlines()


def documented_commands() -> list:
    commands = []
    for path in COMMAND_TEXTS:
        text = _read(path)
        lines = _markdown_lines(text) if path.endswith(".md") else _python_lines(text)
        commands += [(path, script, args) for line in lines for script, args in _commands_in(line)
                     if not any(mark in args for mark in PLACEHOLDERS)]
    return sorted(set(commands))


COMMANDS = documented_commands()


class _Parsed(Exception):
    pass


def _run_up_to_parse(script: str, argv: list, monkeypatch, keep="namespace"):
    """Runs script.main() with argv up to its first parse_args; raises _Parsed(the namespace or the parser)."""
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(parse_args(self, args, namespace) if keep == "namespace" else self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr("sys.argv", [f"{script}.py"] + argv)
    importlib.import_module(script).main()


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
    argv = shlex.split(args)
    try:
        _run_up_to_parse(script, argv, monkeypatch)
    except _Parsed:
        return
    except SystemExit as e:
        if e.code == 0 and "--help" in argv:
            return
        pytest.fail(f"{path} gives `{script}.py {args}`, which its parser refuses: "
                    f"{capsys.readouterr().err.strip().splitlines()[-1]}")
    pytest.fail(f"{script}.main() returned without parsing its arguments")


def _scripts_flags(monkeypatch) -> set:
    flags = set()
    for script in SCRIPTS:
        with pytest.raises(_Parsed) as parsed:
            _run_up_to_parse(script, [], monkeypatch, keep="parser")
        for action in parsed.value.args[0]._actions:
            flags.update(action.option_strings)  # a BooleanOptionalAction's --no-X too
    return flags


def test_every_flag_named_exists(monkeypatch):
    flags = _scripts_flags(monkeypatch)
    assert {"--mto", "--grad_checkpoint", "--malloc", "--watchdog_s", "--schedule", "--smooth"} <= flags
    assert not OTHER_TOOLS & flags, "a flag of ours is listed as another tool's"
    unknown = []
    for path in COMMAND_TEXTS + MODULES:
        named = set(FLAG.findall(_read(path)))
        unknown += [f"{path}: {flag}" for flag in sorted(named - flags - OTHER_TOOLS)]
    assert not unknown, "flags named that no script here has (renamed? removed?): " + ", ".join(unknown)


def test_readme_file_table_names_every_python_file():
    table = _read("README.md").split("\n## ")[0]  # the table of files comes before the first section
    named = [name for row in re.findall(r"^\| (`.*?) \|", table, re.M) for name in re.findall(r"`([^`]+)`", row)]
    assert "morph.py" in named and "test_*.py" in named
    missing = [f for f in PYTHON_FILES if not any(fnmatch.fnmatch(f, name) for name in named)]
    assert not missing, f"README's table of files does not name {missing}"
    absent = [name for name in named if not fnmatch.filter(PYTHON_FILES, name)]
    assert not absent, f"README's table of files names {absent}, which the top level does not have"


NOT_CODE = {"data.partial", "data.pkl"}  # file names: study.py's download in progress, a TorchScript archive's member


def test_every_code_name_the_texts_give_exists():
    modules = [name[:-3] for name in PYTHON_FILES]
    reference = re.compile(rf"(?<![\w.])({'|'.join(modules)})\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
    named = set()
    for path in MARKDOWN + tuple(PYTHON_FILES):
        named |= {(m.group(1), m.group(2)) for m in reference.finditer(_read(path)) if m.group(2) != "py"}
    assert ("mto", "GROUP_ELEMENTS") in named and len(named) > 200
    missing = []
    for module, name in sorted(named):
        if f"{module}.{name}" in NOT_CODE:
            continue
        obj = importlib.import_module(module)
        for part in name.split("."):
            if not hasattr(obj, part):
                missing.append(f"{module}.{name}")
                break
            obj = getattr(obj, part)
    assert not missing, f"names the texts give that the code does not have (renamed? removed?): {missing}"


OFFICIAL_DOCS = {"docs/Training.md", "docs/Evaluation.md"}  # naver-ai/dtm's, cited for its commands


def test_every_docs_file_the_texts_name_exists():
    path_named = re.compile(r"(?<![\w/.])docs/[\w./*-]*[\w*]")  # a * stands for the files a glob matches
    named = set()
    for path in MARKDOWN + tuple(PYTHON_FILES):
        named |= set(path_named.findall(_read(path)))
    assert "docs/RESULTS.md" in named and "docs/mto_vs_plain.png" in named
    missing = sorted(p for p in named - OFFICIAL_DOCS if not glob.glob(os.path.join(ROOT, p)))
    assert not missing, f"files the texts name that docs/ does not have: {missing}"


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation but - and _ dropped, spaces as -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_markdown_links_resolve():
    """Links to files here (images, docs/RESULTS.md) and to their sections, relative to the linking file."""
    assert _github_anchor("3. MTO's step-time overhead (`bench_mto.py`)") == "3-mtos-step-time-overhead-bench_mtopy"
    links = []  # (the linking file, the linked file relative to the repository, the anchor or "")
    for path in MARKDOWN:
        for target, anchor in re.findall(r"\]\((?!https?:)([^)#]*)#?([^)]*)\)", _read(path)):
            linked = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
            links.append((path, linked, anchor))
    assert len(links) >= 8 and any(anchor for _, _, anchor in links)
    broken = []
    for path, linked, anchor in links:
        if not os.path.isfile(os.path.join(ROOT, linked)):
            broken.append(f"{path}: {linked}")
        elif anchor:
            text = CODE_BLOCK.sub("", _read(linked))  # a shell comment there is no heading
            if anchor not in {_github_anchor(heading) for heading in re.findall(r"^#+ (.+)$", text, re.M)}:
                broken.append(f"{path}: {linked}#{anchor}")
    assert not broken, f"links to files or sections that do not exist: {broken}"


# one optimizer step of each trainer's demo at the smallest sizes (pre-training with --mto: its log fields too)
TINY_DEMOS = {
    "train_pretrain": ["--img_size", "32", "--num_masked", "2", "--min_block", "1", "--batch_size", "2", "--max_steps",
                       "1", "--mto"],
    "train_finetune": ["--img_size", "32", "--synthetic_train", "4", "--synthetic_val", "2", "--batch_size", "4",
                       "--epochs", "1", "--warmup_epochs", "0", "--init", "none"],
    "train_seg": ["--crop_size", "32", "--scale", "64", "48", "--stride", "24", "--channels", "16", "--batch_size", "2",
                  "--demo_img_size", "48", "--demo_train_images", "2", "--demo_val_images", "1", "--iters", "1",
                  "--warmup_iters", "0"],
}
# the kinds of line README's "Runs, checkpoints and logs" lists the fields of, beyond pre-training's: the trainer, how
# its lines of that kind are told apart, and where the list starts and ends in the paragraph
LINE_KINDS = {
    "fine-tuning's per log step": ("train_finetune", lambda r: "val_top1" not in r, "per log step", "and per epoch"),
    "fine-tuning's per epoch": ("train_finetune", lambda r: "val_top1" in r, "and per epoch", "; segmentation"),
    "segmentation's per log step": ("train_seg", lambda r: "mode" not in r, "segmentation per log", "and per eval"),
    "segmentation's per evaluation": ("train_seg", lambda r: "mode" in r, "and per evaluation", "Both log"),
}


def _passage(text: str, start: str, end: str) -> str:
    """The part of text from `start` to the next `end`, whitespace as single spaces."""
    text = " ".join(text.split())
    begin = text.find(start)
    stop = text.find(end, begin + len(start))
    assert begin >= 0 and stop >= 0, f"README has no passage from {start!r} to {end!r}: reworded? update this test"
    return text[begin:stop]


def _names(passage: str) -> set:
    """The names a passage gives in backticks: `step`, `"mode": "eval"` (mode), `loss_level{i}` (levels 0 and 1)."""
    names = set()
    for span in re.findall(r"`([^`]+)`", passage):
        match = re.fullmatch(r'"?([A-Za-z_]\w*(?:\{i\})?)"?(?:: .*)?', span)
        if match:
            names |= {match.group(1).replace("{i}", str(level)) for level in (0, 1)}
    return names


def _tiny_demo(script: str, out) -> tuple:
    """(log.jsonl's lines, checkpoint-last.pth) of a tiny demo run of script."""
    importlib.import_module(script).main(TINY_DEMOS[script] + ["--num_workers", "0", "--log_every", "1",
                                                              "--output_dir", str(out)])
    with open(out / "log.jsonl") as f:
        lines = [json.loads(line) for line in f]
    return lines, torch.load(out / "checkpoint-last.pth")


def _assert_same(named: set, written: set, what: str):
    assert named == written, (f"README's list of {what} names {sorted(named - written)}, which the code does not "
                              f"write, and leaves out {sorted(written - named)}, which it writes: update the list")


def test_readme_lists_the_log_fields_and_checkpoint_keys_the_trainers_write(tmp_path):
    """The fields README lists for each kind of log.jsonl line and the keys it lists for a checkpoint are those that
    tiny demo runs write (fp16's loss_scale, which the trainers refuse on the CPU, by engine.loss_scale_field)."""
    readme = _read("README.md")
    runs = {script: _tiny_demo(script, tmp_path / script) for script in TINY_DEMOS}
    pretrain = _names(_passage(readme, "`log.jsonl`: one JSON line per log step", "Plot any field"))
    pretrain |= _names(_passage(readme, "The log gets `loss_dtm`", "next to the total"))  # --mto's
    assert "loss_scale" in pretrain and set(engine.loss_scale_field(torch.amp.GradScaler("cpu"))) == {"loss_scale"}
    for record in runs["train_pretrain"][0]:
        _assert_same(pretrain - {"loss_scale"}, set(record), "pre-training's fields")
    beyond = _passage(readme, "The log's fields beyond pre-training's", "with fp16.")
    for what, (script, of_kind, start, end) in LINE_KINDS.items():
        records = [record for record in runs[script][0] if of_kind(record)]
        assert records, f"the tiny demo wrote no line {what}"
        for record in records:
            _assert_same(_names(_passage(beyond, start, end)), set(record), f"{what} fields")
    named = _names(_passage(readme, "A checkpoint is a plain dict:", "It loads with"))
    checkpoints = [checkpoint for _, checkpoint in runs.values()]
    _assert_same({name for name in named if name.startswith("dtm_")}, {c["kind"] for c in checkpoints},
                 "checkpoint kinds")
    _assert_same({name for name in named if not name.startswith("dtm_")}, set().union(*checkpoints), "checkpoint keys")
