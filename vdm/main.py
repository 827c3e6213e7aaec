"""Command line: ``python -m vdm.main --config <name> | <file.py> --workdir DIR [--mode train|eval|sample|score]``.

``--mode score --images FILE`` writes the bits/dim per image to ``DIR/scores_<step>.csv`` (``vdm.image_bpd``).

``--config`` is a config file or the name of a config shipped in ``vdm.configs`` (``mnist``;
``configs/mnist.py`` in a clone is the same file), either optionally ``:config_string``.

The command line (scripts/class_accuracy.py reuses its flags). Any config field is overridden
with ``--config.train.num_steps=500`` and the like, the pieces' keyword arguments too
(``--config.loss.weighting_kwargs.bias=1.0``, ``--config.data.kwargs.data_dir=...``). The config
is locked, so a misspelt field is an error; choosing another piece by name drops the file's
keyword arguments that it does not take, and says so. Bad input (a misspelt field, an argument
that is not a flag, a config file that is not there, config values and names, data files,
checkpoints, a workdir that cannot be written, an unreachable coordinator) is reported as one
``error:`` line with exit code 2, before anything is written or compiled. A non-finite result
(a diverged run, NaN bits/dim or samples) is one ``error:`` line with exit code 3.
"""
from __future__ import annotations

import json
import logging as std_logging
import math
import numbers
import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from vdm import configs  # light, as all this module imports: the rest of vdm (jax) only after flag parsing

MODES = ("train", "eval", "sample", "score")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, argv: list[str] | None = None, *, mode: bool = True,
                 require_workdir: bool = True):
    """The command's flags on ``flag_values``: ``--config`` (with overrides), ``--workdir``, ``--mode``.

    ``argv`` is the command line the config overrides are read from (default ``sys.argv``).
    Scripts that act on a run's workdir (``scripts/class_accuracy.py``) reuse it with ``mode=False``;
    ``vdm.bench`` with ``require_workdir=False``.
    """
    # The config file locks itself (configlib.lock): a misspelt field is an error, while the
    # pieces' keyword arguments (model.schedule_kwargs, ..., data.kwargs) take new keys.
    config_flags.DEFINE_config_file("config", None, "A config file, or the name of a shipped config "
                                    "(vdm.configs: mnist, digits, ...).", flag_values=flag_values,
                                    lock_config=False, accept_new_attributes=True, sys_argv=argv)
    flag_values["config"].parser = _ShippedConfigs(flag_values["config"].parser)
    flags.DEFINE_string("workdir", None, "Directory or URL (gs://...) for checkpoints, metrics and "
                        "samples; a rerun resumes.", flag_values=flag_values)
    if mode:
        flags.DEFINE_enum("mode", "train", list(MODES), "What to do.", flag_values=flag_values)
        flags.DEFINE_string("images", None, "--mode score: an .npz file with 'images' (uint8 [N, H, W, C]) and, for a "
                            "class-conditional model, 'labels'; or a folder of PNG files.", flag_values=flag_values)
    flags.mark_flags_as_required(["config", "workdir"] if require_workdir else ["config"], flag_values=flag_values)


class _ShippedConfigs(flags.ArgumentParser):
    """ml_collections' config file parser, taking the name of a shipped config too (``--config mnist``);
    an unknown name is a flag error naming the shipped configs."""

    def __init__(self, file_parser: flags.ArgumentParser):
        self.file_parser = file_parser

    def parse(self, spec):
        return self.file_parser.parse(configs.locate(spec))

    def flag_type(self):
        return self.file_parser.flag_type()


class CommandLineError(ValueError):
    """A command line that cannot be run; the message is one line."""


def parse(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """Parse ``argv`` into ``flag_values`` (the arguments left over), every mistake a CommandLineError.

    absl prints a flag error in two lines, and an override of a field the locked config does not
    have (``--config.train.num_step=3``) escapes it as a KeyError with the whole config section in
    its message; both become one line here. The programs take flags only: an argument left over
    (``extra``, or the image file of ``--mode score`` without its ``--images``) is a mistake too.
    """
    try:
        left = flag_values(argv)
    except KeyError as e:
        message = str(e.args[0]) if e.args else ""
        if not ('Key "' in message or "Did you mean" in message):
            raise CommandLineError(_config_file_error(e)) from None
        key = re.search(r'Key "([^"]+)"', message) or re.match(r"'([^']+)'", message)
        hint = re.search(r'Did you mean "([^"]+)"', message)
        field = re.compile(rf"\.{re.escape(key.group(1))}(\.|=|$)") if key else None
        given = [a for a in argv if field and a.startswith("--config.") and field.search(a)]
        where = given[0] if given else "--config"
        what = f'config has no field "{key.group(1)}"' if key else message.splitlines()[0]
        raise CommandLineError(f"{where}: {what}" + (f' (did you mean "{hint.group(1)}"?)' if hint else "")) from None
    except flags.Error as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if lines[0].endswith("Error whilst parsing config file:") and len(lines) > 1:  # ml_collections' traceback:
            lines[0] += " " + lines[-1]  # its last line is the reason (get_config's arguments, say)
        raise CommandLineError(lines[0]) from None
    except Exception as e:  # the config file's own code failed while it was loaded
        raise CommandLineError(_config_file_error(e)) from None
    if len(left) > 1:
        raise CommandLineError(_left_over(left[1:], flag_values))
    return left


def _left_over(arguments: list[str], flag_values: flags.FlagValues) -> str:
    """The message for arguments that are not flags: each named, and where one looks like the file that
    ``--mode score`` was to read, ``--images`` suggested."""
    named = ", ".join(repr(a) for a in arguments)
    what = f"unexpected argument{'s' * (len(arguments) > 1)} {named}"
    scoring = "mode" in flag_values and flag_values["mode"].value == "score" and "images" in flag_values
    files = [a for a in arguments if os.path.splitext(a)[1] or os.sep in a or os.path.exists(a)]
    if scoring and files and not flag_values["images"].value:
        return f"{what}: give the images to score with --images (--images {files[0]})"
    return f"{what}: the command takes flags only (--help lists them)"


def _config_file_error(e: BaseException) -> str:
    """``FILE, line N: TypeName: message`` for an exception raised by a config file's code."""
    if isinstance(e, SyntaxError):
        return f"--config={e.filename}, line {e.lineno}: SyntaxError: {e.msg}"
    here = os.path.dirname(os.path.abspath(__file__))
    shipped = os.path.join(here, "configs", "")  # the shipped config files are the config's code, not vdm's
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename.startswith(shipped)
              or not (f.filename.startswith(("<", here)) or "site-packages" in f.filename)]
    where = f"--config={frames[-1].filename}, line {frames[-1].lineno}: " if frames else "--config: "
    return where + f"{type(e).__name__}: " + " ".join(str(e).split())


def parse_or_exit(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """``parse`` for ``app.run(..., flags_parser=...)``: a mistake ends the program with one ``error:`` line."""
    try:
        return parse(argv, flag_values)
    except CommandLineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def resolve(flag_values: flags.FlagValues = flags.FLAGS):
    """(config, workdir, mode, notes) from parsed flags: stale piece arguments dropped, each with a note; a field
    set under its old name (``configlib.RENAMED``) moved to its new one, with a warning line.

    Raises CommandLineError when the config file could not be loaded (ml_collections reports
    that only when the config is first used); ConfigError when an old name and its new one are both given
    on the command line with different values.
    """
    from vdm import configlib  # after flag parsing: keep --help fast

    config = flag_values["config"].value
    try:
        config.get("model")
    except OSError as e:
        detail = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise CommandLineError(f"--config={config_flags.get_config_filename(flag_values['config'])}: cannot load it "
                               f"({detail[-1]})") from None
    overridden = set(config_flags.get_override_values(flag_values["config"]))
    notes = configlib.apply_deprecated(config, overridden)  # an old field name (configlib.RENAMED): one warning
    notes += configlib.drop_stale_kwargs(config, {configlib.RENAMED.get(k, k) for k in overridden})
    mode = flag_values["mode"].value if "mode" in flag_values else None
    images = flag_values["images"].value if "images" in flag_values else None
    if mode == "score" and not images:
        raise CommandLineError("--mode score needs --images: an .npz file of images or a folder of PNG files")
    if images and mode != "score":
        raise CommandLineError(f"--images is for --mode score, not --mode {mode}")
    return config, flag_values["workdir"].value, mode, notes


def input_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean bad input: reported as one ``error:`` line with exit code 2."""
    from vdm import checkpoint, configlib, data, inception, lock, parallel, paths, samplers  # after flag parsing

    return (CommandLineError, configlib.ConfigError, data.DataError, checkpoint.CheckpointError,
            parallel.DistributedError, lock.WorkdirError, inception.WeightsError, samplers.SolverError,
            paths.WriteError)


# A signal that comes while the program is inside one long computation ends it after this long at most
# (vdm.signals): "stops at the end of the current batch" is unbounded when a batch takes an hour.
STOP_WITHIN_S = 5.0


class _NotOrbax(std_logging.Filter):
    """Drops Orbax's log records: a failed save is logged by each of its threads, with tracebacks (317 lines
    for one full disk), and the program reports it in one line itself (``vdm.checkpoint.CheckpointError``)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet_logs() -> None:
    """absl logging at WARNING for a program of this library: JAX logs the backends it cannot start
    (TPU, proxy) and Orbax every save at INFO, lines that would stand before the program's own; and none
    of Orbax's (``_NotOrbax``)."""
    logging.set_verbosity(logging.WARNING)
    absl_logger = std_logging.getLogger("absl")
    if not any(isinstance(f, _NotOrbax) for f in absl_logger.filters):
        absl_logger.addFilter(_NotOrbax())
    # Orbax's event loops: after a failed save, "Future exception was never retrieved" for each write, and
    # TensorStore's callbacks into the closed loop print "Event loop is closed" through sys.unraisablehook.
    std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
    if not isinstance(sys.unraisablehook, _ClosedLoopsQuiet):
        sys.unraisablehook = _ClosedLoopsQuiet(sys.unraisablehook)


class _ClosedLoopsQuiet:
    """sys.unraisablehook without the "Event loop is closed" of Orbax's finished event loops; the rest as before."""

    def __init__(self, hook):
        self.hook = hook

    def __call__(self, unraisable):
        if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
            return
        self.hook(unraisable)


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> int:
    """The program, once ``parse`` has read the command line into ``flag_values``: its exit code (0; 2 for bad
    input, one ``error:`` line; 3 for a non-finite result; a signal's code when one stopped it)."""
    del argv  # parse() has refused any argument that is not a flag
    quiet_logs()
    from vdm import health, image_bpd, signals, train  # after flag parsing: keep --help fast

    images = flag_values["images"].value
    modes = {"train": train.train_and_evaluate, "eval": train.evaluate_checkpoint, "sample": train.sample_checkpoint,
             "score": lambda config, workdir, **kw: image_bpd.per_image_bpd(config, workdir, images, **kw)}
    try:
        config, workdir, mode, notes = resolve(flag_values)
        for note in notes:
            print(note, file=sys.stderr)
        result = modes[mode](config, workdir, stop_within_s=STOP_WITHIN_S)
    except input_errors() as e:
        print(f"error: {e}", file=sys.stderr)  # bad input: one line, no traceback
        return 2
    except health.NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)  # training diverged: one line, exit code 3
        return 3
    except signals.Interrupted as e:
        print(f"stopped by {e.signal_name}", file=sys.stderr)
        return e.exit_code
    return report_scores(result, config) if mode == "score" else report(result, config)


def non_finite(result: dict) -> list[str]:
    """The figures of a run's result that are NaN or infinite, as ``name=value``."""
    return [f"{k}={v}" for k, v in result.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isfinite(v)]


def report_scores(result: dict, config) -> int:
    """--mode score: the bounds' spread over the images and the CSV's path, then the figures as one JSON line.
    (Non-finite bounds never get here: ``vdm.image_bpd.check_finite`` refuses them before the CSV, exit code 3.)"""
    from vdm import image_bpd, metrics  # after flag parsing: keep --help fast

    for line in image_bpd.summary(result, config.eval.score_draws):
        print(line)
    figures = {k: result[k] for k in ("scores", "step", "count")} | {
        f"mean_{k}": float(v.mean()) for k, v in result.items() if f"{k}_se" in result}
    print(json.dumps(metrics.strict(figures), allow_nan=False))
    return 0


def report(result: dict, config) -> int:
    """Print a run's figures and its result as one JSON line; exit code 0. A NaN or infinite figure is
    no result: one ``error:`` line naming the figures, exit code 3 (as a diverged training run)."""
    from vdm import metrics  # after flag parsing: keep --help fast

    bad = non_finite(result)
    if bad:
        print(f"error: non-finite result at step {result.get('step')} ({', '.join(bad)}): the parameters or the "
              "settings give no finite figure; see metrics.jsonl for when the run went wrong", file=sys.stderr)
        return 3
    if "bpd" in result:
        print(f"test bits/dim: {result['bpd']:.4f} +- {result['bpd_se']:.4f} (VLB: prior {result['bpd_prior']:.4f}, "
              f"reconstruction {result['bpd_reconstruction']:.4f}, diffusion {result['bpd_diffusion']:.4f}; "
              f"{int(result['count'])} images, step {result['step']})")
    if "bpd_ode" in result:
        ode = config.eval.ode
        print(f"test bits/dim by the probability-flow ODE: {result['bpd_ode']:.4f} +- {result['bpd_ode_se']:.4f} "
              f"({ode.dequantization} dequantisation x {ode.num_samples}, {ode.divergence} divergence, "
              f"{result['ode_nfe']:.0f} network evaluations per batch; {int(result['count'])} images)")
    for name in [k for k in result if f"{k}_se" in result and k not in ("bpd", "bpd_ode")]:  # other methods' bounds
        print(f"test {name}: {result[name]:.4f} +- {result[f'{name}_se']:.4f} ({config.eval.method}; "
              f"{int(result['count'])} images)")
    if "samples" in result:
        print(f"samples: {result['samples']} ({result['nfe']} network evaluations, {config.sample.sampler} sampler)")
    if "fd_mnist" in result:
        print(f"FD-MNIST {result['fd_mnist']:.2f} over {result['fd_mnist_images']} samples against the test digits "
              f"(feature classifier: {result['fd_mnist_classifier_accuracy']:.1%} on the test digits)"
              + (f"; the requested digit in {result['sample_accuracy']:.1%} of the samples"
                 if "sample_accuracy" in result else ""))
    if "fid" in result:
        print(f"FID {result['fid']:.2f} over {result['fid_images']} samples against the "
              f"{result['fid_reference_images']} test images (InceptionV3 pool3, {config.eval.inception_weights})")
    print(json.dumps(metrics.strict(result), allow_nan=False))
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_or_exit)
