"""The command line: commands listed, errors in one line with a non-zero exit."""

import subprocess
import sys

import pytest
from click.testing import CliRunner

from unetcell.cli import main


def test_help_lists_the_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "predict", "evaluate", "export", "synth", "targets"):
        assert command in result.output
        assert CliRunner().invoke(main, [command, "--help"]).exit_code == 0


def test_user_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "images").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "unetcell.cli", "train", str(tmp_path), "--out", str(tmp_path / "run")],
        capture_output=True, text=True,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "no images" in result.stderr


@pytest.mark.slow
def test_synth_then_train_from_the_command_line(tmp_path):
    runner = CliRunner()
    assert runner.invoke(main, ["synth", str(tmp_path / "d"), "--count", "2", "--shape", "96", "96"]).exit_code == 0
    result = runner.invoke(main, [
        "train", str(tmp_path / "d"), "--out", str(tmp_path / "run"), "--filters", "4", "--depth", "2",
        "--epochs", "1", "--steps-per-epoch", "2", "--tile", "90", "--no-augment",
    ])
    assert result.exit_code == 0, result.output
    assert "using 92" in result.output  # the tile is rounded to a valid size and the user told
    assert (tmp_path / "run" / "model.keras").exists()
