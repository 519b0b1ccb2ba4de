"""The repository's shape, as README's table of files and requirements.txt describe it.

Runtime code imports only torch, numpy, pillow, tqdm and the standard library; no script imports another script (the
three trainers share engine.py, not each other); mto.py needs torch only and morph.py torch only outside its picture
CLI, so that each can be copied into other code alone. Imports inside functions count too.
"""
import ast
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
DEPENDENCIES = {"torch", "numpy", "PIL", "tqdm"}
LIBRARY = {"dtm", "morph", "mto", "data", "engine"}  # the modules the scripts share
SCRIPTS = {"train_pretrain", "train_finetune", "train_seg", "bench_mto", "bench_morph", "bench_data", "plot_log",
           "study"}


def runtime_files() -> list:
    names = [os.path.basename(path)[:-3] for path in glob.glob(os.path.join(ROOT, "*.py"))]
    return sorted(name for name in names if not name.startswith("test_") and name != "conftest")


def imported(name: str, top_level_only: bool = False) -> set:
    """Top-level package names that name.py imports (absolute imports), anywhere in the file or at its top level."""
    with open(os.path.join(ROOT, f"{name}.py")) as f:
        tree = ast.parse(f.read())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_the_files_are_the_ones_described():
    assert set(runtime_files()) == LIBRARY | SCRIPTS


def test_runtime_code_imports_only_the_dependencies():
    allowed = DEPENDENCIES | LIBRARY | set(sys.stdlib_module_names)
    other = {name: sorted(imported(name) - allowed) for name in runtime_files()}
    assert not any(other.values()), {name: found for name, found in other.items() if found}


def test_no_script_imports_another_script():
    imports = {name: sorted(imported(name) & SCRIPTS) for name in runtime_files()}
    assert not any(imports.values()), {name: found for name, found in imports.items() if found}


def test_mto_and_morph_need_only_torch():
    stdlib = set(sys.stdlib_module_names)
    assert imported("mto") - stdlib == {"torch"}
    assert imported("morph", top_level_only=True) - stdlib == {"torch"}
    assert imported("morph") - stdlib == {"torch", "numpy", "PIL"}  # the picture CLI's, inside its functions


def test_requirements_name_the_dependencies():
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        lines = [line.split("#")[0].strip() for line in f]
    names = {re.split(r"[<>=!~ ]", line)[0].lower() for line in lines if line}
    assert names == {"torch", "numpy", "pillow", "tqdm"}


def test_lines_fit_120_characters():
    """The files users read next to the papers and copy (DEVELOPERS.md: readable like nanoGPT) keep lines to 120
    characters, and so do the tests that show how they are used; 18 lines of the runtime files and 61 of the tests
    had grown past it by 2026-12-06."""
    long = []
    for name in sorted(os.path.basename(path)[:-3] for path in glob.glob(os.path.join(ROOT, "*.py"))):
        with open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8") as f:
            long += [f"{name}.py:{number}" for number, line in enumerate(f, 1) if len(line.rstrip("\n")) > 120]
    assert not long, long
