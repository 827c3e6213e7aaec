"""How often an independent classifier recognises the requested class in a conditional model's samples.

    python scripts/class_accuracy.py --config configs/mnist_cond.py --workdir workdirs/mnist_cond \
        --guidance 0 1 3 --num_images 500

Loads the latest checkpoint in the workdir, fits a logistic regression on the training split
of the config's data (pixels scaled to [0, 1]), reports its accuracy on the test split (how
far to trust the judge), then draws ``num_images`` samples spread evenly over the classes for
each guidance weight and prints the fraction the classifier assigns to the requested class.
Chance is 1 / num_classes.
"""
from __future__ import annotations

import argparse
import json

import jax
import numpy as np
from flax import nnx
from sklearn.linear_model import LogisticRegression

from vdm import configlib, data, train
from vdm import model as model_lib


def pixels(source) -> tuple[np.ndarray, np.ndarray]:
    records = data.read_rows(source, np.arange(len(source)))
    return records["image"].reshape(len(source), -1) / (source.vocab_size - 1), records["label"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--guidance", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    parser.add_argument("--num_images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    config = configlib.load_file(args.config)
    trainer = train.Trainer(config, args.workdir)
    step = trainer.restore_latest()
    x, y = pixels(trainer.dataset.train)
    classifier = LogisticRegression(max_iter=3000).fit(x, y)
    judge = classifier.score(*pixels(trainer.dataset.test))
    labels = model_lib.spread_labels(args.num_images, config.model.num_classes)
    result = {"step": step, "classifier_test_accuracy": round(judge, 4), "chance": 1 / config.model.num_classes}
    for w in args.guidance:
        fn = jax.jit(lambda p, r, w=w: model_lib.generate(nnx.merge(trainer.graphdef, p), r, args.num_images,
                                                          num_steps=config.sample.num_steps, labels=labels,
                                                          guidance=w))
        images = np.asarray(fn(trainer.state.ema_params, jax.random.PRNGKey(args.seed)))
        predicted = classifier.predict(images.reshape(args.num_images, -1) / (trainer.dataset.info.vocab_size - 1))
        result[f"accuracy_guidance_{w:g}"] = round(float(np.mean(predicted == np.asarray(labels))), 4)
    trainer.checkpointer.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
