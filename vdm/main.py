"""Command line: ``python -m vdm.main --config configs/<name>.py --workdir DIR [--mode train|eval|sample]``.

The only file with flags. Any config field is overridden with ``--config.train.num_steps=500``
and the like, the pieces' keyword arguments too (``--config.loss.weighting_kwargs.bias=1.0``,
``--config.data.kwargs.data_dir=...``). The config is locked, so a misspelt field is an error;
choosing another piece by name drops the file's keyword arguments that it does not take, and
says so. Bad input (config values, data files, checkpoints, an unreachable coordinator) is
reported as one line, before anything is compiled.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("train", "eval", "sample")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, argv: list[str] | None = None):
    """The command's flags on ``flag_values``: (config, workdir, mode) holders.

    ``argv`` is the command line the config overrides are read from (default ``sys.argv``).
    """
    # The config file locks itself (configlib.lock): a misspelt field is an error, while the
    # pieces' keyword arguments (model.schedule_kwargs, ..., data.kwargs) take new keys.
    config = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                             flag_values=flag_values, lock_config=False,
                                             accept_new_attributes=True, sys_argv=argv)
    workdir = flags.DEFINE_string("workdir", None, "Directory or URL (gs://...) for checkpoints, metrics and "
                                  "samples; a rerun resumes.", flag_values=flag_values)
    mode = flags.DEFINE_enum("mode", "train", list(MODES), "What to do.", flag_values=flag_values)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)
    return config, workdir, mode


_CONFIG, _WORKDIR, _MODE = define_flags()


def resolve(flag_values: flags.FlagValues = flags.FLAGS):
    """(config, workdir, mode, notes) from parsed flags: stale piece arguments dropped, each with a note."""
    from vdm import configlib

    config = flag_values["config"].value
    overridden = set(config_flags.get_override_values(flag_values["config"]))
    notes = configlib.drop_stale_kwargs(config, overridden)
    return config, flag_values["workdir"].value, flag_values["mode"].value, notes


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    from vdm import checkpoint, configlib, data, parallel, train  # after flag parsing: keep --help fast

    modes = {"train": train.train_and_evaluate, "eval": train.evaluate_checkpoint, "sample": train.sample_checkpoint}
    config, workdir, mode, notes = resolve()
    for note in notes:
        print(note, file=sys.stderr)
    try:
        result = modes[mode](config, workdir)
    except (configlib.ConfigError, data.DataError, checkpoint.CheckpointError, parallel.DistributedError) as e:
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
