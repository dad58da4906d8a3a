"""Reading a slide by bands of rows: unetcell's positioned reads against tifffile's own readers.

    .venv/bin/python benchmarks/slides.py [--size 8192] [--band 512] [--repeats 3]

`unetcell.slides` reads uncompressed, contiguous TIFF with `os.preadv` of exactly the rows a
band needs, and everything else through tifffile's zarr store (`aszarr`). This measures, on a
16-bit size x size image read whole in bands of --band rows (as `unetcell predict` reads it):

- striped, one strip per 64 rows (uncompressed, contiguous): `open_slide` (preadv) against
  `tifffile.memmap` (a copy of each band out of the map) and `aszarr` (one chunk per strip);
- striped as one single strip (tifffile's layout when asked for no rowsperstrip): the same
  three; aszarr's chunk is then the whole image;
- tiled, 256 x 256 tiles (uncompressed): `open_slide`, which takes the aszarr path, against
  aszarr opened directly; no memory map is possible.

Each reader runs in a fresh process; the figures are the best wall time of --repeats full
reads (from the page cache: the files were just written, so this is the readers' own cost,
not the disk's) and the peak RSS of the reads above the RSS before them (VmHWM after resetting
it through /proc/self/clear_refs), which counts the pages of a memory map that they touched.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

LAYOUTS = {
    "striped (64 rows per strip)": {"rowsperstrip": 64},
    "one strip": {"rowsperstrip": 2**31 - 1},
    "tiled (256 x 256)": {"tile": (256, 256)},
}
READERS = ("open_slide", "memmap", "aszarr")


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmHWM, VmRSS, RssFile...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def read_in_bands(path: str, reader: str, band: int, repeats: int) -> dict:
    """Run in a child process: read the image whole, band by band, `repeats` times."""
    import zarr

    from unetcell.slides import open_slide

    tif = tifffile.TiffFile(path)
    height = tif.series[0].shape[0]
    if reader == "open_slide":
        source = open_slide(path)
        get = source.rows
    elif reader == "memmap":
        source = tifffile.memmap(path, mode="r")
        def get(a, b):
            return np.array(source[a:b])
    else:
        source = zarr.open(tif.series[0].aszarr(), mode="r")
        def get(a, b):
            return np.asarray(source[a:b])
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak of the reads alone
    before = _status_mb("VmRSS")
    times, checksum = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        checksum = 0
        for row in range(0, height, band):
            checksum += int(get(row, min(row + band, height))[::97, ::89].sum())
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "rss_mb": _status_mb("VmHWM") - before, "checksum": checksum}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--band", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(read_in_bands(args.child[0], args.child[1], args.band, args.repeats)))
        return

    rng = np.random.default_rng(0)
    image = rng.integers(0, 4096, (args.size, args.size), np.uint16)
    megabytes = image.nbytes / 2**20
    print(f"{args.size}^2 uint16 ({megabytes:.0f} MiB), read whole in bands of {args.band} rows, "
          f"best of {args.repeats}; RSS above the process's before reading")
    with tempfile.TemporaryDirectory() as tmp:
        for layout, options in LAYOUTS.items():
            path = Path(tmp) / "slide.tif"
            tifffile.imwrite(path, image, **options)
            results = {}
            for reader in READERS:
                if reader == "memmap" and "tile" in options:
                    continue
                out = subprocess.run(
                    [sys.executable, __file__, "--band", str(args.band), "--repeats", str(args.repeats),
                     "--child", str(path), reader],
                    capture_output=True, text=True, check=True,
                )
                results[reader] = json.loads(out.stdout.splitlines()[-1])
            assert len({r["checksum"] for r in results.values()}) == 1, "readers disagree"
            base = results["open_slide"]["seconds"]
            print(f"\n{layout}:")
            for reader, r in results.items():
                print(f"  {reader:10s} {r['seconds']:6.3f} s  {megabytes / r['seconds']:7.0f} MiB/s  "
                      f"time x{r['seconds'] / base:5.2f} of open_slide   peak RSS +{r['rss_mb']:5.0f} MiB")
            path.unlink()


if __name__ == "__main__":
    main()
