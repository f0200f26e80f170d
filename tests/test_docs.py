"""The README and docs/ run as written.

Every ```python block of README.md, benchmarks/README.md and docs/*.md runs: the blocks of one page in
order, in one namespace (like a notebook), in a fresh working folder, offline. A block that cannot run
here is preceded by a comment `<!-- not run: REASON -->`; it is counted and reported, never silently
skipped.

Every command line of a ```bash block that starts one of this project's programs (`latent-vae`,
`python -m MODULE`, `python SCRIPT.py`, and the same behind `torchrun` or `accelerate launch`) is parsed
by that program's own argument parser, so a flag or a command that does not exist fails here. The program
itself never runs: its parser's result stops it.
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(?P<reason>.*?)\s*-->$")
FENCE = re.compile(r"^```(?P<language>\S*)\s*$")
# Programs the docs may name that are not this project's: their command lines are not parsed here.
EXTERNAL = {"img2dataset", "pip", "git", "tensorboard", "pytest", "ray"}
# Pages whose Python blocks train or encode a dataset: more than a few seconds on a 2-core CPU.
SLOW_PAGES = {"training.md", "latent-datasets.md"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    not_run: str | None  # the reason of a preceding `<!-- not run: ... -->`, else None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a markdown page (fences at the start of a line)."""
    blocks, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = NOT_RUN.match(before)
        blocks.append(Block(page, start + 1, match["language"], "\n".join(body) + "\n",
                            marker["reason"] if marker else None))
        i += 1  # the closing fence
    return blocks


def command_lines(block: Block) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped, `&&` chains split."""
    text = block.text.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            end = words.index("&&") if "&&" in words else len(words)
            commands.append(words[:end])
            words = words[end + 1:]
    return commands


class _Parsed(BaseException):
    """Raised by the patched parse_args once a program's top-level parser has accepted its arguments (a
    BaseException, as SystemExit, so that a program's `except Exception` does not take it for a bug)."""


def program_of(words: list[str]) -> tuple[str, str, list[str]] | None:
    """("module" or "path", what to run, its arguments) for one of this project's programs, else None."""
    head, rest = words[0], words[1:]
    if head == "latent-vae":
        return "module", "latent_vae", rest
    if head.startswith("python") and rest[:2] == ["-m", "torch.distributed.run"]:
        head, rest = "torchrun", rest[2:]
    if head in ("torchrun", "accelerate"):
        return launched_program(head, rest)
    if head.startswith("python"):
        if rest[:1] == ["-m"]:
            return "module", rest[1], rest[2:]
        return "path", rest[0], rest[1:]
    return None


def launched_program(launcher: str, rest: list[str]) -> tuple[str, str, list[str]]:
    """The launcher's own options, parsed by its own parser (so a launcher flag that does not exist fails
    too), and the program it starts: `-m MODULE ARGS` or `SCRIPT.py ARGS`."""
    if launcher == "torchrun":
        from torch.distributed.run import get_args_parser

        parser = get_args_parser()
    else:
        from accelerate.commands.launch import launch_command_parser

        assert rest[:1] == ["launch"], f"accelerate {' '.join(rest)}: only `accelerate launch` is documented"
        parser, rest = launch_command_parser(), rest[1:]
    try:
        args = parser.parse_args(rest)
    except SystemExit as exit:
        pytest.fail(f"{launcher} {' '.join(rest)}: the launcher refused its options (exit {exit.code})")
    return ("module" if args.module else "path"), args.training_script, list(args.training_script_args)


def parse_only(kind: str, target: str, args: list[str], monkeypatch) -> argparse.Namespace:
    """Run the program up to its top-level `parse_args`, which raises `_Parsed` with the parsed arguments."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    monkeypatch.setattr(sys, "argv", [target, *args])
    monkeypatch.syspath_prepend(str(REPO))
    try:
        if kind == "module":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(str(REPO / target), run_name="__main__")
    except _Parsed as parsed:
        return parsed.args[0]
    except SystemExit as exit:  # argparse's error (status 2) or a program that stops before parsing
        if exit.code == 0 and ("--help" in args or "-h" in args):
            return argparse.Namespace(help=True)  # a documented `--help` line: the parser printed its help
        pytest.fail(f"{target} {' '.join(args)}: exited {exit.code} instead of parsing its arguments")
    pytest.fail(f"{target} {' '.join(args)}: ran without parsing arguments")


def all_blocks(language: str) -> list[Block]:
    return [block for page in PAGES for block in fenced_blocks(page) if block.language == language]


def _bash_commands() -> list:
    params = []
    for block in all_blocks("bash"):
        for n, words in enumerate(command_lines(block)):
            params.append(pytest.param(block, words, id=f"{block.where}#{n}:{' '.join(words[:3])}"))
    return params


@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package:RuntimeWarning")  # runpy re-runs
@pytest.mark.parametrize(("block", "words"), _bash_commands())
def test_documented_command_line_parses(block, words, monkeypatch):
    if words[0] == "bash":
        assert (REPO / words[1]).is_file(), f"{block.where}: no script {words[1]}"
        return
    program = program_of(words)
    if program is None:
        assert words[0] in EXTERNAL, (
            f"{block.where}: `{' '.join(words)}` starts no known program; add it to EXTERNAL if it is not ours")
    elif program[1] not in EXTERNAL:
        parse_only(*program, monkeypatch)


def _pages_with_python() -> list:
    params = []
    for page in PAGES:
        if any(b.language == "python" for b in fenced_blocks(page)):
            marks = [pytest.mark.slow] if page.name in SLOW_PAGES else []
            params.append(pytest.param(page, marks=marks, id=str(page.relative_to(REPO))))
    return params


@pytest.mark.parametrize("page", _pages_with_python())
def test_documented_python_runs(page, tmp_path, monkeypatch, fresh_accelerator):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")  # a local Ray (the Ray engine's example) stays offline too
    monkeypatch.syspath_prepend(str(REPO))
    namespace: dict = {"__name__": "__docs__"}
    ran = skipped = 0
    for block in fenced_blocks(page):
        if block.language != "python":
            continue
        if block.not_run is not None:
            skipped += 1
            continue
        code = compile(block.text, block.where, "exec")  # tracebacks name the page and block
        try:
            exec(code, namespace)  # noqa: S102 -- running the documentation is the point of this test
        except Exception as error:
            raise AssertionError(f"{block.where}: the block raised {type(error).__name__}: {error}") from error
        ran += 1
    print(f"{page.relative_to(REPO)}: {ran} Python blocks ran, {skipped} marked not run")
    assert ran, f"{page.relative_to(REPO)}: every Python block is marked not run"


def test_every_not_run_block_says_why():
    """A block is only exempt with a reason a reader can check (a GPU, a download, a cluster)."""
    exempt = [block for page in PAGES for block in fenced_blocks(page) if block.not_run is not None]
    for block in exempt:
        assert block.language == "python", f"{block.where}: `not run` marks Python blocks only"
        assert len(block.not_run) >= 8, f"{block.where}: `not run` needs a reason, got {block.not_run!r}"
    print(f"{len(exempt)} Python blocks marked not run: " + ", ".join(f"{b.where} ({b.not_run})" for b in exempt))


def test_the_checker_finds_a_flag_that_does_not_exist(monkeypatch):
    """The command check would fail on a documented flag that the program does not have."""
    with pytest.raises(pytest.fail.Exception, match="launcher refused"):
        program_of(["torchrun", "--no-such-launcher-flag", "-m", "latent_vae", "info"])
    launched = ["torchrun", "--nproc_per_node", "2", "-m", "latent_vae", "precompute", "--verify", "out/"]
    assert program_of(launched) == ("module", "latent_vae", ["precompute", "--verify", "out/"])
    # parse_only patches argparse for the rest of this test
    with pytest.raises(pytest.fail.Exception, match="exited 2"):
        parse_only("module", "latent_vae", ["info", "--model", "f16c16", "--no-such-flag"], monkeypatch)
    args = parse_only("module", "latent_vae", ["info", "--model", "f16c16-tiny", "--json"], monkeypatch)
    assert args.command == "info" and args.json


def test_the_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines"
    first_bash = next(i for i, line in enumerate(lines) if line.startswith("```bash"))
    assert first_bash < 40, "the two commands come first"
    assert os.path.isfile(REPO / "benchmarks" / "README.md")


LINK = re.compile(r"\]\((?P<target>[^)#\s]+)(?P<anchor>#[^)\s]*)?\)")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return "#" + text.replace(" ", "-")


def test_links_between_pages_resolve():
    """Every relative link of README, benchmarks/README and docs/ names a file that exists, and an anchor
    (`page.md#heading`) a heading of that page."""
    broken = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.DOTALL | re.MULTILINE)  # code is not links
        for match in LINK.finditer(text):
            target = match["target"]
            if "://" in target:
                continue
            path = (page.parent / target).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} does not exist")
            elif match["anchor"] and path.suffix == ".md":
                headings = [line.lstrip("#") for line in path.read_text().splitlines() if line.startswith("#")]
                if match["anchor"] not in {github_anchor(h) for h in headings}:
                    broken.append(f"{page.relative_to(REPO)}: {target}{match['anchor']} names no heading")
    assert not broken, "\n".join(broken)
