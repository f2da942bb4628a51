"""`raydefect models`: every backbone with real parameter counts, fast, without downloading anything."""

from __future__ import annotations

import time

from click.testing import CliRunner

from raydefect.cli import cli


def _rows(output: str) -> dict[str, list[str]]:
    lines = output.strip().splitlines()
    return {line.split()[0]: line.split() for line in lines[2:]}


def test_models_lists_every_backbone_with_counts():
    start = time.perf_counter()
    result = CliRunner().invoke(cli, ["models", "--exact"])
    elapsed = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[0]
    for column in ("backbone", "patch", "dim", "image", "backbone params", "cls head", "seg head", "total"):
        assert column in header
    rows = _rows(result.output)
    assert {"dinov3-s", "dinov3-b", "dinov3-7b", "dinov2-g", "dinov2-b-reg", "tiny"} <= set(rows)
    b = rows["dinov3-b"]
    assert b[1:7] == ["dinov3_vitb16", "vit_base_patch16_dinov3", "16", "768", "12", "256"]
    backbone, cls_head, seg_head, total = (int(v) for v in b[7:11])
    assert 85e6 < backbone < 87e6 and 0 < cls_head < 1e6 and 0 < seg_head < 2e6
    assert total == backbone + cls_head + seg_head
    assert 6.6e9 < int(rows["dinov3-7b"][7]) < 6.8e9
    assert elapsed < 60  # meta device: seconds, not a download


def test_models_heads_follow_the_config_and_class_count():
    small = _rows(CliRunner().invoke(cli, ["models", "--exact", "--set", "model.decoder_dim=32"]).output)
    big = _rows(CliRunner().invoke(cli, ["models", "--exact", "--classes", "5"]).output)
    default = _rows(CliRunner().invoke(cli, ["models", "--exact"]).output)
    assert int(small["dinov3-s"][9]) < int(default["dinov3-s"][9])  # seg head shrinks with decoder_dim
    assert int(big["dinov3-s"][8]) > int(default["dinov3-s"][8])  # cls head grows with classes
    assert big["dinov3-s"][7] == default["dinov3-s"][7]


def test_models_human_readable_sizes():
    result = CliRunner().invoke(cli, ["models"])
    assert result.exit_code == 0
    assert _rows(result.output)["dinov3-b"][7] == "85.6M"
    assert _rows(result.output)["dinov3-7b"][7] == "6.72B"


def test_models_answers_without_importing_torch():
    """Sizes are registry data: listing needs neither torch nor timm (a fraction of a second, not seconds)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from raydefect.cli import cli\n"
        "result = CliRunner().invoke(cli, ['models'])\n"
        "assert result.exit_code == 0 and 'resnet18' in result.output, result.output\n"
        "print('torch' in sys.modules, 'timm' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"]
