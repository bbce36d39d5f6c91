"""What a run shows on the terminal (hftk's lines, a progress bar on a real terminal) and what goes to
train.log (everything, third-party warnings included)."""

from __future__ import annotations

import os
import re
import sys

import pexpect
import pytest

from tests.conftest import ROOT, run_hftk, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow  # every test here trains or launches for more than a few seconds

OWN_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) +\S|^hftk: ")
NOISE = ("Setting accelerator to CPU", "Removed shared tensor", "Using default tokenizer.")


@pytest.fixture()
def recipe(tmp_path):
    return str(write_recipe(tmp_path, tiny_recipe(tmp_path, train={"eval_steps": 2})))


def test_terminal_shows_own_lines_and_train_log_holds_the_rest(recipe, tmp_path):
    result = run_hftk("finetune", recipe, fresh=True)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(OWN_LINE.match(line) for line in lines), result.stderr
    assert "step=4" in result.stderr and "tok/s" not in result.stderr  # log lines, and no bar off a terminal
    assert result.stdout == ""  # DeepSpeed's import-time note went to stdout before
    log = (tmp_path / "run" / "train.log").read_text()
    for noise in NOISE + ("Writing model shards",):
        assert noise not in result.stderr
    for noise in NOISE:
        assert noise in log
    assert "hftk: step=4 eval_loss=" in log


def test_verbose_shows_third_party_lines(recipe):
    result = run_hftk("finetune", recipe, "--verbose", fresh=True)
    assert result.returncode == 0, result.stderr
    assert "Removed shared tensor" in result.stderr


def test_quiet_shows_nothing_but_errors(recipe, tmp_path):
    result = run_hftk("finetune", recipe, "--quiet", fresh=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout == ""
    assert "step=4" in (tmp_path / "run" / "train.log").read_text()
    again = run_hftk("finetune", recipe, "-q", fresh=True)  # the folder holds a run now
    assert again.returncode == 2 and again.stderr.startswith("hftk: error: train.output_dir:")


def _in_terminal(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "TERM": "xterm"}
    child = pexpect.spawn(sys.executable, ["-m", "hftk", *args], cwd=str(ROOT), env=env, encoding="utf-8",
                          timeout=300, dimensions=(50, 200))
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    return child.before


def test_progress_bar_in_a_terminal_only(recipe, tmp_path):
    shown = _in_terminal("finetune", recipe)
    bar = [line for line in shown.splitlines() if "tok/s" in line]
    assert bar, shown
    final = bar[-1]
    assert "4/4" in final and "epoch 0.50" in final and "loss 6." in final and "lr 0.00e+00" in final
    assert "Removed shared tensor" not in shown
    # Evaluation has a bar of its own: a row under the training bar at eval_steps, and after
    # training (the bar closed) one that counts batches.
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown).replace("\r", "\n")  # colours and cursor moves off
    assert any(line.lstrip().startswith("eval") and "epoch -" in line for line in plain.splitlines()), plain
    assert re.search(r"eval .*(\d+)/\1 batches", plain), plain
    quiet = _in_terminal("finetune", recipe, "train.overwrite_output_dir=true", "--quiet")
    assert "tok/s" not in quiet and "step=" not in quiet
