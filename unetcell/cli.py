"""The `unetcell` command: options parsed, a config built, work handed to the library.

No numpy and no TensorFlow here; the library is imported inside each command so that
`unetcell --help` answers at once.
"""

from __future__ import annotations

import os
import sys

import click

from .errors import ConfigError, UnetcellError
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


def setting(section: str, name: str, *decls: str, **attrs):
    """An option that sets the config field `section.name` (a field of `unetcell.config`'s
    dataclasses): a new setting on the command line is this one decorator line.

    Not given, the option is None and the TOML file's (or the saved model's) value stands.
    Its type is the field's (a bool field is a flag; `flag_value=False` makes a --no-X flag)
    unless `type` is given. The command receives it in `**settings`, for `with_settings`.
    """
    from .config import Config

    default = getattr(getattr(Config(), section), name)  # an unknown field fails at import
    if isinstance(default, bool):
        attrs.setdefault("is_flag", True)
    elif "type" not in attrs:
        attrs["type"] = type(default)
    return click.option(*decls, f"{section}{_SEP}{name}", default=None, **attrs)


_SEP = "__"  # between section and field in the parameter names `setting` gives click


def with_settings(config, settings: dict):
    """`config` with every option of `setting` that was given applied to its field."""
    sections: dict[str, dict] = {}
    for key, value in settings.items():
        section, name = key.split(_SEP)
        sections.setdefault(section, {})[name] = value
    for section, values in sections.items():
        config = config.override(section, **values)
    _refuse_typed_defaults(config.model, sections.get("model", {}))
    return config


def _refuse_typed_defaults(model, given: dict) -> None:
    """The config cannot tell a typed default from an untouched one, and FCN-8s and DeepLabv3+
    take the U-Net's defaults to mean "as published" (config._check_arch_settings); what a
    user typed on the command line that they would silently not do is refused here."""
    if model.arch in ("fcn8s", "deeplabv3plus") and given.get("padding") == "valid":
        raise ConfigError(f"--padding valid: {model.arch} is zero-padded throughout (same); remove --padding")
    if model.arch == "deeplabv3plus" and given.get("upsampling") == "transpose":
        raise ConfigError("--upsampling transpose: deeplabv3plus's decoder up-samples bilinear (fixed); "
                          "remove --upsampling or set bilinear")
    if model.arch == "fcn8s" and given.get("depth") == 4:
        raise ConfigError("--depth 4: fcn8s has VGG-16's five poolings (depth 5); remove --depth or set 5")


targets_kind_option = setting(
    "targets", "kind", "--targets", type=click.Choice(["two-class", "three-class"]),
    help="two-class: the paper's cell and background with the border weight map; three-class: "
         "cell interior, cell border and background, instances grown from the interiors.")


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
@setting("train", "epochs", "--epochs", help="Epochs to train.")
@setting("train", "steps_per_epoch", "--steps-per-epoch", help="Training steps (batches) per epoch.")
@setting("train", "batch_size", "--batch-size", help="Tiles per step (per replica).")
@setting("train", "tile", "--tile", help="Input tile edge (rounded to the nearest valid size).")
@setting("model", "arch", "--arch", type=click.Choice(["unet", "unet-separable", "fcn8s", "deeplabv3plus"]),
         help="Network: the paper's U-Net (default) or one to compare (README, Architectures).")
@setting("model", "filters", "--filters", help="Filters of the first level (paper: 64).")
@setting("model", "depth", "--depth",
         help="Number of poolings (paper: 4); deeplabv3plus: 4 or 3 (output stride 16 or 8); fcn8s: always 5.")
@setting("model", "padding", "--padding", type=click.Choice(["valid", "same"]),
         help="valid: the paper's unpadded convolutions; same: zero padding (fcn8s and deeplabv3plus: always).")
@setting("model", "upsampling", "--upsampling", type=click.Choice(["transpose", "bilinear", "nearest"]),
         help="transpose: the paper's learned 2x2 up-convolution; bilinear or nearest: fixed, then a "
              "2x2 convolution (deeplabv3plus: always bilinear).")
@setting("train", "learning_rate", "--learning-rate", help="The optimizer's learning rate.")
@setting("train", "schedule", "--schedule", type=click.Choice(["constant", "cosine"]),
         help="Learning rate: constant, or cosine decay after a 5 % warm-up.")
@setting("train", "optimizer", "--optimizer", type=click.Choice(["adam", "sgd"]),
         help="adam, or sgd with the paper's momentum.")
@setting("train", "val_fraction", "--val-fraction", help="Share of images (or of a single image) held out; 0: none.")
@setting("train", "seed", "--seed", help="Same seed, same tiles, augmentations and initial weights.")
@setting("model", "pick_channels", "--channels",
         help="Pick or reorder channels (0,2) or average them (gray); kept with the model.")
@setting("train", "deterministic", "--deterministic", help="TensorFlow op determinism.")
@setting("train", "strategy", "--strategy", type=click.Choice(["auto", "default", "mirrored", "multi-worker"]),
         help="tf.distribute strategy: mirrored = every GPU here; multi-worker = the cluster "
              "in TF_CONFIG or the Slurm step; auto picks one. --batch-size is per replica.")
@setting("train", "mixed_precision", "--mixed-precision", type=click.Choice(["off", "bfloat16", "float16"]),
         help="Compute in bfloat16 or float16 (GPUs), float32 variables and softmax.")
@targets_kind_option
@setting("augment", "enabled", "--no-augment", flag_value=False, help="Train on plain tiles.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last epoch.")
@click.option("--save-targets", is_flag=True, help="Write PNGs of the class and weight maps to RUN/targets.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run in --out.")
def train(data, run_dir, config_path, manual_dir, resume, save_targets, overwrite, **settings):
    """Train a U-Net (or the network of --arch) on DATA (images/ and masks/) and write the run to --out.

    DATA may also be a public data set, tfds:NAME[/CONFIG][:SPLIT] with --manual-dir
    (tfds:isbi2012, tfds:dsb2018, tfds:ctc2d/PhC-C2DH-U373, tfds:ctc2d/DIC-C2DH-HeLa;
    tfds:isbi2012:train[:15] takes the first 15 examples).
    """
    from .train import train as run_training

    # A resumed run continues with its own settings; options given now override them.
    if resume and config_path is None and os.path.exists(os.path.join(run_dir, "config.toml")):
        config_path = os.path.join(run_dir, "config.toml")
    config = with_settings(_load(config_path), settings)
    run_training(data, run_dir, config, resume=resume, overwrite=overwrite, save_targets=save_targets,
                 manual_dir=manual_dir)


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(), help="Output TIFF, or a folder for several images.")
@setting("predict", "tile", "--tile", help="Input tile edge (rounded to the nearest valid size).")
@setting("predict", "batch_size", "--batch-size", help="Tiles per forward pass.")
@click.option("--output", type=click.Choice(["probabilities", "labels", "both"]), default="probabilities",
              show_default=True, help="Foreground probabilities, instance labels, or both.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "uint8"]), default="float32",
              show_default=True, help="How probabilities are stored: float16 halves the file, "
                                      "uint8 (probability x 255, rounded) quarters it.")
@setting("predict", "threshold", "--threshold", help="Foreground probability for labels.")
@setting("predict", "min_size", "--min-size",
         help="Drop instances smaller than this (pixels); default: as stored with the model.")
@setting("model", "pick_channels", "--channels",
         help="Pick or reorder channels (0,2) or average them (gray); default: as in training.")
@setting("predict", "instances", "--instances", type=click.Choice(["watershed", "components", "interiors"]),
         help="Split touching cells with a watershed (default) or keep the paper's connected "
              "components; interiors: grow a three-class model's interiors (its default).")
@setting("predict", "tta", "--tta", help="Average the 8 flips and 90-degree rotations (8x the time).")
@click.option("--overlay", is_flag=True, help="Also write an overlay PNG of predicted contours.")
@click.option("--shard", help="I/N: predict only every N-th image from the I-th (0-based), so N "
                              "machines share one list; auto: I and N from TF_CONFIG or Slurm.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
def predict(model, images, out, output, dtype, overlay, shard, overwrite, **settings):
    """Segment IMAGES of any size with the overlap-tile strategy.

    Writes foreground probabilities (float32, or --dtype) or instance labels (int32) as tiled TIFF with
    the height and width of each image. OUT is a .tif file for one image, a folder otherwise:
    OUT/<stem>.tif, or OUT/probabilities/ and OUT/labels/ with --output both; overlays in
    OUT/overlays/ (beside the file as OUT_overlay.png for one image).
    """
    from .config import Config
    from .model import saved_config
    from .predict import predict_files

    config = with_settings(saved_config(model) or Config(), settings)
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
@setting("predict", "tile", "--tile", help="Input tile edge of the served pass (default: predict's).")
@setting("predict", "batch_size", "--batch-size", help="Tiles per forward pass in the served graph.")
@click.option("--check", is_flag=True,
              help="Reload the SavedModel in a fresh process and compare it with predict.")
@click.option("--overwrite", is_flag=True, help="Replace an existing SavedModel.")
def export(model, out, check, overwrite, **settings):
    """Export MODEL as a SavedModel in OUT that serves with TensorFlow alone.

    OUT is a version folder as TensorFlow Serving wants it (serving/cells/1). Its
    serving_default signature takes raw float32 images [batch, height, width, channels] of any
    size and returns foreground_probability [batch, height, width] and class_probabilities
    [batch, height, width, classes], normalised and tiled in the graph as predict does.
    """
    from .config import Config
    from .export import CHECK_TOLERANCE, CLASSES, FOREGROUND, INPUT, SIGNATURE, check_export, export_model
    from .model import saved_config

    config = with_settings(saved_config(model) or Config(), settings)
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
@targets_kind_option
@click.option("--overwrite", is_flag=True)
def targets(mask, out, image, config_path, overwrite, **settings):
    """Draw what the network is taught for MASK: class map and weight map (paper Fig. 3)."""
    from .figures import save_targets_figure

    config = with_settings(_load(config_path), settings)
    save_targets_figure(mask, out, config.targets, image_path=image, overwrite=overwrite)
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
