"""TensorFlow and Keras started for the command line: without TensorFlow's C++ start-up chatter
on stderr, and without matplotlib's start-up.

`TF_CPP_MIN_LOG_LEVEL` filters TensorFlow's own logging, but since TF 2.16 part of its C++ code
logs through absl, which writes everything to file descriptor 2 until `absl::InitializeLog()`
is called, and Python never calls it: every `unetcell` command that loads a model printed

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:1796076245.872835   14463 cudart_stub.cc:31] Could not find cuda drivers ...

(tensorflow/tensorflow#100442). These lines come from shared libraries while `tensorflow` is
imported, below Python's `sys.stderr`, so the only cure is at the file descriptor:
`quiet_tensorflow_import` arranges that the first `import tensorflow`, wherever it happens (keras
imports it), runs with fd 2 captured, and afterwards writes back every line except the log lines
below the level `TF_CPP_MIN_LOG_LEVEL` asks for. Errors (E lines), Python warnings and
anything else are always written back, only later.

Keras imports `matplotlib.pyplot` when it is installed (for `keras.visualization`'s galleries,
which unetcell never calls), and that import costs every command's start-up 0.24 s (medians
of five fresh `import keras` on 2 quiet cores: 3.35 s against 3.11 s) to 0.7 s on loaded
cores, up to a tenth of `unetcell predict`'s fixed cost (issue 19: start-up is what keeps a
whole predict process from the forward pass's speed). `quiet_tensorflow_import` therefore
runs the first `import keras` with matplotlib marked absent, so Keras takes its own "not
installed" path; afterwards matplotlib imports as usual (unetcell's figures use it).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

_PREAMBLE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# absl: "I0000 00:00:1796076245.872835   14463 cudart_stub.cc:31] ..."; TensorFlow's own:
# "2025-09-17 14:44:05.157831: I external/local_xla/xla/tsl/cuda/cudart_stub.cc:32] ...".
_LOG_LINE = re.compile(rb"^(?:([IWEF])\d{4} [\d:.]+ +\d+ |\d{4}-\d\d-\d\d [\d:.]+: ([IWEF]) )\S+:\d+\] ")


def min_log_level() -> int:
    """TF_CPP_MIN_LOG_LEVEL as a number (0 shows all, 1 hides INFO, 2 also WARNING, ...)."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def is_chatter(line: bytes, level: int) -> bool:
    """Whether a line of C++ log output is below `level`: INFO at 1, INFO and WARNING at 2 or
    more. ERROR and FATAL lines are never chatter, whatever the level."""
    if line.rstrip(b"\r\n") == _PREAMBLE:
        return level >= 1
    match = _LOG_LINE.match(line)
    if match is None:
        return False
    severity = (match.group(1) or match.group(2)).decode()
    return (severity == "I" and level >= 1) or (severity == "W" and level >= 2)


@contextmanager
def filtered_stderr(level: int | None = None) -> Iterator[None]:
    """File descriptor 2 captured for the block; afterwards every line that `is_chatter` does
    not drop is written to the real stderr, in order. A process without fd 2 runs unfiltered."""
    level = min_log_level() if level is None else level
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = b"".join(line for line in capture if not is_chatter(line, level))
            if kept:
                os.write(2, kept)


@contextmanager
def matplotlib_absent() -> Iterator[None]:
    """`import matplotlib` (and its submodules) raises ImportError inside the block, unless it
    is imported already; afterwards it imports normally."""
    if "matplotlib" in sys.modules:
        yield
        return
    sys.modules["matplotlib"] = None  # type: ignore[assignment]  # the import system's "absent"
    try:
        yield
    finally:
        if sys.modules.get("matplotlib", False) is None:  # not imported for real meanwhile
            del sys.modules["matplotlib"]


class _FilteredLoader(importlib.abc.Loader):
    """The real loader of a module, executing it inside `context` (`filtered_stderr` unless
    told otherwise)."""

    def __init__(self, loader: importlib.abc.Loader, context=filtered_stderr) -> None:
        self._loader = loader
        self._context = context

    def __getattr__(self, name: str):  # is_package, get_resource_reader, ...: the real loader's
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        with self._context():
            self._loader.exec_module(module)


class _QuietFirstImport(importlib.abc.MetaPathFinder):
    """Finds `name` once, through the other finders, with a loader that runs it inside
    `context` (filtered stderr unless told otherwise)."""

    def __init__(self, name: str, context=filtered_stderr) -> None:
        self.name = name
        self.context = context

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once, and the real finders below find the real spec
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _FilteredLoader(spec.loader, self.context)
        return spec


def quiet_tensorflow_import() -> None:
    """TF_CPP_MIN_LOG_LEVEL 3 unless the user set it, the first `import tensorflow` of this
    process filtered by `filtered_stderr`, and the first `import keras` run with matplotlib
    absent. Neither is imported here: `unetcell --help` stays instant and commands without
    TensorFlow never load it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    hooked = {f.name for f in sys.meta_path if isinstance(f, _QuietFirstImport)}
    for name, context in (("tensorflow", filtered_stderr), ("keras", matplotlib_absent)):
        if name not in sys.modules and name not in hooked:
            sys.meta_path.insert(0, _QuietFirstImport(name, context))
