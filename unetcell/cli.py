"""The `unetcell` command: options parsed, a config built, work handed to the library.

No numpy and no TensorFlow here; the library is imported inside each command so that
`unetcell --help` answers at once.
"""

from __future__ import annotations

import os
import sys

import click

from .errors import UnetcellError
from .quiet import quiet_tensorflow_import

# TensorFlow's C++ start-up chatter is noise to a user; real errors still surface.
quiet_tensorflow_import()


class _Group(click.Group):
    """Turns a UnetcellError into one line on stderr and exit status 1 (no traceback)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UnetcellError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(getattr(e, "exit_code", 1))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="unetcell")
def main() -> None:
    """Train a U-Net on a folder of microscopy images and segment cells in slides of any size.

    \b
      unetcell synth data/demo --count 8          make a synthetic dataset
      unetcell train data/demo --out runs/demo    train a U-Net on a folder
      unetcell predict runs/demo/model.keras slide.tif -o probs.tif
      unetcell evaluate data/test --model runs/demo/model.keras
      unetcell export runs/demo/model.keras serving/cells/1
      unetcell train tfds:isbi2012 --manual-dir isbi/ --out runs/isbi   a public data set
    """


def _load(config_path):
    from .config import load_config

    return load_config(config_path)


config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False),
    help="TOML file with settings; command-line options override it.",
)


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--count", default=8, show_default=True, help="Number of images.")
@click.option("--shape", nargs=2, type=int, default=(256, 256), show_default=True, help="Height and width.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same files.")
@click.option("--bit-depth", type=click.Choice(["8", "16"]), default="8", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace files that exist in OUT.")
def synth(out, count, shape, seed, bit_depth, overwrite):
    """Write a synthetic fluorescence dataset (images/, masks/) with touching cells to OUT."""
    from .synth import write_dataset

    paths = write_dataset(out, count=count, shape=tuple(shape), seed=seed,
                          bit_depth=int(bit_depth), overwrite=overwrite)
    click.echo(f"wrote {len(paths)} images and masks to {out}")


@main.command()
@click.argument("data", type=click.Path(file_okay=False))
@click.option("--out", "run_dir", required=True, type=click.Path(file_okay=False), help="Run folder.")
@config_option
@click.option("--manual-dir", type=click.Path(exists=True, file_okay=False),
              help="For DATA tfds:NAME[/CONFIG][:SPLIT]: the folder with the data set's own files.")
@click.option("--epochs", type=int)
@click.option("--steps-per-epoch", type=int)
@click.option("--batch-size", type=int)
@click.option("--tile", type=int, help="Input tile edge (rounded to the nearest valid size).")
@click.option("--filters", type=int, help="Filters of the first level (paper: 64).")
@click.option("--depth", type=int, help="Number of poolings (paper: 4).")
@click.option("--padding", type=click.Choice(["valid", "same"]))
@click.option("--learning-rate", type=float)
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]))
@click.option("--val-fraction", type=float, help="Share of images (or of a single image) held out; 0: none.")
@click.option("--seed", type=int)
@click.option("--channels", help="Pick or reorder channels (0,2) or average them (gray); kept with the model.")
@click.option("--deterministic", is_flag=True, default=None, help="TensorFlow op determinism.")
@click.option("--strategy", type=click.Choice(["auto", "default", "mirrored", "multi-worker"]),
              help="tf.distribute strategy: mirrored = every GPU here; multi-worker = the cluster "
                   "in TF_CONFIG or the Slurm step; auto picks one. --batch-size is per replica.")
@click.option("--mixed-precision", type=click.Choice(["off", "bfloat16", "float16"]),
              help="Compute in bfloat16 or float16 (GPUs), float32 variables and softmax.")
@click.option("--no-augment", is_flag=True, help="Train on plain tiles.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last epoch.")
@click.option("--save-targets", is_flag=True, help="Write PNGs of the class and weight maps to RUN/targets.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run in --out.")
def train(data, run_dir, config_path, manual_dir, epochs, steps_per_epoch, batch_size, tile, filters, depth,
          padding, learning_rate, optimizer, val_fraction, seed, channels, deterministic, strategy,
          mixed_precision, no_augment, resume, save_targets, overwrite):
    """Train a U-Net on DATA (images/ and masks/) and write the run to --out.

    DATA may also be a public data set, tfds:NAME[/CONFIG][:SPLIT] with --manual-dir
    (tfds:isbi2012, tfds:dsb2018, tfds:ctc2d/PhC-C2DH-U373, tfds:ctc2d/DIC-C2DH-HeLa;
    tfds:isbi2012:train[:15] takes the first 15 examples).
    """
    from .train import train as run_training

    # A resumed run continues with its own settings; options given now override them.
    if resume and config_path is None and os.path.exists(os.path.join(run_dir, "config.toml")):
        config_path = os.path.join(run_dir, "config.toml")
    config = (
        _load(config_path)
        .override("model", filters=filters, depth=depth, padding=padding, pick_channels=channels)
        .override("train", epochs=epochs, steps_per_epoch=steps_per_epoch, batch_size=batch_size,
                  tile=tile, learning_rate=learning_rate, optimizer=optimizer,
                  val_fraction=val_fraction, seed=seed, deterministic=deterministic,
                  strategy=strategy, mixed_precision=mixed_precision)
        .override("augment", enabled=False if no_augment else None)
    )
    run_training(data, run_dir, config, resume=resume, overwrite=overwrite, save_targets=save_targets,
                 manual_dir=manual_dir)


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(), help="Output TIFF, or a folder for several images.")
@click.option("--tile", type=int, help="Input tile edge (rounded to the nearest valid size).")
@click.option("--batch-size", type=int, help="Tiles per forward pass.")
@click.option("--output", type=click.Choice(["probabilities", "labels", "both"]), default="probabilities",
              show_default=True, help="Foreground probabilities, instance labels, or both.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "uint8"]), default="float32",
              show_default=True, help="How probabilities are stored: float16 halves the file, "
                                      "uint8 (probability x 255, rounded) quarters it.")
@click.option("--threshold", type=float, help="Foreground probability for labels.")
@click.option("--channels", help="Pick or reorder channels (0,2) or average them (gray); default: as in training.")
@click.option("--instances", "instance_method", type=click.Choice(["watershed", "components"]),
              help="Split touching cells with a watershed (default) or keep the paper's connected "
                   "components.")
@click.option("--tta", is_flag=True, default=None,
              help="Average the 8 flips and 90-degree rotations (8x the time).")
@click.option("--overlay", is_flag=True, help="Also write an overlay PNG of predicted contours.")
@click.option("--shard", help="I/N: predict only every N-th image from the I-th (0-based), so N "
                              "machines share one list; auto: I and N from TF_CONFIG or Slurm.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
def predict(model, images, out, tile, batch_size, output, dtype, threshold, channels, instance_method, tta,
            overlay, shard, overwrite):
    """Segment IMAGES of any size with the overlap-tile strategy.

    Writes foreground probabilities (float32, or --dtype) or instance labels (int32) as tiled TIFF with
    the height and width of each image. OUT is a .tif file for one image, a folder otherwise:
    OUT/<stem>.tif, or OUT/probabilities/ and OUT/labels/ with --output both; overlays in
    OUT/overlays/ (beside the file as OUT_overlay.png for one image).
    """
    from .config import Config
    from .model import saved_config
    from .predict import predict_files

    config = (saved_config(model) or Config()).override(
        "predict", tile=tile, batch_size=batch_size, threshold=threshold,
        instances=instance_method, tta=tta).override("model", pick_channels=channels)
    if shard is not None:
        from .distribute import parse_shard

        shard = parse_shard(shard)
    results = predict_files(model, images, out, config, output=output, overlay=overlay,
                            overwrite=overwrite, echo=lambda m: click.echo(m, err=True), shard=shard,
                            dtype=dtype)
    for result in results:
        cells = "" if result.cells is None else f", {result.cells} cells"
        click.echo(f"{result.source}: {result.shape[0]} x {result.shape[1]} in {result.tiles} "
                   f"tiles of {result.tile_shape[0]} x {result.tile_shape[1]}{cells} -> "
                   + ", ".join(str(p) for p in result.written))


@main.command()
@click.argument("data", type=click.Path(file_okay=False))
@click.option("--manual-dir", type=click.Path(exists=True, file_okay=False),
              help="For DATA tfds:NAME[/CONFIG][:SPLIT]: the folder with the data set's own files.")
@click.option("--model", type=click.Path(exists=True, dir_okay=False), help="Predict DATA's images with this model.")
@click.option("--predictions", type=click.Path(exists=True, file_okay=False),
              help="Folder of label images matched by stem.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the metrics as JSON.")
@click.option("--overlay", "overlay_dir", type=click.Path(file_okay=False),
              help="Write a PNG per image of true and predicted contours.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
def evaluate(data, manual_dir, model, predictions, json_path, overlay_dir, overwrite):
    """Score predictions of DATA's images against DATA's masks (DATA: a folder, or
    tfds:NAME[/CONFIG][:SPLIT] with --manual-dir).

    Prints pixel accuracy, IoU, Dice, AP and F1 at IoU 0.5, mean AP over IoU 0.5:0.95 and the
    adapted Rand error per image and pooled over all images (counts summed).
    """
    from .evaluate import evaluate_folder, format_table, write_json
    from .files import check_writable

    if (model is None) == (predictions is None):
        raise UnetcellError("evaluate needs exactly one of --model MODEL and --predictions DIR")
    if json_path:
        check_writable(json_path, overwrite)  # before the work, not after it
    result = evaluate_folder(data, predictions=predictions, model=model,
                             overlay_dir=overlay_dir, overwrite=overwrite, manual_dir=manual_dir)
    click.echo(format_table(result))
    if json_path:
        write_json(result, json_path, overwrite=overwrite)
        click.echo(f"wrote {json_path}")
    if overlay_dir:
        click.echo(f"wrote {len(result['images'])} overlays to {overlay_dir}")


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--tile", type=int, help="Input tile edge of the served pass (default: predict's).")
@click.option("--batch-size", type=int, help="Tiles per forward pass in the served graph.")
@click.option("--check", is_flag=True,
              help="Reload the SavedModel in a fresh process and compare it with predict.")
@click.option("--overwrite", is_flag=True, help="Replace an existing SavedModel.")
def export(model, out, tile, batch_size, check, overwrite):
    """Export MODEL as a SavedModel in OUT that serves with TensorFlow alone.

    OUT is a version folder as TensorFlow Serving wants it (serving/cells/1). Its
    serving_default signature takes raw float32 images [batch, height, width, channels] of any
    size and returns foreground_probability [batch, height, width] and class_probabilities
    [batch, height, width, classes], normalised and tiled in the graph as predict does.
    """
    from .config import Config
    from .export import CHECK_TOLERANCE, CLASSES, FOREGROUND, INPUT, SIGNATURE, check_export, export_model
    from .model import saved_config

    config = (saved_config(model) or Config()).override("predict", tile=tile, batch_size=batch_size)
    written = export_model(model, out, config, overwrite=overwrite)
    click.echo(f"wrote {written}: {SIGNATURE}({INPUT}: float32 [batch, height, width, "
               f"{config.model.channels}]) -> {FOREGROUND} [batch, height, width], "
               f"{CLASSES} [batch, height, width, {config.model.classes}]")
    if check:
        worst = check_export(model, written, config)
        click.echo(f"check: a 301 x 457 image served in a fresh process (TensorFlow alone) "
                   f"against unetcell predict: max |difference| {worst:.1e}")
        if not worst <= CHECK_TOLERANCE:
            raise UnetcellError(f"{written}: served probabilities differ from predict by "
                                f"{worst:.1e} (more than {CHECK_TOLERANCE:.0e})")


@main.command()
@click.argument("data")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--manual-dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The folder with the data set's own files.")
@click.option("--overwrite", is_flag=True, help="Replace files that exist in OUT.")
def convert(data, out, manual_dir, overwrite):
    """Write a public data set, DATA = tfds:NAME[/CONFIG][:SPLIT], as a dataset folder:
    OUT/images/<id>.tif in the source's pixel type, OUT/masks/<id>.tif uint16 instance labels."""
    from .datasets.source import convert as convert_dataset

    pairs = convert_dataset(data, manual_dir, out, overwrite=overwrite)
    masks = sum(pair.labels is not None for pair in pairs)
    click.echo(f"wrote {len(pairs)} images and {masks} masks to {out}")


@main.command()
@click.argument("mask", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), help="Show the image beside the maps.")
@config_option
@click.option("--overwrite", is_flag=True)
def targets(mask, out, image, config_path, overwrite):
    """Draw what the network is taught for MASK: class map and weight map (paper Fig. 3)."""
    from .figures import save_targets_figure

    save_targets_figure(mask, out, _load(config_path).targets, image_path=image, overwrite=overwrite)
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
