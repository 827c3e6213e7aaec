"""Command line: ``python -m vdm.main --config configs/<name>.py --workdir DIR [--mode train|eval|sample]``.

The only file with flags. Config fields are overridden with ``--config.train.num_steps=500``
and the like; the config is locked, so a misspelt field is an error. Bad input (config
values, data files, checkpoints) is reported as one line, before anything is compiled.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples; a rerun resumes.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to do.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    from vdm import checkpoint, configlib, data, train  # after flag parsing: keep --help fast

    modes = {"train": train.train_and_evaluate, "eval": train.evaluate_checkpoint, "sample": train.sample_checkpoint}
    try:
        result = modes[_MODE.value](_CONFIG.value, _WORKDIR.value)
    except (configlib.ConfigError, data.DataError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)  # bad input: one line, no traceback
        return 2
    if "bpd" in result:
        print(f"test bits/dim: {result['bpd']:.4f} (prior {result['bpd_prior']:.4f}, reconstruction "
              f"{result['bpd_reconstruction']:.4f}, diffusion {result['bpd_diffusion']:.4f}; "
              f"{int(result['count'])} images, step {result['step']})")
    if "samples" in result:
        print(f"samples: {result['samples']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
