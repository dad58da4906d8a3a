"""TensorFlow's C++ start-up chatter is dropped from stderr; errors and everything else stay."""

import os
import subprocess
import sys

import pytest

from unetcell.quiet import filtered_stderr, is_chatter

INFO = b"I0000 00:00:1796076245.872835   14463 cudart_stub.cc:31] Could not find cuda drivers\n"
OLD_INFO = b"2025-09-17 14:44:05.157831: I external/local_xla/xla/tsl/cuda/cudart_stub.cc:32] Could not\n"
WARNING = b"W0000 00:00:1758131437.322781 3722519 computation_placer.cc:177] already registered\n"
ERROR = b"E0000 00:00:1758131437.297298 3722519 cuda_dnn.cc:8579] Unable to register cuDNN factory\n"
PREAMBLE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
OTHER = b"Traceback (most recent call last): I0000 is not at the start of this line\n"


@pytest.mark.parametrize(
    "level, kept",
    [
        (0, [PREAMBLE, INFO, OLD_INFO, WARNING, ERROR, OTHER]),
        (1, [WARNING, ERROR, OTHER]),
        (2, [ERROR, OTHER]),
        (3, [ERROR, OTHER]),  # level 3 would hide errors too: never here
    ],
)
def test_filtered_stderr_drops_only_log_lines_below_the_level(capfd, level, kept):
    with filtered_stderr(level):
        for line in (PREAMBLE, INFO, OLD_INFO, WARNING, ERROR, OTHER):
            os.write(2, line)
    assert capfd.readouterr().err == b"".join(kept).decode()
    assert [line for line in (INFO, ERROR) if is_chatter(line, level)] == [INFO] * (level >= 1)


def test_stderr_is_restored_after_an_error_in_the_block(capfd):
    with pytest.raises(ImportError), filtered_stderr(3):
        os.write(2, ERROR)
        raise ImportError("broken")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == (ERROR + b"after\n").decode()


def test_the_cli_imports_tensorflow_through_the_filter_and_prints_no_chatter():
    code = (
        "import sys, unetcell.cli, keras;"
        "print(type(sys.modules['tensorflow'].__spec__.loader).__name__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, check=True)
    assert result.stdout.decode().split() == ["_FilteredLoader"]
    lines = result.stderr.splitlines(keepends=True)
    assert not [line for line in lines if is_chatter(line, 2)], result.stderr.decode()


def test_the_cli_imports_keras_without_matplotlib_and_matplotlib_still_imports_after():
    # Keras imports matplotlib.pyplot when it can (0.2-0.7 s of every command's start-up).
    code = (
        "import sys, unetcell.cli, keras;"
        "print('matplotlib' in sys.modules);"
        "from keras.src.visualization import plot_image_gallery as g;"
        "print(g.plt is None);"
        "import matplotlib.figure;"
        "print(sys.modules['matplotlib'] is not None)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    assert result.stdout.decode().split() == ["False", "True", "True"]


def test_matplotlib_absent_leaves_an_imported_matplotlib_alone():
    import matplotlib

    from unetcell.quiet import matplotlib_absent

    with matplotlib_absent():
        import matplotlib.colors  # noqa: F401  (already importable: nothing is hidden)
    assert sys.modules["matplotlib"] is matplotlib
