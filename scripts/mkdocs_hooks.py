"""MkDocs hooks (mkdocs.yml ``hooks:``): pages generated from their one source, so the site cannot drift from it.

- ``reference/config.md``: every config key with its type, default and documentation, read from the dataclasses of
  ``raydefect/config/sections.py`` (the same field docs ``raydefect config`` prints).
- ``benchmarks.md``: the line ``<!-- include benchmarks/RESULTS.md -->`` is replaced by that file, whose figures
  stay in one place; its pictures are published under ``assets/benchmarks/``.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # document this checkout's code (mkdocs-click imports raydefect.cli)
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
INCLUDE = "<!-- include benchmarks/RESULTS.md -->"
CONFIG_PAGE = "reference/config.md"
PICTURES = "assets/benchmarks"
_LINK = re.compile(r"\]\((?!https?://|#)([^)\s]+)\)")


def _type_name(tp: object) -> str:
    text = tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))
    return str(text).replace("typing.", "").replace("|", "\\|")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def config_reference() -> str:
    """The config reference page: one table per section of `raydefect.config.Config`."""
    import yaml

    from raydefect.config import Config
    from raydefect.config.loader import shipped_configs

    cfg = Config()
    out = [
        "# Configuration reference",
        "",
        "Every command that trains or scores takes `--config NAME|FILE` (a shipped config, or your own YAML) and "
        "repeatable `--set section.key=value`. Shipped configs (`raydefect config --list`): "
        + ", ".join(f"`{name}`" for name in sorted(shipped_configs()))
        + ". `raydefect config` prints the resolved config with every key documented (`raydefect config --config "
        "scratch --set optim.lr=3e-4` shows what a run would use); unknown keys are errors with a suggestion:",
        "",
        "```console",
        "$ raydefect config --set optim.lrr=3e-4",
        "error: --set: unknown key 'optim.lrr'; did you mean 'optim.lr'?",
        "```",
        "",
        "This page is generated from the field docs of `raydefect/config/sections.py` and `scoring.py`, the same "
        "ones `raydefect config` prints.",
        "",
    ]
    for section_field in dataclasses.fields(cfg):
        section = getattr(cfg, section_field.name)
        out += [f"## `{section_field.name}`", "", "| key | type | default | what it does |", "|---|---|---|---|"]
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            value = list(value) if isinstance(value, tuple) else value
            default = yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()
            key = f"{section_field.name}.{f.name}"
            out.append(f"| `{key}` | {_type_name(f.type)} | `{_cell(default)}` | {_cell(f.metadata.get('help', ''))} |")
        out.append("")
    return "\n".join(out)


def results_page() -> str:
    """benchmarks/RESULTS.md with its relative pictures pointed at their published copies."""
    text = RESULTS.read_text(encoding="utf-8")
    return _LINK.sub(lambda m: f"]({PICTURES}/{m.group(1)})" if m.group(1).endswith(".png") else m.group(0), text)


def on_files(files, config):
    files.append(File.generated(config, CONFIG_PAGE, content=config_reference()))
    for picture in sorted(RESULTS.parent.glob("*.png")):
        files.append(File.generated(config, f"{PICTURES}/{picture.name}", abs_src_path=str(picture)))
    return files


def on_page_markdown(markdown, page, config, files):
    if INCLUDE in markdown:
        body = results_page()
        body = body.split("\n", 1)[1] if body.startswith("# ") else body  # the page keeps its own title
        markdown = markdown.replace(INCLUDE, body)
    return markdown
