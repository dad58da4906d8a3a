"""Training on several GPUs and several machines through tf.distribute, and sharing a slide
list between the machines of a cluster.

`--strategy` picks how the one training loop of `unetcell.train` runs:
    default       one device (TensorFlow's default strategy)
    mirrored      MirroredStrategy: every GPU of this machine, one replica each
    multi-worker  MultiWorkerMirroredStrategy: several processes (machines), each with its GPUs
                  (or its CPU); the cluster comes from TF_CONFIG or from a Slurm job step
    auto          multi-worker when TF_CONFIG names more than one task, mirrored when more than
                  one GPU is visible, default otherwise

Every worker runs the same program. Only the chief (task "chief", or worker 0 of a cluster
without one) writes the run folder; the others write the same files to a temporary folder of
their own and delete it at the end (TensorFlow's multi-worker guide: saving may need
collectives, so every worker saves, but to its own place).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from .errors import ConfigError

STRATEGIES = ("auto", "default", "mirrored", "multi-worker")
SLURM_PORT = 8888  # first port of a Slurm step's workers on each node (TensorFlow's default)


def _tf_config() -> dict:
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster", {}), dict):
        raise ConfigError('TF_CONFIG must be {"cluster": {...}, "task": {"type": ..., "index": ...}}')
    return config


def _tf_config_tasks(config: dict) -> int:
    return sum(len(addresses) for addresses in config.get("cluster", {}).values())


def _in_slurm_step() -> bool:
    return "SLURM_PROCID" in os.environ and "SLURM_STEP_NUM_TASKS" in os.environ


def cluster_resolver() -> tf.distribute.cluster_resolver.ClusterResolver:
    """The cluster this process belongs to: TF_CONFIG when set, else the Slurm job step."""
    config = _tf_config()
    if config:
        task = config.get("task", {})
        if _tf_config_tasks(config) and not ("type" in task and "index" in task):
            raise ConfigError('TF_CONFIG has a cluster but no "task": {"type": ..., "index": ...}')
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if _in_slurm_step():
        return _slurm_resolver()
    raise ConfigError(
        "--strategy multi-worker needs a cluster: set TF_CONFIG on every worker, or run each "
        "worker as a task of a Slurm job step (srun)"
    )


def _slurm_resolver() -> tf.distribute.cluster_resolver.SlurmClusterResolver:
    # TensorFlow's resolver counts GPUs with nvidia-smi and fails on CPU nodes; there every
    # task gets a port and no GPU.
    has_gpus = "CUDA_VISIBLE_DEVICES" in os.environ or shutil.which("nvidia-smi") is not None
    if has_gpus:
        resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(port_base=SLURM_PORT)
    else:
        from tensorflow.python.distribute.cluster_resolver.slurm_cluster_resolver import (
            expand_tasks_per_node,
        )

        per_node = max(expand_tasks_per_node(os.environ.get("SLURM_STEP_TASKS_PER_NODE", "1")))
        resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(
            port_base=SLURM_PORT, gpus_per_node=per_node, gpus_per_task=1, auto_set_gpu=False
        )
    resolver.cluster_spec()  # sets task_type and task_id
    return resolver


def resolve_strategy_name(name: str) -> str:
    """What `auto` means on this machine; other names are returned as they are."""
    if name not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}. Received: {name!r}")
    if name != "auto":
        return name
    if _tf_config_tasks(_tf_config()) > 1:
        return "multi-worker"
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return "mirrored"
    return "default"


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """The strategy named by `--strategy`. Build it first thing: MultiWorkerMirroredStrategy
    configures TensorFlow's collectives, which must happen before TensorFlow starts."""
    name = resolve_strategy_name(name)
    if name == "multi-worker":
        _shorten_peer_health_checks()
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=cluster_resolver())
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _shorten_peer_health_checks(seconds: int = 2) -> None:
    # The strategy pings its peers from a thread that sleeps 30 s between rounds and is joined
    # when the strategy is deleted: every worker lingered 30-90 s after its last step (measured
    # on localhost). A short interval ends the process at once and notices a dead peer sooner.
    from tensorflow.python.distribute import collective_all_reduce_strategy as car

    extended = getattr(car, "CollectiveAllReduceExtended", None)
    if extended is not None and hasattr(extended, "_check_health_interval"):
        extended._check_health_interval = seconds


@dataclass(frozen=True)
class Role:
    """Which worker this process is, in TF_CONFIG's words."""

    task_type: str | None
    task_id: int
    workers: int  # processes taking part (1 without a cluster)
    cluster_has_chief: bool = False

    @property
    def is_chief(self) -> bool:
        if self.task_type in (None, "chief"):
            return True
        return self.task_type == "worker" and self.task_id == 0 and not self.cluster_has_chief

    def describe(self) -> str:
        if self.workers == 1:
            return "single worker"
        return f"{self.task_type} {self.task_id} of {self.workers} workers" + (
            " (chief)" if self.is_chief else "")


def role(strategy: tf.distribute.Strategy) -> Role:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().jobs:
        return Role(None, 0, 1)
    spec = resolver.cluster_spec()
    workers = sum(spec.num_tasks(job) for job in spec.jobs)
    return Role(resolver.task_type, int(resolver.task_id or 0), workers, "chief" in spec.jobs)


@contextlib.contextmanager
def worker_dir(run_dir: Path, this: Role) -> Iterator[Path]:
    """The run folder for the chief; a temporary folder, deleted at the end, for the others."""
    if this.is_chief:
        yield run_dir
        return
    tmp = Path(tempfile.mkdtemp(prefix=f"unetcell-{this.task_type}{this.task_id}-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` (I in 0..N-1) or `auto` (this task's index and the task count from TF_CONFIG or
    Slurm) -> (index, count): `unetcell predict` then takes every N-th image from the I-th."""
    if text == "auto":
        config = _tf_config()
        if config:
            task = config.get("task", {})
            kinds = config.get("cluster", {})
            # Chief first, then the workers: every task of the cluster gets its own share.
            order = [(kind, i) for kind in sorted(kinds, key=lambda k: k != "chief")
                     for i in range(len(kinds[kind]))]
            try:
                return order.index((task.get("type"), int(task.get("index", -1)))), len(order)
            except ValueError:
                raise ConfigError(f"--shard auto: TF_CONFIG's task {task} is not in its cluster") from None
        tasks = os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS"))
        if "SLURM_PROCID" in os.environ and tasks:
            return int(os.environ["SLURM_PROCID"]), int(tasks)
        raise ConfigError("--shard auto needs TF_CONFIG or a Slurm task (SLURM_PROCID); "
                          "otherwise give --shard I/N")
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must be I/N (e.g. 0/4) or auto. Received: {text!r}") from None
    if not 0 <= index < count:
        raise ConfigError(f"--shard I/N needs 0 <= I < N. Received: {text!r}")
    return index, count
