"""`tfds:NAME[/CONFIG][:SPLIT]` as a source of image/mask pairs, beside dataset folders.

    tfds:isbi2012                 the train split of the ISBI 2012 builder
    tfds:ctc2d/DIC-C2DH-HeLa      a Cell Tracking Challenge config
    tfds:isbi2012:train[:15]      TFDS's split slicing: examples 0-14 in the data set's order

The builder prepares the data set from the user's manual folder once into the TFDS data
folder (`TFDS_DATA_DIR`, by default ~/tensorflow_datasets) under `unetcell/<fingerprint>/`,
where the fingerprint covers the manual folder's path and every file's name, size and
modification time: a manual folder that changed is prepared anew, never served stale.
The examples then become `TfdsPair`s, which training and evaluation read exactly as they read
the files of a folder (same normalisation, targets cache and validation split).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError, UnetcellError
from ..files import check_writable
from ..io import write_tiff

PREFIX = "tfds:"
SPEC = re.compile(r"tfds:(?P<name>[a-z0-9_]+)(?:/(?P<config>[^:/]+))?(?::(?P<split>.+))?")


@dataclass(frozen=True)
class TfdsSpec:
    name: str
    config: str | None
    split: str

    @property
    def builder_name(self) -> str:
        return self.name if self.config is None else f"{self.name}/{self.config}"

    def __str__(self) -> str:
        return f"{PREFIX}{self.builder_name}:{self.split}"


def parse_spec(text: str) -> TfdsSpec:
    """`tfds:NAME[/CONFIG][:SPLIT]` checked against the builders unetcell provides."""
    from . import BUILDERS

    match = SPEC.fullmatch(str(text))
    if not match:
        raise DataError(f"{text}: expected tfds:NAME[/CONFIG][:SPLIT], e.g. tfds:ctc2d/PhC-C2DH-U373:train")
    name, config = match["name"], match["config"]
    if name not in BUILDERS:
        raise DataError(f"{text}: no data set {name!r}; unetcell provides {', '.join(sorted(BUILDERS))}")
    configs = [c.name for c in BUILDERS[name].BUILDER_CONFIGS]
    if configs and config not in configs:
        raise DataError(f"{text}: {name} needs one of the configs {', '.join(configs)} (tfds:{name}/{configs[0]})")
    if not configs and config is not None:
        raise DataError(f"{text}: {name} has no configs; use tfds:{name}")
    return TfdsSpec(name, config, match["split"] or "train")


def fingerprint(folder: Path) -> str:
    """A digest of a folder's path and its files' names, sizes and modification times."""
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def prepared_builder(spec: TfdsSpec, manual_dir: str | os.PathLike | None, data_dir: str | os.PathLike | None = None):
    """The TFDS builder of `spec`, prepared from `manual_dir` (once per manual folder content)."""
    import tensorflow_datasets as tfds

    from . import BUILDERS

    builder_cls = BUILDERS[spec.name]
    if manual_dir is None:
        raise DataError(
            f"{spec}: needs --manual-dir DIR, the folder holding the data set's files "
            f"({builder_cls.MANUAL_DOWNLOAD_INSTRUCTIONS})"
        )
    manual_dir = Path(manual_dir).expanduser()
    if not manual_dir.is_dir():
        raise DataError(f"{manual_dir}: no such folder (--manual-dir of {spec})")
    watched = manual_dir / spec.config if spec.config and (manual_dir / spec.config).is_dir() else manual_dir
    root = Path(data_dir or tfds.core.constants.get_default_data_dir()).expanduser()
    builder = tfds.builder(spec.builder_name, data_dir=root / "unetcell" / fingerprint(watched))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder


@dataclass(frozen=True)
class ExampleRef:
    """Where an image or label image of a TFDS example comes from: a file path's stand-in in
    messages (`str`) and reports (`name`)."""

    spec: TfdsSpec
    id: str
    feature: str

    @property
    def name(self) -> str:
        return f"{self.id} ({self.feature})"

    @property
    def parent(self) -> str:
        """The data set, where a file would name its folder."""
        return str(self.spec)

    def __str__(self) -> str:
        return f"{self.spec} example {self.id!r} ({self.feature})"


@dataclass(frozen=True)
class TfdsPair:
    """An example of a TFDS data set with the interface of `unetcell.folders.Pair`."""

    stem: str
    image: ExampleRef
    mask: ExampleRef | None
    pixels: np.ndarray = field(repr=False)
    labels: np.ndarray | None = field(repr=False)

    def load_image(self) -> np.ndarray:
        return self.pixels

    def load_mask(self) -> np.ndarray:
        return self.labels.astype(np.int32)


def tfds_pairs(
    data: str, manual_dir: str | os.PathLike | None, require_masks: bool = True,
    data_dir: str | os.PathLike | None = None,
) -> list[TfdsPair]:
    """The examples of a `tfds:` spec as pairs, in the data set's order. A split without labels
    (a challenge's test images) is an error when masks are required."""
    import tensorflow_datasets as tfds

    spec = parse_spec(data)
    builder = prepared_builder(spec, manual_dir, data_dir)
    try:
        dataset = builder.as_dataset(split=spec.split, shuffle_files=False)
    except (ValueError, KeyError, AssertionError) as e:
        splits = ", ".join(sorted(builder.info.splits))
        raise DataError(f"{spec}: no split {spec.split!r} ({e}); {spec.builder_name} has: {splits}") from None
    pairs = []
    for example in tfds.as_numpy(dataset):
        stem = example["id"].decode()
        labels = example["labels"]
        if labels.size == 0:
            if require_masks:
                raise DataError(
                    f"{spec}: example {stem!r} has no labels (an unannotated split); use a labelled split such as train"
                )
            labels = None
        pairs.append(TfdsPair(
            stem, ExampleRef(spec, stem, "image"), None if labels is None else ExampleRef(spec, stem, "labels"),
            example["image"], labels,
        ))
    if not pairs:
        raise DataError(f"{spec}: no examples")
    return pairs


def convert(
    data: str, manual_dir: str | os.PathLike | None, out: str | os.PathLike, overwrite: bool = False,
    data_dir: str | os.PathLike | None = None,
) -> list[TfdsPair]:
    """Write a `tfds:` data set in the folder format: OUT/images/<id>.tif in the source dtype
    and channels, OUT/masks/<id>.tif as uint16 instance labels (none for an unlabelled split).
    Every output is checked before the first is written."""
    pairs = tfds_pairs(data, manual_dir, require_masks=False, data_dir=data_dir)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UnetcellError(f"{out}: exists and is not a folder")
    for pair in pairs:
        check_writable(out / "images" / f"{pair.stem}.tif", overwrite)
        if pair.labels is not None:
            check_writable(out / "masks" / f"{pair.stem}.tif", overwrite)
    for pair in pairs:
        image = pair.pixels
        photometric = "rgb" if image.shape[2] == 3 else "minisblack"
        write_tiff(out / "images" / f"{pair.stem}.tif", image[..., 0] if image.shape[2] == 1 else image,
                   overwrite=overwrite, photometric=photometric)
        if pair.labels is not None:
            write_tiff(out / "masks" / f"{pair.stem}.tif", pair.labels.astype(np.uint16), overwrite=overwrite)
    return pairs
