"""How often an independent classifier recognises the requested class in a conditional model's samples.

    python scripts/class_accuracy.py --config configs/mnist_cond.py --workdir workdirs/mnist_cond \
        --guidance=0,1,3 --num_images=500

Loads the latest checkpoint in the workdir, fits a logistic regression on the training split
of the config's data (pixels scaled to [0, 1]), reports its accuracy on the test split (how
far to trust the judge), then draws ``num_images`` samples spread evenly over the classes for
each guidance weight and prints the fraction the classifier assigns to the requested class.
Chance is 1 / num_classes. ``--config`` takes the same overrides as ``python -m vdm.main``.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags


def pixels(source):
    import numpy as np

    from vdm import data

    records = data.read_rows(source, np.arange(len(source)))
    return records["image"].reshape(len(source), -1) / (source.vocab_size - 1), records["label"]


def class_accuracy(config, workdir: str, guidance=(0.0, 1.0, 3.0), num_images: int = 500, seed: int = 1) -> dict:
    """{"step", "classifier_test_accuracy", "chance", "accuracy_guidance_<w>" for each w}."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from sklearn.linear_model import LogisticRegression

    from vdm import configlib, train
    from vdm import model as model_lib

    if config.model.num_classes <= 0:
        raise configlib.ConfigError(f"config.model.num_classes={config.model.num_classes}: the model is not "
                                    "class-conditional; use a *_cond config")
    trainer = train.Trainer(config, workdir, must_exist=True)
    try:
        step = trainer.restore_latest()
        if step == 0:
            raise configlib.ConfigError(f"no checkpoint in {workdir}/checkpoints: train the config first")
        x, y = pixels(trainer.dataset.train)
        classifier = LogisticRegression(max_iter=3000).fit(x, y)
        judge = classifier.score(*pixels(trainer.dataset.test))
        labels = model_lib.spread_labels(num_images, config.model.num_classes)
        result = {"step": step, "classifier_test_accuracy": round(judge, 4), "chance": 1 / config.model.num_classes}

        def sample(params, rng, w):
            return model_lib.generate(nnx.merge(trainer.graphdef, params), rng, num_images,
                                      num_steps=config.sample.steps, labels=labels, guidance=w,
                                      sampler=config.sample.sampler,
                                      sampler_kwargs=config.sample.sampler_kwargs.to_dict()).images

        # w = 0 needs no unconditional half; every w > 0 shares one compiled sampler (w an argument).
        plain, guided = jax.jit(lambda p, r: sample(p, r, 0.0)), jax.jit(sample)
        key = jax.random.PRNGKey(seed)  # the same noise for every weight
        for w in guidance:
            images = np.asarray(plain(trainer.state.ema_params, key) if w == 0 else
                                guided(trainer.state.ema_params, key, jnp.float32(w)))
            predicted = classifier.predict(images.reshape(num_images, -1) / (trainer.dataset.info.vocab_size - 1))
            result[f"accuracy_guidance_{w:g}"] = round(float(np.mean(predicted == np.asarray(labels))), 4)
    finally:
        trainer.close()
    return result


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, argv: list[str] | None = None) -> None:
    from vdm import main as cli

    cli.define_flags(flag_values, argv, mode=False)
    flags.DEFINE_list("guidance", ["0", "1", "3"], "Guidance weights w, comma-separated.", flag_values=flag_values)
    flags.DEFINE_integer("num_images", 500, "Samples per guidance weight.", flag_values=flag_values)
    flags.DEFINE_integer("seed", 1, "Sampling seed.", flag_values=flag_values)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> int:
    from vdm import main as cli

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.quiet_logs()
    try:
        config, workdir, _, notes = cli.resolve(flag_values)
        for note in notes:
            print(note, file=sys.stderr)
        guidance = [float(w) for w in flag_values["guidance"].value]
        print(json.dumps(class_accuracy(config, workdir, guidance, flag_values["num_images"].value,
                                        flag_values["seed"].value)))
    except (ValueError, *cli.input_errors()) as e:  # ValueError: a --guidance that is not a number
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    define_flags()
    from vdm import main as cli

    app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_or_exit)
