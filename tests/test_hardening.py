"""Bad input, interruptions and untrusted files, each through the CLI: the exit status, the
file named in the message, no traceback, and what is (or is not) on disk afterwards."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unetcell import io as uio
from unetcell.cli import main
from unetcell.config import Config
from unetcell.data import load_examples, read_pairs
from unetcell.errors import ConfigError, DataError
from unetcell.files import atomic_path, remove_stale_temporaries
from unetcell.folders import discover_pairs
from unetcell.model import VERSION_ENTRY, saved_entry
from unetcell.predict import choose_tile
from unetcell.tiling import Geometry, tile_plan
from unetcell.train import STATE_ENTRY, RunCheckpoint, Trainer

CLI = [sys.executable, "-m", "unetcell.cli"]
TINY = (
    Config()
    .override("model", filters=4, depth=2)
    .override("train", tile=60, batch_size=1, epochs=1, steps_per_epoch=2, seed=1, val_fraction=0.0)
    .override("augment", enabled=False)
)
TINY_ARGS = ["--filters", "4", "--depth", "2", "--tile", "60", "--steps-per-epoch", "2",
             "--val-fraction", "0", "--no-augment", "--seed", "1"]


def _mask(h=64, w=64, cells=3):
    mask = np.zeros((h, w), np.uint16)
    for k in range(cells):
        mask[4 + 18 * k:16 + 18 * k, 6:20 + 4 * k] = k + 1
    return mask


def _folder(root: Path, count=3, size=(64, 64)) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        tifffile.imwrite(root / "images" / f"c{i}.tif", rng.integers(0, 255, size, dtype=np.uint8))
        tifffile.imwrite(root / "masks" / f"c{i}.tif", _mask(*size))
    return root


def _cli(args, **kwargs):
    result = CliRunner().invoke(main, [str(a) for a in args], **kwargs)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a bug, not a message: show it
    return result


def _refused(result, *words):
    """Non-zero exit, every word in the message, no traceback."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert str(word) in result.output, (word, result.output)
    return result.output


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """model.keras of a run folder as `train` leaves it after TINY's one epoch (model.keras,
    last.keras with its state, config.toml), written by the run's own checkpoint callback
    around an untrained network: these tests need the files, not a trained network."""
    from unetcell.config import save_config

    run = tmp_path_factory.mktemp("tiny") / "run"
    run.mkdir()
    save_config(TINY, run / "config.toml")
    checkpoint = RunCheckpoint(run, TINY, math.inf, None)
    checkpoint.set_model(Trainer(TINY).model)
    checkpoint.on_epoch_end(0)
    return run / "model.keras"


# --- bad folders: every problem of a folder in one message, nothing trained ----------------

def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _refused(_cli(["train", tmp_path / "empty", "--out", tmp_path / "run"]), "empty", "empty")
    (tmp_path / "noimg" / "images").mkdir(parents=True)
    _refused(_cli(["train", tmp_path / "noimg", "--out", tmp_path / "run"]), "images", "empty")
    assert not (tmp_path / "run" / "model.keras").exists()


def test_every_missing_mask_and_orphan_in_one_message(tmp_path):
    data = _folder(tmp_path / "d", count=4)
    (data / "masks" / "c1.tif").unlink()
    (data / "masks" / "c3.tif").unlink()
    tifffile.imwrite(data / "masks" / "stray.tif", _mask())
    out = _refused(_cli(["train", data, "--out", tmp_path / "run"]), "3 problems", "c1.tif", "c3.tif", "stray.tif")
    assert out.count("no mask with the stem") == 2


def _corrupt(path: Path):
    path.write_bytes(path.read_bytes()[: max(8, path.stat().st_size // 3)])


BAD_FILES = {
    # name: (what to do to a copy of the folder, file named, words of the message)
    "size mismatch": (lambda d: tifffile.imwrite(d / "images" / "c0.tif", np.zeros((50, 64), np.uint8)),
                      "c0.tif", "50 x 64"),
    "truncated TIFF": (lambda d: _corrupt(d / "images" / "c0.tif"), "c0.tif", "cannot be read"),
    "garbage TIFF": (lambda d: (d / "images" / "c0.tif").write_bytes(os.urandom(3000)), "c0.tif", "corrupt"),
    "truncated PNG": (lambda d: (iio.imwrite(d / "images" / "c0.png", np.zeros((64, 64), np.uint8)),
                                 (d / "images" / "c0.tif").unlink(), _corrupt(d / "images" / "c0.png")),
                      "c0.png", "cannot be read"),
    "corrupt JPEG": (lambda d: ((d / "images" / "c0.tif").unlink(),
                                (d / "images" / "c0.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(500))),
                     "c0.jpg", "cannot be read"),
    "float mask": (lambda d: tifffile.imwrite(d / "masks" / "c0.tif", np.random.rand(64, 64).astype(np.float32)),
                   "c0.tif", "probability map"),
    "negative mask": (lambda d: tifffile.imwrite(d / "masks" / "c0.tif", -_mask().astype(np.int16)),
                      "c0.tif", "negative"),
    "NaN pixels": (lambda d: tifffile.imwrite(d / "images" / "c0.tif",
                                              np.where(np.eye(64) > 0, np.nan, 1).astype(np.float32)),
                   "c0.tif", "NaN or infinite"),
    "infinite pixels": (lambda d: tifffile.imwrite(d / "images" / "c0.tif", np.full((64, 64), np.inf, np.float32)),
                        "c0.tif", "row 0, column 0"),
    "z-stack": (lambda d: tifffile.imwrite(d / "images" / "c0.tif", np.zeros((5, 64, 64), np.uint8),
                                           imagej=True, metadata={"axes": "ZYX"}),
                "c0.tif", "a z-stack along axis Z (size 5)"),
    "time series": (lambda d: tifffile.imwrite(d / "images" / "c0.tif", np.zeros((3, 64, 64), np.uint8),
                                               imagej=True, metadata={"axes": "TYX"}),
                    "c0.tif", "tifffile.imread('c0.tif')[0]"),
    "mixed channel counts": (lambda d: tifffile.imwrite(d / "images" / "c2.tif", np.zeros((64, 64, 3), np.uint8),
                                                        photometric="rgb"),
                             "c2.tif", "--channels gray"),
    "all masks empty": (lambda d: [tifffile.imwrite(p, np.zeros((64, 64), np.uint8)) for p in (d / "masks").iterdir()],
                        "masks", "all zero"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_one_clear_error(tmp_path, case):
    spoil, named, words = BAD_FILES[case]
    data = _folder(tmp_path / "d")
    spoil(data)
    _refused(_cli(["train", data, "--out", tmp_path / "run", *TINY_ARGS]), named, words)
    assert not (tmp_path / "run" / "model.keras").exists()


def test_all_problems_of_a_folder_in_one_message(tmp_path):
    data = _folder(tmp_path / "d", count=5)
    tifffile.imwrite(data / "images" / "c0.tif", np.zeros((50, 64), np.uint8))
    tifffile.imwrite(data / "masks" / "c1.tif", np.random.rand(64, 64).astype(np.float32))
    tifffile.imwrite(data / "images" / "c2.tif", np.full((64, 64), np.nan, np.float32))
    (data / "images" / "c4.tif").write_bytes(b"II*\x00garbage")
    out = _refused(_cli(["train", data, "--out", tmp_path / "run"]), "4 problems in",
                   "c0.tif", "c1.tif", "c2.tif", "c4.tif")
    assert "50 x 64" in out and "probability map" in out and "NaN" in out and "cannot be read" in out
    assert "c3.tif" not in out


def test_unpaired_files_and_bad_contents_come_in_the_same_message(tmp_path):
    data = _folder(tmp_path / "d", count=4)
    (data / "masks" / "c1.tif").unlink()
    tifffile.imwrite(data / "masks" / "c2.tif", np.random.rand(64, 64).astype(np.float32))
    tifffile.imwrite(data / "images" / "c3.tif", np.zeros((50, 64), np.uint8))
    out = _refused(_cli(["train", data, "--out", tmp_path / "run", *TINY_ARGS]), "3 problems in",
                   "c1.tif", "c2.tif", "c3.tif")
    assert "no mask with the stem" in out and "probability map" in out and "50 x 64" in out
    assert "c0.tif" not in out
    assert not (tmp_path / "run" / "model.keras").exists()


def test_an_empty_mask_among_others_is_reported_not_refused(tmp_path):
    data = _folder(tmp_path / "d")
    tifffile.imwrite(data / "masks" / "c1.tif", np.zeros((64, 64), np.uint8))
    examples, report = load_examples(discover_pairs(data), TINY)
    assert len(examples) == 3 and report.empty == ["c1.tif"]
    assert "1 all-zero mask(s) taught as images without cells: c1.tif" in report.describe()


def test_config_typo_names_the_file_and_the_key(tmp_path):
    (tmp_path / "c.toml").write_text("[train]\nepocs = 3\n")
    data = _folder(tmp_path / "d")
    _refused(_cli(["train", data, "--out", tmp_path / "run", "--config", tmp_path / "c.toml"]),
             "c.toml", "train.epocs", "epochs")
    (tmp_path / "c.toml").write_text("[train\n")
    _refused(_cli(["train", data, "--out", tmp_path / "run", "--config", tmp_path / "c.toml"]),
             "c.toml", "not valid TOML")
    _refused(_cli(["train", data, "--out", tmp_path / "run", "--channels", "red"]), "--channels", "red")


# --- channels ---------------------------------------------------------------------------

@pytest.mark.slow
def test_channels_gray_trains_on_mixed_folders_and_predict_applies_it(tmp_path):
    data = _folder(tmp_path / "d")
    gray = np.random.default_rng(5).integers(30, 200, (64, 64)).astype(np.uint8)
    rgb = np.stack([gray - 30, gray, gray + 30], axis=-1)  # its mean is `gray`
    tifffile.imwrite(data / "images" / "c2.tif", rgb, photometric="rgb")
    result = _cli(["train", data, "--out", tmp_path / "run", *TINY_ARGS, "--epochs", "1", "--channels", "gray"])
    assert result.exit_code == 0, result.output
    assert 'pick_channels = "gray"' in (tmp_path / "run" / "config.toml").read_text()
    model = tmp_path / "run" / "model.keras"
    tifffile.imwrite(tmp_path / "gray.tif", gray)
    for image in (data / "images" / "c2.tif", tmp_path / "gray.tif"):
        result = _cli(["predict", model, image, "-o", tmp_path / f"{image.stem}_p.tif"])
        assert result.exit_code == 0, result.output
    from_rgb, from_gray = tifffile.imread(tmp_path / "c2_p.tif"), tifffile.imread(tmp_path / "gray_p.tif")
    assert from_rgb.std() > 0
    np.testing.assert_allclose(from_rgb, from_gray, atol=1e-5)


def test_channels_pick_and_reorder(tmp_path):
    image = np.random.default_rng(1).integers(0, 999, (8, 9, 3)).astype(np.uint16)
    assert np.array_equal(uio.select_channels(image, "2,0"), image[..., [2, 0]])
    assert np.array_equal(uio.select_channels(image, "1"), image[..., 1:2])
    np.testing.assert_allclose(uio.select_channels(image, "gray")[..., 0], image.mean(axis=2), rtol=1e-6)
    with pytest.raises(DataError, match=r"x.tif: has 3 channel\(s\).*asks for channel\(s\) 3"):
        uio.select_channels(image, "0,3", "x.tif")


def test_predict_refuses_a_channel_count_the_model_does_not_take(tiny_model, tmp_path):
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    _refused(_cli(["predict", tiny_model, tmp_path / "rgb.tif", "-o", tmp_path / "p.tif"]),
             "rgb.tif", "3 channel(s)", "trained on 1", "--channels")
    assert not (tmp_path / "p.tif").exists()
    result = _cli(["predict", tiny_model, tmp_path / "rgb.tif", "-o", tmp_path / "p.tif", "--channels", "1"])
    assert result.exit_code == 0, result.output


# --- untrusted and unusual model files -----------------------------------------------------

def test_model_files_that_are_not_models(tiny_model, tmp_path):
    image = tmp_path / "i.tif"
    tifffile.imwrite(image, np.zeros((64, 64), np.uint8))
    _refused(_cli(["predict", tmp_path / "nope.keras", image, "-o", tmp_path / "o.tif"]), "nope.keras")
    (tmp_path / "fake.keras").write_text("not a model")
    _refused(_cli(["predict", tmp_path / "fake.keras", image, "-o", tmp_path / "o.tif"]),
             "fake.keras", "not a Keras model")
    import keras

    x = keras.Input((None, None, 1))
    keras.Model(x, keras.layers.Lambda(lambda t: t * 2)(x)).save(tmp_path / "lambda.keras")
    _refused(_cli(["predict", tmp_path / "lambda.keras", image, "-o", tmp_path / "o.tif"]),
             "lambda.keras", "Lambda layer", "safe mode")
    assert not (tmp_path / "o.tif").exists()


def test_a_model_from_a_newer_unetcell_says_which_version_is_needed(tiny_model, tmp_path):
    with zipfile.ZipFile(tiny_model) as archive:
        saved = json.loads(archive.read(VERSION_ENTRY))
        entries = {n: archive.read(n) for n in archive.namelist()}
    assert saved["format"] == 1 and saved["unetcell"]
    entries[VERSION_ENTRY] = json.dumps({"unetcell": "9.1.0", "format": 7}).encode()
    with zipfile.ZipFile(tmp_path / "future.keras", "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    image = tmp_path / "i.tif"
    tifffile.imwrite(image, np.zeros((64, 64), np.uint8))
    _refused(_cli(["predict", tmp_path / "future.keras", image, "-o", tmp_path / "o.tif"]),
             "future.keras", "unetcell 9.1.0", "unetcell >= 9.1.0")


# --- decompression bombs: refused from the header, before any allocation --------------------

def _patch_tiff_size(path: Path, height: int, width: int) -> None:
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        offsets = {name: (tags[name].valueoffset, tags[name].dtype) for name in ("ImageWidth", "ImageLength")}
    data = bytearray(path.read_bytes())
    for name, value in (("ImageWidth", width), ("ImageLength", height)):
        offset, dtype = offsets[name]
        size = 2 if dtype == 3 else 4
        data[offset:offset + size] = value.to_bytes(size, "little")
    path.write_bytes(bytes(data))


def test_tiff_and_png_bombs_are_refused_from_their_headers(tiny_model, tmp_path):
    tifffile.imwrite(tmp_path / "bomb.tif", np.zeros((16, 16), np.uint8))
    _patch_tiff_size(tmp_path / "bomb.tif", 60000, 60000)
    iio.imwrite(tmp_path / "bomb.png", np.zeros((16, 16), np.uint8))
    data = bytearray((tmp_path / "bomb.png").read_bytes())
    data[16:24] = (50000).to_bytes(4, "big") + (50000).to_bytes(4, "big")
    (tmp_path / "bomb.png").write_bytes(bytes(data))
    for name in ("bomb.tif", "bomb.png"):
        _refused(_cli(["predict", tiny_model, tmp_path / name, "-o", tmp_path / "o.tif"]),
                 name, "60000 x 60000" if name.endswith("tif") else "50000 x 50000", "declares")
        with pytest.raises(DataError, match="declares"):
            uio.read_image(tmp_path / name)
    assert not (tmp_path / "o.tif").exists()


def test_an_image_beyond_the_memory_budget_is_refused_before_reading(tmp_path, monkeypatch):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((300, 400), np.uint16))
    monkeypatch.setattr(uio, "memory_budget", lambda: 100_000)
    with pytest.raises(DataError, match=r"a.tif: 300 x 400 uint16 pixels need 234.4 KiB"):
        uio.read_image(tmp_path / "a.tif")
    monkeypatch.undo()
    assert uio.read_image(tmp_path / "a.tif").shape == (300, 400, 1)


def test_legitimately_compressed_images_are_not_mistaken_for_bombs(tmp_path):
    zeros = np.zeros((2048, 2048), np.uint8)  # compresses about 1000:1 with deflate
    tifffile.imwrite(tmp_path / "z.tif", zeros, compression="zlib", tile=(256, 256))
    iio.imwrite(tmp_path / "z.png", zeros)
    for name in ("z.tif", "z.png"):
        assert uio.read_image(tmp_path / name).shape == (2048, 2048, 1)


# --- outputs: never overwritten, never half-written ------------------------------------------

def test_existing_outputs_are_refused_and_untouched(tiny_model, tmp_path):
    image = tmp_path / "i.tif"
    tifffile.imwrite(image, np.zeros((64, 64), np.uint8))
    for out in ("exists.tif", "exists_overlay.png"):
        (tmp_path / "exists.tif").unlink(missing_ok=True)
        (tmp_path / out).write_text("keep me")
        _refused(_cli(["predict", tiny_model, image, "-o", tmp_path / "exists.tif", "--overlay"]), out, "--overwrite")
        assert (tmp_path / out).read_text() == "keep me"
    run = tiny_model.parent
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()}
    _refused(_cli(["train", tmp_path, "--out", run]), str(run), "--overwrite", "--resume")
    assert before == {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()}


def test_stale_temporaries_of_killed_writers_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.{dead.pid}.abc123.tif"
    live = tmp_path / f".out.{os.getpid()}.xyz789.tif"
    other = tmp_path / f".other.{dead.pid}.abc123.tif"
    for p in (stale, live, other):
        p.write_text("partial")
    assert remove_stale_temporaries(tmp_path / "out.tif") == [stale]
    assert live.exists() and other.exists() and not stale.exists()


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "o.tif") as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_removes_the_partial_file_and_says_how_much_was_needed(tiny_model, tmp_path):
    image = tmp_path / "i.tif"
    tifffile.imwrite(image, np.random.default_rng(0).integers(0, 255, (1024, 1024), dtype=np.uint8))

    def limit():  # a file size limit fails writes as a full disk does (Python ignores SIGXFSZ)
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    out = tmp_path / "out"
    out.mkdir()
    run = subprocess.run(CLI + ["predict", str(tiny_model), str(image), "-o", str(out / "p.tif")],
                         capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert "p.tif: could not be written" in run.stderr and "(about 4.0 MiB needed" in run.stderr
    assert "the partial file was removed" in run.stderr
    assert list(out.iterdir()) == []


# --- interruptions ---------------------------------------------------------------------------

def _wait_for(predicate, seconds=120, proc=None):
    end = time.time() + seconds
    while time.time() < end:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False  # it ended first: waiting on would only cost the rest of the minutes
        time.sleep(0.2)
    return False


# `unetcell predict` whose bar pauses at each batch of tiles: a tiny model on a fast machine
# writes the whole slide between two looks at the folder, and the signal must land mid-write.
SLOW_PREDICT = [sys.executable, "-c", """
import time
from unetcell import progress
from unetcell.cli import main
real = progress.tqdm
def paused(*args, **kwargs):
    bar = real(*args, **kwargs)
    update = bar.update
    def slowly(n=1):
        time.sleep(0.5)
        return update(n)
    bar.update = slowly
    return bar
progress.tqdm = paused
main()
"""]


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_an_interrupted_predict_leaves_nothing_and_the_next_run_is_clean(tiny_model, tmp_path, how):
    image = tmp_path / "big.tif"
    tifffile.imwrite(image, np.random.default_rng(0).integers(0, 255, (2000, 2000), dtype=np.uint8))
    out = tmp_path / "out"
    out.mkdir()
    # A shell's background job inherits an ignored SIGINT; give the child Python's usual one.
    proc = subprocess.Popen(SLOW_PREDICT + ["predict", str(tiny_model), str(image), "-o", str(out / "p.tif")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    writing = _wait_for(lambda: any(p.stat().st_size > 0 for p in out.glob(".p.*.tif")), proc=proc)
    ended = proc.poll()
    assert writing, (ended, "still running" if ended is None else proc.stderr.read())
    proc.send_signal(how)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in err
    assert not (out / "p.tif").exists()
    left = list(out.iterdir())
    assert len(left) == (1 if how == signal.SIGKILL else 0), left  # Ctrl-C cleans up itself
    assert _cli(["predict", tiny_model, image, "-o", out / "p.tif"]).exit_code == 0
    assert [p.name for p in out.iterdir()] == ["p.tif"]


def _history(run):
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_ctrl_c_mid_epoch_saves_and_resume_ends_where_an_uninterrupted_run_does(tmp_path, monkeypatch):
    data = _folder(tmp_path / "d")
    # Without the post-training tuning, which changes no loss (the resumed run reads the setting
    # from the run's config.toml).
    (tmp_path / "untuned.toml").write_text("[train]\ntune_postprocessing = false\n")
    args = ["train", data, "--filters", "4", "--depth", "2", "--tile", "60", "--steps-per-epoch", "3",
            "--val-fraction", "0.3", "--no-augment", "--seed", "1", "--epochs", "2",
            "--config", tmp_path / "untuned.toml"]
    assert _cli(args + ["--out", tmp_path / "straight"]).exit_code == 0
    calls = []

    def ctrl_c_after_the_fourth_step(self, batch, logs=None):
        calls.append(batch)
        if len(calls) == 4:  # epoch 2, step 1
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(RunCheckpoint, "on_train_batch_end", ctrl_c_after_the_fourth_step)
    result = _cli(args + ["--out", tmp_path / "run"])
    assert result.exit_code == 130
    out = _refused(result, "interrupted: training stopped at epoch 2, step 1 of 3",
                   "--resume", str(tmp_path / "run" / "last.keras"), "Continue with: unetcell train")
    assert "saving a checkpoint after this step" in out
    assert json.loads((tmp_path / "run" / "state.json").read_text())["steps_done"] == 1
    monkeypatch.undo()
    result = _cli(["train", data, "--out", tmp_path / "run", "--resume"])
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and "epoch 2, step 2 of 3 of 2" in result.output
    straight, resumed = _history(tmp_path / "straight"), _history(tmp_path / "run")
    assert [r["epoch"] for r in resumed] == ["0", "1"]
    for a, b in zip(straight, resumed):  # same tiles, same optimizer state
        np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-4)
        np.testing.assert_allclose(float(a["val_loss"]), float(b["val_loss"]), rtol=1e-4)


@pytest.mark.slow
def test_a_nan_loss_stops_with_the_last_good_checkpoint_kept(tmp_path, monkeypatch):
    import tensorflow as tf

    from unetcell import train as train_module

    data = _folder(tmp_path / "d")
    clean = train_module.training_dataset

    def nan_from_the_fourth_batch(examples, config, augmenter=None, start=0, shard=(0, 1)):
        def poison(i, batch):
            # NaN in the weight map, not the images: in a traced graph TF 2.21's fused
            # convolution + ReLU on CPU turns a NaN image into zeros (eager keeps the NaN),
            # and the loss then stays finite.
            images, packed = batch
            weights = tf.where(i >= 3, packed[..., 1:] * np.nan, packed[..., 1:])
            return images, tf.concat([packed[..., :1], weights], axis=-1)

        return clean(examples, config, augmenter, start, shard=shard).enumerate().map(poison)

    monkeypatch.setattr(train_module, "training_dataset", nan_from_the_fourth_batch)
    run = tmp_path / "run"
    out = _refused(_cli(["train", data, "--out", run, *TINY_ARGS, "--epochs", "3", "--steps-per-epoch", "3"]),
                   "loss became nan at epoch 2, step 1", str(run / "last.keras"), "lower --learning-rate")
    assert "last good checkpoint" in out
    assert json.loads((run / "state.json").read_text())["epochs_done"] == 1
    assert len(_history(run)) == 1
    import keras

    model = keras.saving.load_model(run / "last.keras")
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_resume_refuses_another_network_and_says_when_nothing_is_left(tiny_model, tmp_path):
    run = tiny_model.parent
    data = tmp_path / "d"
    _folder(data)
    _refused(_cli(["train", data, "--out", run, "--resume", "--filters", "8"]), "last.keras", "filters 4", "8 asked")
    result = _cli(["train", data, "--out", run, "--resume"])
    assert result.exit_code == 0, result.output
    assert "nothing to resume" in result.output and "raise --epochs" in result.output
    _refused(_cli(["train", data, "--out", tmp_path / "nothing", "--resume"]), "nothing to resume")


@pytest.mark.slow
def test_a_kill_9_train_resumes_from_its_last_checkpoint(tmp_path):
    data = _folder(tmp_path / "d")
    run = tmp_path / "run"
    args = ["train", str(data), "--out", str(run), *TINY_ARGS, "--epochs", "40"]
    proc = subprocess.Popen(CLI + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for(lambda: (run / "state.json").exists(), 300, proc=proc)
    time.sleep(1.0)
    proc.kill()
    proc.wait()
    # What resume reads: the state inside last.keras (state.json may lag it by a kill).
    done = json.loads(saved_entry(run / "last.keras", STATE_ENTRY))["epochs_done"]
    assert 1 <= done < 40
    result = _cli(["train", data, "--out", run, "--resume", "--epochs", str(done + 2)])
    assert result.exit_code == 0, result.output
    assert f"from its checkpoint after {done} epoch(s): epoch {done + 1} of {done + 2}" in result.output
    assert [int(r["epoch"]) for r in _history(run)] == list(range(done + 2))
    assert not list(run.glob(".*"))


# --- property tests: the folder reader and the tile plan never fail unexpectedly -------------

_DTYPES = st.sampled_from([np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64, np.bool_])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=3),
    channels=st.lists(st.integers(1, 5), min_size=3, max_size=3),
    image_dtype=_DTYPES, mask_dtype=_DTYPES, png=st.booleans(), pick=st.sampled_from(["", "gray", "0", "1,0"]),
    seed=st.integers(0, 2**16),
)
def test_folder_reader_only_ever_raises_data_errors(tmp_path_factory, sizes, channels, image_dtype,
                                                     mask_dtype, png, pick, seed):
    rng = np.random.default_rng(seed)
    root = tmp_path_factory.mktemp("prop")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i, (h, w) in enumerate(sizes):
        c = channels[i]
        image = (rng.normal(100, 50, (h, w, c)) if c > 1 else rng.normal(100, 50, (h, w))).astype(image_dtype)
        mask = rng.integers(-1, 4, (h, w)).astype(mask_dtype)
        if png and (image_dtype == np.uint8 and c in (1, 3, 4) or image_dtype == np.uint16 and c == 1):
            iio.imwrite(root / "images" / f"i{i}.png", image)
        else:
            tifffile.imwrite(root / "images" / f"i{i}.tif", image)
        tifffile.imwrite(root / "masks" / f"i{i}.tif", mask)
    try:
        loaded = read_pairs(discover_pairs(root), pick)
    except (DataError, ConfigError) as e:
        assert str(e) and "Traceback" not in str(e)
        return
    counts = {image.shape[2] for _, image, _ in loaded}
    assert len(counts) == 1
    for _, image, mask in loaded:
        assert image.shape[:2] == mask.shape and mask.dtype == np.int32 and mask.min() >= 0
        assert image.dtype.kind != "f" or np.isfinite(image).all()


@settings(max_examples=30, deadline=None)
@given(data=st.binary(min_size=0, max_size=400), suffix=st.sampled_from([".tif", ".png", ".jpg"]))
def test_random_bytes_are_a_data_error_naming_the_file(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("bytes") / f"x{suffix}"
    prefix = {".tif": b"II*\x00", ".png": b"\x89PNG\r\n\x1a\n", ".jpg": b"\xff\xd8\xff"}[suffix]
    path.write_bytes(prefix + data)
    with pytest.raises(DataError, match=f"x{suffix}"):
        uio.read_image(path)


@settings(max_examples=200, deadline=None)
@given(height=st.integers(1, 5000), width=st.integers(1, 5000), depth=st.integers(1, 5),
       padding=st.sampled_from(["valid", "same"]), upsampling=st.sampled_from(["transpose", "bilinear"]),
       requested=st.integers(0, 1500))
def test_tile_plan_covers_every_pixel_once_for_any_size(height, width, depth, padding, upsampling, requested):
    geometry = Geometry(depth, padding, upsampling)
    tile, _ = choose_tile(requested, geometry)
    plan = tile_plan(height, width, tile, geometry)
    for axis, size in ((plan.rows, height), (plan.cols, width)):
        kept = [axis.keep(k) for k in range(axis.count)]
        assert kept[0][1].start == 0 and kept[-1][1].stop == size
        assert all(a[1].stop == b[1].start for a, b in zip(kept, kept[1:]))
        for k, (source, dest) in enumerate(kept):
            assert source.stop - source.start == dest.stop - dest.start > 0
            assert (axis.window(k)[0] + axis.context) % geometry.grid == 0
        assert axis.tile <= tile
