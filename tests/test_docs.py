"""The user docs stay true to the code: every `raydefect ...` command in README.md and docs/ names a real command and
real options, links stay inside the repository, and the README stays short. (`mkdocs build --strict`, in
`make test`, checks the site's links and nav; the CLI and config references are generated from the code.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from raydefect.cli import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")
#: pages scripts/mkdocs_hooks.py generates at build time (links to them are checked by `mkdocs build --strict`)
GENERATED = {ROOT / "docs" / "reference" / "config.md"}


def commands(text: str) -> list[str]:
    """Each `raydefect ...` command line in the fenced code blocks, continuation lines joined, comments and console
    output (lines not starting with the command) left out."""
    found = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            for part in re.split(r"&&|\|", line):
                part = part.split("  #")[0].strip()
                if part.startswith("raydefect "):
                    found.append(part)
    return found


def check(line: str) -> list[str]:
    """What is wrong with one command line: an unknown command or option."""
    try:
        words = shlex.split(line)[1:]
    except ValueError as e:
        return [f"{line}: {e}"]
    group: click.Command = cli
    ctx_params = {o for p in cli.params for o in p.opts}
    problems = []
    while words and isinstance(group, click.Group):
        word = words.pop(0)
        if word.startswith("-"):
            name = word.split("=")[0]
            if name not in ctx_params:
                problems.append(f"{line}: unknown global option {name}")
            elif not any(p.is_flag for p in cli.params if name in p.opts) and "=" not in word and words:
                words.pop(0)
            continue
        if word == "...":
            return problems
        sub = group.commands.get(word)
        if sub is None:
            return [*problems, f"{line}: unknown command {word!r}"]
        group = sub
    known = {o for p in group.params for o in [*p.opts, *p.secondary_opts]} | {"-h", "--help"}
    problems += [f"{line}: {w.split('=')[0]} is not an option of this command" for w in words
                 if w.startswith("-") and w != "-" and w.split("=")[0] not in known]  # fmt: skip
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_commands_exist_with_their_options(page):
    lines = commands(page.read_text(encoding="utf-8"))
    assert [p for line in lines for p in check(line)] == []


def test_the_checker_catches_a_wrong_option_and_a_wrong_command():
    assert check("raydefect predict --model m --images i --out o --threshold 0.7") == []
    assert check("raydefect --address auto scores summarize s --top 5") == []
    assert check("raydefect predict --modle m")
    assert check("raydefect predikt --model m")
    assert len(commands("```bash\nraydefect train --data d \\\n  --epochs 3   # note\n```\n")) == 1


def test_every_page_has_commands_checked():
    assert sum(len(commands(p.read_text(encoding="utf-8"))) for p in PAGES) >= 40


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository(page):
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+://|#|mailto:", target):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), f"{page.name}: {target} points outside the repository"
        assert path.exists() or path in GENERATED, f"{page.name}: {target} does not exist"


def test_the_readme_is_short_and_agrees_with_pyproject():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    assert "make demo" in readme and "make test" in readme
    python = re.search(r'requires-python = ">=(\d+\.\d+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    for page in PAGES:
        versions = set(re.findall(r"Python (3\.\d+)", page.read_text(encoding="utf-8")))
        assert versions <= {python}, f"{page.name} names Python {versions}, pyproject says >={python}"
