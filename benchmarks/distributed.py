"""What tf.distribute costs on one machine (issue 20): training steps per second with one
process on one device, with two worker processes on localhost under MultiWorkerMirroredStrategy,
and with MirroredStrategy over two logical CPU devices, all at the same global batch; and how
far their losses are from the single device's, step by step.

    .venv/bin/python benchmarks/distributed.py                   # 20 steps, tile 188, batch 2
    .venv/bin/python benchmarks/distributed.py --steps 40 --tile 316

Each set-up runs in fresh processes (logical devices and collectives must be configured before
TensorFlow starts) through unetcell's own `Trainer.distributed_train_step` and input pipeline.
The first steps (tracing, the workers' first collectives) are left out of the rate; the rate is
the wall time of the remaining steps, input included. Two workers on the same CPU cores cannot
be faster than one: the figure is the overhead of distribution on one machine, and the losses
show that the strategies compute the same training (the first step's loss differs by summation
order only; Adam then carries such round-off differences forward).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

WARMUP = 2


def child(kind: str, data: str, out: str, args) -> None:
    import tensorflow as tf

    if kind == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from unetcell.config import Config
    from unetcell.data import discover_pairs, load_examples
    from unetcell.distribute import make_strategy
    from unetcell.train import Trainer, _distributed_training_dataset, seed_everything

    if kind == "mirrored":
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    elif kind == "multi-worker":
        strategy = make_strategy("multi-worker")
    else:
        strategy = make_strategy("default")
    replicas = strategy.num_replicas_in_sync
    config = (
        Config()
        .override("model", filters=args.filters, depth=args.depth, dropout=0.0)
        .override("train", tile=args.tile, batch_size=args.global_batch // replicas, seed=1)
    )
    seed_everything(config)
    examples, _ = load_examples(discover_pairs(data), config)
    trainer = Trainer(config, strategy)
    batches = iter(_distributed_training_dataset(strategy, examples, config, None, start=0))
    losses, times = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(float(trainer.distributed_train_step(next(batches))))
        times.append(time.perf_counter() - start)
    Path(out).write_text(json.dumps({
        "losses": losses, "steps_per_s": (args.steps - WARMUP) / sum(times[WARMUP:]),
        "replicas": replicas,
    }))


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run(kind: str, data: Path, work: Path, args) -> dict:
    common = ["--filters", str(args.filters), "--depth", str(args.depth), "--tile", str(args.tile),
              "--steps", str(args.steps), "--global-batch", str(args.global_batch)]
    processes = 2 if kind == "multi-worker" else 1
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(processes)]}
    started = []
    for i in range(processes):
        env = dict(os.environ)
        if kind == "multi-worker":
            env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        out = work / f"{kind}{i}.json"
        started.append((out, subprocess.Popen(
            [sys.executable, __file__, "--child", kind, str(data), str(out), *common], env=env)))
    results = []
    for out, process in started:
        if process.wait() != 0:
            raise SystemExit(f"{kind} worker failed")
        results.append(json.loads(out.read_text()))
    if len(results) == 2:
        assert results[0]["losses"] == results[1]["losses"], "workers disagree on the loss"
    return results[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tile", type=int, default=188)
    parser.add_argument("--filters", type=int, default=8)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=2)
    parser.add_argument("--child", nargs=3, metavar=("KIND", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args)
        return
    from unetcell.synth import write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_dataset(work / "data", count=4, shape=(256, 256), seed=1)
        print(f"U-Net filters {args.filters} depth {args.depth}, tile {args.tile}, global batch "
              f"{args.global_batch}, {args.steps} steps ({WARMUP} warm-up steps not timed), "
              f"{os.cpu_count()} CPU cores")
        one = run("default", work / "data", work, args)
        for kind, label in [("default", "one process, one device"),
                            ("multi-worker", "two workers on localhost (MultiWorkerMirrored)"),
                            ("mirrored", "MirroredStrategy, two logical CPU devices")]:
            result = one if kind == "default" else run(kind, work / "data", work, args)
            a, b = result["losses"], one["losses"]
            relative = [abs(x - y) / abs(y) for x, y in zip(a, b)]
            print(f"{label:48s} {result['replicas']} replica(s) {result['steps_per_s']:6.2f} steps/s  "
                  f"ratio {result['steps_per_s'] / one['steps_per_s']:5.2f}  relative loss difference: "
                  f"first step {relative[0]:.1e}, largest {max(relative):.1e}")


if __name__ == "__main__":
    main()
