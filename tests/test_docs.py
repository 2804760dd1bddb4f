"""Docs that cannot drift: every `python train.py ...` and `python -m mnist_lab...` command that
README.md and docs/ show is composed by Hydra or parsed by its module's argument parser, and
every Python block runs. A command or option that no longer exists fails here."""

import importlib
import itertools
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
COMMAND = re.compile(r"python (?:train\.py|-m mnist_lab)\b")
ENVIRONMENT = re.compile(r"^(?:\w+=\S*\s+)+")  # CUDA_VISIBLE_DEVICES=0 python ...
# Hydra's own flags (python train.py --help) and those that take a value
HYDRA_FLAGS = {"-m", "--multirun", "--help", "-h", "--hydra-help", "--resolve", "--shell-completion", "-sc"}
HYDRA_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--info", "-i", "--config-name", "-cn", "--config-dir", "-cd"}


def blocks(page: Path) -> list[tuple[str, str]]:
    """(language, text) of each fenced block of a page."""
    return FENCE.findall(page.read_text())


def shown_commands() -> list[tuple[str, str]]:
    """(where, command) for every command in a shell block or an inline code span of the docs."""
    found = []
    for page in PAGES:
        text = page.read_text()
        name = page.relative_to(ROOT)
        for language, block in blocks(page):
            if language not in ("bash", "sh", "shell", "console"):  # not output, config or Python
                continue
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip().removeprefix("$ ")
                if COMMAND.match(ENVIRONMENT.sub("", line)):
                    found.append((str(name), line))
        for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", FENCE.sub("", text)):
            if COMMAND.match(span):
                found.append((str(name), span))
    return found


def words(command: str) -> list[str]:
    """The command's words after `python`, without comments and environment settings; a
    placeholder such as <folder> becomes a plain value."""
    command = re.sub(r"<[^<>]+>", "x", command)
    tokens = shlex.split(command, comments=True)
    return tokens[tokens.index("python") + 1 :]


ELLIPSIS = ("...", "…")  # "and other overrides" in a command of train.py; "a value" in a module's


def first_values(overrides: list[str]) -> list[str]:
    """A sweep's overrides as one job of it: a,b -> a, range(1,4) -> 1, interval(0.1,1) -> 0.1."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    plain = []
    for override in parsed:
        if not override.is_sweep_override():
            plain.append(override.input_line)
            continue
        key = override.get_key_element()
        if isinstance(override.value(), IntervalSweep):
            plain.append(f"{key}={override.value().start}")
        else:
            plain.append(f"{key}={next(override.sweep_string_iterator())}")
    return plain


def hydra_overrides(args: list[str]) -> list[str]:
    overrides, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in HYDRA_VALUE_FLAGS:
            skip = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides


COMMANDS = shown_commands()


def test_the_docs_show_commands():
    assert len({command for _, command in COMMANDS}) > 20


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[f"{w}: {c}"[:150] for w, c in COMMANDS])
def test_every_command_the_docs_show_is_one_that_exists(where, command, tmp_path):
    args = words(command)
    if args[0] == "train.py" or args[:2] == ["-m", "mnist_lab"]:
        args = args[1:] if args[0] == "train.py" else args[2:]
        overrides = first_values(hydra_overrides([a for a in args if a not in ELLIPSIS]))
        with initialize_config_dir(str(conf_with_files_of(ROOT / where, tmp_path)), version_base="1.3"):
            compose("train", overrides, return_hydra_config=True)
        return
    assert args[0] == "-m" and args[1].startswith("mnist_lab."), command
    module = importlib.import_module(args[1])
    if len(args) == 2:  # the command named in prose, without its arguments
        assert callable(module.build_parser), command
        return
    try:
        module.build_parser().parse_args(["x" if a in ELLIPSIS else a for a in args[2:]])
    except SystemExit as e:  # --help exits with 0; a wrong argument with 2 and argparse's message
        assert e.code == 0, f"{where}: {command}: the module's parser refuses it"


def conf_with_files_of(page: Path, tmp_path: Path) -> Path:
    """conf/, with the config files that a page shows (a block beginning `# conf/...`) added as a
    reader adds them: its commands use them."""
    shown = {path: text for _, path, text in re.findall(r"```(\w*)\n# (conf/\S+)\n(.*?)```", page.read_text(), re.S)}
    if not shown:
        return ROOT / "conf"
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    for path, text in shown.items():
        (tmp_path / path).write_text(text)
    return tmp_path / "conf"


# Short runs on tiny data for the Python blocks: appended to each fit and sweep's own overrides.
def tiny(data_dir: Path) -> list[str]:
    return [
        f"data.data_dir={data_dir}",
        "data.download=false",
        "data.verify_checksums=false",
        "data.val_size=100",
        "data.eval_batch_size=50",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "++trainer.limit_train_batches=2",
        "callbacks.progress_bar=null",
    ]


PYTHON_PAGES = [p for p in PAGES if any(lang == "python" and not re.match(r"# \S+\n", b) for lang, b in blocks(p))]


@pytest.mark.slow
@pytest.mark.parametrize("page", PYTHON_PAGES, ids=[str(p.relative_to(ROOT)) for p in PYTHON_PAGES])
def test_every_python_block_runs(page, synthetic_dir, tmp_path, monkeypatch):
    """A page's Python blocks in order, in one namespace, in an empty folder, as a reader would run
    them (the blocks that show a file of the project, `# path` first, are tests/test_own_model.py's)."""
    import mnist_lab

    fit, sweep = mnist_lab.fit, mnist_lab.sweep
    monkeypatch.setattr(mnist_lab, "fit", lambda *o, **k: fit(*o, *tiny(synthetic_dir), **k))
    monkeypatch.setattr(mnist_lab, "sweep", lambda *o, **k: sweep(*o, *tiny(synthetic_dir), **k))
    monkeypatch.setenv("MNIST_LAB_DATA", str(synthetic_dir))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for language, block in blocks(page):
        if language == "python" and not re.match(r"# \S+\n", block):
            exec(compile(block, f"{page.name} block", "exec"), namespace)  # noqa: S102  the docs' own code


@pytest.mark.slow
def test_the_docs_site_builds_in_strict_mode(tmp_path):
    """mkdocs.yml's site, as `mkdocs build --strict` builds it: a broken link or anchor, or a page
    left out of the navigation, fails."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "design" / "index.html").is_file()


def results_table(page: Path) -> list[str]:
    lines = page.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| command | test accuracy |"))
    return list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))


def test_readme_and_the_results_page_show_the_same_results():
    assert results_table(ROOT / "README.md") == results_table(ROOT / "docs" / "results.md")
