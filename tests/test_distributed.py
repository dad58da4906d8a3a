"""tf.distribute: strategy choice, chief rules, two workers on localhost, MirroredStrategy over
two logical CPU devices against one device, mixed precision and sharded prediction.

Anything that configures TensorFlow's devices or collectives runs in a subprocess, because it
must happen before TensorFlow starts and the test process has started it already.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from unetcell.cli import main
from unetcell.config import Config
from unetcell.distribute import Role, cluster_resolver, parse_shard, resolve_strategy_name, role
from unetcell.errors import ConfigError
from unetcell.model import build_unet, save_model
from unetcell.train import Trainer

TINY = (
    Config()
    .override("model", filters=4, depth=2, dropout=0.0)
    .override("train", tile=92, batch_size=1, epochs=1, steps_per_epoch=3, seed=5, val_fraction=0.25)
)


def _tf_config(monkeypatch, cluster, task_type, index):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}}))


# --- choosing the strategy and the chief --------------------------------------------------

def test_auto_is_multi_worker_under_a_tf_config_cluster_and_default_on_one_cpu(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert resolve_strategy_name("auto") == "default"  # no GPU on the test machine
    _tf_config(monkeypatch, {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "worker", 1)
    assert resolve_strategy_name("auto") == "multi-worker"
    assert resolve_strategy_name("mirrored") == "mirrored"
    with pytest.raises(ConfigError, match="strategy must be one of"):
        resolve_strategy_name("horovod")


def test_bad_tf_config_and_no_cluster_are_clear_errors(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{cluster: oops")
    with pytest.raises(ConfigError, match="TF_CONFIG is not valid JSON"):
        cluster_resolver()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"]}}))
    with pytest.raises(ConfigError, match='no "task"'):
        cluster_resolver()
    monkeypatch.delenv("TF_CONFIG")
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    with pytest.raises(ConfigError, match="needs a cluster"):
        cluster_resolver()


class _Strategy:  # what role() reads of a strategy, without starting a cluster
    def __init__(self, resolver):
        self.cluster_resolver = resolver


def test_the_chief_is_task_chief_or_worker_0_of_a_cluster_without_one(monkeypatch):
    workers = {"worker": ["h:1", "h:2"]}
    _tf_config(monkeypatch, workers, "worker", 0)
    assert role(_Strategy(cluster_resolver())) == Role("worker", 0, 2, False)
    assert role(_Strategy(cluster_resolver())).is_chief
    _tf_config(monkeypatch, workers, "worker", 1)
    assert not role(_Strategy(cluster_resolver())).is_chief
    with_chief = {"chief": ["h:0"], "worker": ["h:1", "h:2"]}
    _tf_config(monkeypatch, with_chief, "worker", 0)
    this = role(_Strategy(cluster_resolver()))
    assert this.workers == 3 and not this.is_chief
    _tf_config(monkeypatch, with_chief, "chief", 0)
    assert role(_Strategy(cluster_resolver())).is_chief
    assert role(_Strategy(None)).is_chief  # one process: it is the chief


def test_slurm_step_on_cpu_nodes_gives_one_worker_per_task(monkeypatch, tmp_path):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi: CPU nodes
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[07-08]")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "2(x2)")
    resolver = cluster_resolver()
    assert resolver.cluster_spec().as_dict() == {
        "worker": ["node07:8888", "node07:8889", "node08:8888", "node08:8889"]
    }
    assert (resolver.task_type, resolver.task_id) == ("worker", 2)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


# --- sharing a slide list -----------------------------------------------------------------

def test_shard_parsing(monkeypatch):
    assert parse_shard("0/1") == (0, 1)
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)
    _tf_config(monkeypatch, {"chief": ["h:0"], "worker": ["h:1", "h:2"]}, "worker", 1)
    assert parse_shard("auto") == (2, 3)  # chief 0, worker 0 -> 1, worker 1 -> 2
    monkeypatch.delenv("TF_CONFIG")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "5")
    assert parse_shard("auto") == (3, 5)


def test_shards_of_predict_write_every_image_once_between_them(tmp_path):
    config = Config().override("model", filters=4, depth=2)
    model = tmp_path / "model.keras"
    save_model(build_unet(config.model), model, config)
    images = []
    for i in range(5):
        images.append(tmp_path / f"slide{i}.tif")
        tifffile.imwrite(images[-1], np.random.default_rng(i).integers(0, 255, (40, 48), np.uint8))
    out = tmp_path / "out"
    written = []
    for index in range(2):
        result = CliRunner().invoke(main, ["predict", str(model), *map(str, images), "-o", str(out),
                                           "--shard", f"{index}/2"])
        assert result.exit_code == 0, result.output
        written.append(sorted(p.name for p in out.glob("*.tif")))
    assert written[0] == ["slide0.tif", "slide2.tif", "slide4.tif"]
    assert written[1] == ["slide0.tif", "slide1.tif", "slide2.tif", "slide3.tif", "slide4.tif"]


# --- mixed precision ----------------------------------------------------------------------

@pytest.mark.slow  # one training step per precision
@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_mixed_precision_computes_low_keeps_float32_variables_and_probabilities(precision):
    config = TINY.override("train", mixed_precision=precision)
    trainer = Trainer(config)
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after building
    assert trainer.model.get_layer("down0_conv1").compute_dtype == precision
    assert {v.dtype for v in trainer.model.trainable_variables} == {"float32"}
    is_scaled = isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
    assert is_scaled == (precision == "float16")  # float16 needs loss scaling, bfloat16 not
    rng = np.random.default_rng(0)
    images = rng.random((1, 92, 92, 1), np.float32)
    packed = np.stack([rng.integers(0, 2, (1, 52, 52)), np.ones((1, 52, 52))], -1).astype(np.float32)
    before = [v.numpy().copy() for v in trainer.model.trainable_variables]
    loss = float(trainer.distributed_train_step((images, packed)))
    assert np.isfinite(loss) and 0.3 < loss < 1.5  # about ln 2 for an untrained network
    assert trainer.model(images).dtype == "float32"
    changed = [not np.array_equal(b, v.numpy()) for b, v in zip(before, trainer.model.trainable_variables)]
    assert all(changed)


# --- real distribution, in subprocesses ---------------------------------------------------

def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    import unetcell.train as train_module
    from unetcell.config import Config, load_config

    trainers = []
    class Recording(train_module.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)
    train_module.Trainer = Recording
    data, run, config_path, weights_out = sys.argv[1:]
    train_module.train(data, run, load_config(config_path), verbose=0)
    np.savez(weights_out, *[v.numpy() for v in trainers[0].model.weights])
""")


@pytest.mark.slow
def test_two_workers_on_localhost_train_together_and_only_the_chief_writes(synth_folder, tmp_path):
    from unetcell.config import save_config

    config = TINY.override("train", strategy="multi-worker")
    save_config(config, tmp_path / "config.toml")
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    workers = []
    for i in range(2):
        scratch = tmp_path / f"tmp{i}"
        scratch.mkdir()
        env = dict(os.environ, TMPDIR=str(scratch), TF_CPP_MIN_LOG_LEVEL="3",
                   TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}))
        workers.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, str(synth_folder), str(tmp_path / "run"),
             str(tmp_path / "config.toml"), str(tmp_path / f"weights{i}.npz")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    for worker in workers:
        output, _ = worker.communicate(timeout=600)
        assert worker.returncode == 0, output[-3000:]
    run = tmp_path / "run"
    assert (run / "model.keras").exists() and (run / "last.keras").exists()
    with open(run / "history.csv") as f:
        assert len(f.read().strip().splitlines()) == 2  # the chief's header and one epoch
    # The other worker wrote its copy into its own temporary folder and deleted it.
    assert list((tmp_path / "tmp0").iterdir()) == [] and list((tmp_path / "tmp1").iterdir()) == []
    with np.load(tmp_path / "weights0.npz") as w0, np.load(tmp_path / "weights1.npz") as w1:
        first, second = [w0[k] for k in w0.files], [w1[k] for k in w1.files]
    saved = keras.saving.load_model(run / "last.keras", safe_mode=True).weights
    assert len(first) == len(second) == len(saved)
    initial = build_unet(TINY.model)
    for a, b, c in zip(first, second, saved):
        np.testing.assert_array_equal(a, b)  # all-reduced gradients: bit-identical replicas
        np.testing.assert_array_equal(a, c.numpy())
    assert any(not np.array_equal(a, v.numpy()) for a, v in zip(first, initial.weights))


MIRRORED = textwrap.dedent("""
    import csv, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from unetcell.config import load_config
    from unetcell.train import train

    data, out, config_path = sys.argv[1:]
    # "resumed" extends a finished one-epoch run to two, equal to a straight run only at a
    # constant rate (a cosine's first epoch depends on the run's length)
    config = load_config(config_path).override("train", schedule="constant")
    one = config.override("train", batch_size=2, epochs=2)
    two = config.override("train", batch_size=1, epochs=2)  # per replica: the same global batch 2
    # The post-training tuning changes no history row; the mirrored run "two" keeps it.
    untuned = {"tune_postprocessing": False}
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert mirrored.num_replicas_in_sync == 2
    train(data, out + "/one", one.override("train", **untuned), verbose=0)
    train(data, out + "/two", two, strategy=mirrored, verbose=0)
    resumed = two.override("train", **untuned)
    train(data, out + "/resumed", resumed.override("train", epochs=1), strategy=mirrored, verbose=0)
    train(data, out + "/resumed", resumed, strategy=mirrored, resume=True, verbose=0)
""")


@pytest.mark.slow
def test_mirrored_over_two_cpu_devices_matches_one_device_with_the_same_global_batch(synth_folder, tmp_path):
    from unetcell.config import save_config

    save_config(TINY, tmp_path / "config.toml")
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED, str(synth_folder), str(tmp_path), str(tmp_path / "config.toml")],
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import csv

    def history(name):
        with open(tmp_path / name / "history.csv") as f:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]

    one, two, resumed = history("one"), history("two"), history("resumed")
    assert len(one) == len(two) == len(resumed) == 2
    # Same tiles, same initial weights, gradients summed in another order: float32 round-off
    # only, so the losses agree to 1e-5 relative over two epochs. IoU and pixel accuracy count
    # pixels above 0.5, where round-off flips the odd pixel: 1e-3 absolute (measured: 1.7e-5).
    for a, b, c in zip(one, two, resumed):
        for key, rtol, atol in [("loss", 1e-5, 0), ("val_loss", 1e-5, 0),
                                ("val_iou", 0, 1e-3), ("val_pixel_accuracy", 0, 1e-3)]:
            np.testing.assert_allclose(b[key], a[key], rtol=rtol, atol=atol, err_msg=f"{key}: {one} {two}")
            np.testing.assert_allclose(c[key], a[key], rtol=rtol, atol=atol, err_msg=f"resumed {key}: {resumed}")
    assert one[1]["loss"] != one[0]["loss"]  # it trained


@pytest.mark.slow
def test_a_worker_whose_chief_fails_exits_with_a_clear_error_instead_of_waiting(synth_folder, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes(b"the user's model")  # the chief refuses to overwrite it
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    workers = []
    for i in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
                   TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}))
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "unetcell.cli", "train", str(synth_folder), "--out", str(run),
             "--strategy", "multi-worker", "--filters", "4", "--depth", "2", "--tile", "92"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    chief, other = (w.communicate(timeout=300)[0] for w in workers)
    assert [w.returncode for w in workers] == [1, 1]
    assert "error: " in chief and "--overwrite" in chief
    assert "error: worker 1 of 2 workers: lost the other workers" in other
    assert "Traceback" not in chief + other
    assert (run / "model.keras").read_bytes() == b"the user's model"
