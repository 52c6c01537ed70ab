"""The script's house rules, measured: ruff, density, function and file sizes, the core first."""
import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SCRIPT

SOURCE = SCRIPT.read_text()
LINES = SOURCE.splitlines()
TREE = ast.parse(SOURCE)
FENCE = next((n for n, line in enumerate(LINES, 1) if line.startswith("# ==== plumbing")), None)


def ruff():
    """ruff from the test requirements (./setup.sh --test), beside this Python or on the PATH."""
    beside = Path(sys.executable).with_name("ruff")
    return str(beside) if beside.is_file() else shutil.which("ruff")


def test_ruff_passes_on_the_committed_config():
    if ruff() is None:
        pytest.skip("ruff is not installed: ./setup.sh --test installs tests/requirements.txt")
    result = subprocess.run([ruff(), "check", "--no-cache", str(SCRIPT)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


STATEMENTS = sum(isinstance(node, ast.stmt) for node in ast.walk(TREE))


@pytest.mark.xfail(strict=True, reason="not met yet: 0.69 statements a line (2,053 statements); "
                                       "the core's one operation a line and issues 27-28 added them")
def test_at_most_066_statements_a_line():
    assert STATEMENTS / len(LINES) <= 0.66, (STATEMENTS, len(LINES))


@pytest.mark.xfail(strict=True, reason="not met yet: 2,955 lines with every feature of issues 26-28")
def test_at_most_2300_lines():
    assert len(LINES) <= 2300


def test_no_line_over_100_characters():
    assert [n for n, line in enumerate(LINES, 1) if len(line) > 100] == []


def test_functions_under_60_lines_and_the_loop_under_80():
    sizes = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(TREE)
             if isinstance(node, ast.FunctionDef)}
    assert sizes["train"] <= 80
    assert {name: n for name, n in sizes.items() if name != "train" and n > 60} == {}


def test_the_core_comes_first_and_the_plumbing_is_fenced_off():
    assert FENCE is not None and FENCE <= 1100
    defined = {node.name: node.lineno for node in TREE.body
               if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    core = ["Vocabulary", "FlickrDataset", "EncoderCNN", "DecoderRNN", "AttentionDecoder",
            "Captioner", "train_step", "scst_step", "CiderD", "learning_rate_at", "train",
            "validation_loss", "beam_search", "caption_metrics"]
    assert {name: defined[name] for name in core if defined[name] > FENCE} == {}
    plumbing = ["resolve_settings", "read_captions", "make_demo_dataset", "cached_features",
                "save_checkpoint", "start_processes", "write_report", "caption_images", "main"]
    assert {name: defined[name] for name in plumbing if defined[name] < FENCE} == {}


def test_importing_the_script_has_no_side_effects():
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import {SCRIPT.stem}; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.stdout == "ok\n" and result.stderr == ""
