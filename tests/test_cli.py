"""The command line: commands listed, errors in one line with a non-zero exit."""

import subprocess
import sys

import numpy as np
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


def _config_given_to(monkeypatch, module: str, function: str, args: list[str]):
    """The Config a command hands to the library, with the library call replaced."""
    import importlib

    seen = {}

    def capture(*positional, **keywords):
        seen["config"] = next(a for a in (*positional, *keywords.values()) if type(a).__name__ == "Config")
        return []

    monkeypatch.setattr(importlib.import_module(module), function, capture)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return seen["config"]


def test_train_options_set_their_config_fields_and_absent_ones_keep_the_file(monkeypatch, tmp_path):
    from unetcell.config import Config, save_config

    save_config(Config().override("train", epochs=7, seed=3).override("augment", elastic_p=0.1),
                tmp_path / "c.toml")
    base = ["train", str(tmp_path), "--out", str(tmp_path / "run"), "--config", str(tmp_path / "c.toml")]
    config = _config_given_to(monkeypatch, "unetcell.train", "train", base)
    assert config == Config().override("train", epochs=7, seed=3).override("augment", elastic_p=0.1)

    config = _config_given_to(monkeypatch, "unetcell.train", "train", base + [
        "--epochs", "2", "--steps-per-epoch", "5", "--batch-size", "3", "--tile", "188",
        "--filters", "8", "--depth", "2", "--padding", "same", "--upsampling", "nearest", "--learning-rate", "0.01",
        "--optimizer", "sgd", "--val-fraction", "0.5", "--channels", "gray", "--deterministic",
        "--strategy", "default", "--mixed-precision", "bfloat16", "--no-augment",
    ])
    assert config.train == Config().train.__class__(
        epochs=2, steps_per_epoch=5, batch_size=3, tile=188, optimizer="sgd", learning_rate=0.01,
        val_fraction=0.5, seed=3, deterministic=True, strategy="default", mixed_precision="bfloat16")
    assert (config.model.filters, config.model.depth, config.model.padding, config.model.upsampling,
            config.model.pick_channels) == (8, 2, "same", "nearest", "gray")
    assert config.augment.enabled is False and config.augment.elastic_p == 0.1


def test_predict_options_override_the_settings_saved_with_the_model(monkeypatch, tmp_path):
    import numpy as np

    from unetcell.config import Config
    from unetcell.io import write_tiff
    from unetcell.model import build_unet, save_model

    saved = Config().override("model", filters=2, depth=1).override("predict", threshold=0.6, min_size=5)
    save_model(build_unet(saved.model), tmp_path / "m.keras", saved)
    write_tiff(tmp_path / "x.tif", np.zeros((8, 8), np.uint8))
    base = ["predict", str(tmp_path / "m.keras"), str(tmp_path / "x.tif"), "-o", str(tmp_path / "p.tif")]
    assert _config_given_to(monkeypatch, "unetcell.predict", "predict_files", base) == saved
    config = _config_given_to(monkeypatch, "unetcell.predict", "predict_files", base + [
        "--tile", "60", "--batch-size", "2", "--threshold", "0.4", "--channels", "0",
        "--instances", "components", "--tta"])
    assert config.predict == saved.predict.__class__(
        tile=60, batch_size=2, threshold=0.4, min_size=5, instances="components", tta=True)
    assert config.model.pick_channels == "0" and config.model.filters == 2


def test_targets_draws_the_three_classes_the_option_names(tmp_path):
    import tifffile
    from imageio.v3 import imread

    labels = np.zeros((40, 60), np.uint16)
    labels[10:30, 2:31], labels[10:30, 31:58] = 1, 2
    tifffile.imwrite(tmp_path / "mask.tif", labels)
    drawn = {}
    for kind in ("two-class", "three-class"):
        out = tmp_path / f"{kind}.png"
        result = CliRunner().invoke(main, ["targets", str(tmp_path / "mask.tif"), "-o", str(out), "--targets", kind])
        assert result.exit_code == 0, result.output
        drawn[kind] = imread(out)
    # White is the page, the gap column (two classes) or the border class (three): the figures
    # differ by the extra border pixels, each drawn as a zoom x zoom block.
    from unetcell.figures import MIN_EDGE
    from unetcell.targets import BORDER, three_classes

    extra = int((three_classes(labels) == BORDER).sum()) - 20
    zoom = -(-MIN_EDGE // 60)
    white = {kind: int(np.all(rgb[..., :3] == 255, axis=-1).sum()) for kind, rgb in drawn.items()}
    assert white["three-class"] - white["two-class"] == pytest.approx(extra * zoom**2, rel=0.1)
