"""A Mask R-CNN (tf-models-official 2.20, official/vision) trained from scratch for a fixed
wall-clock budget on one DSB 2018 nuclei image, then run on another; writes the instance label
TIFF that `unetcell evaluate --predictions` scores. Runs in its own environment (README.md).

    python train.py DATA train-a.tfrecord 212b858a pred-a 1080     # train, predict
    python train.py DATA train-a.tfrecord 212b858a pred-a 0 --predict-only

Settings were chosen once for nuclei of 5-50 px, before training, and not tuned on the test
images: ResNet-18 + FPN (levels 2-6, 128 filters), anchors of 3 x 2**level px at two scales
and three aspect ratios, slim 128-filter heads, 28 x 28 masks, batch 2, Adam (2e-4 for 30
steps, then 1e-3), gradient norm clipped at 10; the library's parser flips and rescales
(0.5-2.0) each example.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras
import tifffile
from official.core import exp_factory
from official.vision.configs import maskrcnn  # noqa: F401  (registers the experiment configs)
from official.vision.ops import preprocess_ops
from official.vision.tasks import maskrcnn as maskrcnn_task
from prepare import load_image

SCORE = 0.5  # detections kept, and the mask probability that is inside


def experiment(train_records: str):
    config = exp_factory.get_exp_config("maskrcnn_resnetfpn_coco")
    config.override({
        "runtime": {"mixed_precision_dtype": "float32", "enable_xla": False},
        "task": {
            "init_checkpoint": None,  # nothing can be downloaded: from scratch
            "annotation_file": None,
            "use_coco_metrics": False,
            "losses": {"l2_weight_decay": 0.0},
            "model": {
                "num_classes": 2,
                "input_size": [512, 512, 3],
                "min_level": 2, "max_level": 6,
                "anchor": {"num_scales": 2, "anchor_size": 3.0, "aspect_ratios": [0.5, 1.0, 2.0]},
                "backbone": {"type": "resnet", "resnet": {"model_id": 18}},
                "decoder": {"type": "fpn", "fpn": {"num_filters": 128}},
                "rpn_head": {"num_filters": 128},
                "detection_head": {"num_filters": 128, "num_convs": 2, "fc_dims": 512},
                "mask_head": {"num_filters": 128, "num_convs": 4},
                "roi_generator": {"num_proposals": 500, "test_num_proposals": 1000},
                "roi_sampler": {"num_sampled_rois": 256},
                "mask_sampler": {"num_sampled_masks": 64},
                "detection_generator": {"max_num_detections": 200},
                "norm_activation": {"use_sync_bn": False, "norm_momentum": 0.9},
            },
            "train_data": {
                "input_path": train_records, "global_batch_size": 2, "dtype": "float32",
                "shuffle_buffer_size": 200,
                "parser": {"aug_rand_hflip": True, "aug_rand_vflip": True,
                           "aug_scale_min": 0.5, "aug_scale_max": 2.0, "max_num_instances": 128},
            },
        },
    }, is_strict=False)
    return config


def forward(model, images, labels, training=True):
    return model(images, image_shape=labels["image_info"][:, 1, :], anchor_boxes=labels["anchor_boxes"],
                 gt_boxes=labels["gt_boxes"], gt_classes=labels["gt_classes"], gt_masks=labels["gt_masks"],
                 training=training)


def train(task, model, batches, budget: float) -> list[dict]:
    """Steps until the next would pass `budget` seconds; the per-step losses and times."""
    optimizer = tf_keras.optimizers.Adam(
        learning_rate=tf_keras.optimizers.schedules.PiecewiseConstantDecay([30], [2e-4, 1e-3]),
        global_clipnorm=10.0)

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            outputs = forward(model, images, labels)
            losses = task.build_losses(outputs=outputs, labels=labels, aux_losses=model.losses)
        gradients = tape.gradient(losses["total_loss"], model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return losses

    log, start = [], time.time()
    while True:
        images, labels = next(batches)
        began = time.time()
        losses = {k: float(v) for k, v in step(images, labels).items()}
        seconds = time.time() - began
        log.append(dict(step=len(log) + 1, seconds=seconds, **losses))
        if len(log) <= 5 or len(log) % 10 == 0:
            print(f"step {len(log)} {time.time() - start:.0f} s: total loss {losses['total_loss']:.3f}", flush=True)
        if time.time() - start + seconds > budget:
            return log


def labels_of(outputs, height: int, width: int) -> np.ndarray:
    """Each detection scoring >= SCORE as an instance: its 28 x 28 mask resized to its box and
    pasted, higher scores first, so they win where masks overlap."""
    count = int(outputs["num_detections"][0])
    boxes = outputs["detection_boxes"][0, :count].numpy()
    scores = outputs["detection_scores"][0, :count].numpy()
    masks = outputs["detection_masks"][0, :count].numpy()
    labels = np.zeros((height, width), np.int32)
    count = 0
    for i in np.argsort(-scores):
        y0, x0, y1, x1 = boxes[i]
        if scores[i] < SCORE or min(y1, height) <= max(y0, 0) or min(x1, width) <= max(x0, 0):
            continue
        size = (max(round(y1 - y0), 1), max(round(x1 - x0), 1))
        mask = tf.image.resize(masks[i][..., None], size)[..., 0].numpy() > SCORE
        oy, ox = round(y0), round(x0)
        ys, xs = slice(max(oy, 0), min(oy + size[0], height)), slice(max(ox, 0), min(ox + size[1], width))
        box = labels[ys, xs]  # a view: only the box is read and written
        inside = mask[ys.start - oy:ys.stop - oy, xs.start - ox:xs.stop - ox] & (box == 0)
        if inside.any():
            count += 1
            box[inside] = count
    return labels


def main(argv: list[str]) -> None:
    data, records, test_id, out, budget = Path(argv[0]), argv[1], argv[2], Path(argv[3]), float(argv[4])
    predict_only = "--predict-only" in argv
    out.mkdir(parents=True, exist_ok=True)
    tf.random.set_seed(0)
    config = experiment(records)
    task = maskrcnn_task.MaskRCNNTask(config.task)
    model = task.build_model()
    batches = iter(task.build_inputs(config.task.train_data))
    forward(model, *next(batches))  # builds the weights
    summary = {"params": model.count_params(), "backbone_params": model.backbone.count_params()}
    print(json.dumps(summary), flush=True)
    weights = out / "weights.h5"
    log = []
    if predict_only:
        model.load_weights(weights)
    else:
        log = train(task, model, batches, budget)
        model.save_weights(weights)
        steady = [r["seconds"] for r in log[1:]]  # the first step traces the graph
        summary.update(steps=len(log), train_seconds=sum(r["seconds"] for r in log), first_step=log[0]["seconds"],
                       median_step=float(np.median(steady)) if steady else None)

    image, folder = load_image(data, test_id)
    height, width = image.shape
    padded = (-(-height // 64) * 64, -(-width // 64) * 64)
    pixels = preprocess_ops.normalize_image(tf.convert_to_tensor(np.repeat(image[..., None], 3, -1)))
    pixels = tf.image.pad_to_bounding_box(pixels, 0, 0, *padded)[None]
    # The library's model has a fixed input size: the same network built at the padded test
    # image's size, with the trained weights.
    config.task.model.input_size = [*padded, 3]
    whole = maskrcnn_task.MaskRCNNTask(config.task).build_model()
    shape = tf.constant([[height, width]], tf.float32)
    whole(pixels, image_shape=shape, training=False)
    whole.set_weights(model.get_weights())
    began = time.time()
    labels = labels_of(whole(pixels, image_shape=shape, training=False), height, width)
    summary.update(predict_seconds=time.time() - began, instances=int(labels.max()))
    tifffile.imwrite(out / f"{folder.name[:8]}.tif", labels)
    print(json.dumps(summary), flush=True)
    (out / "trainlog.json").write_text(json.dumps({"summary": summary, "log": log}))


if __name__ == "__main__":
    main(sys.argv[1:])
