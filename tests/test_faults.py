"""Bad input ends in one ``error:`` line, an exit code and nothing written (issue #31's third fault round).

Each fault is run through the command line in this process (``_cli``: ``vdm.main``'s own parsing and
``main``, as ``python -m vdm.main`` runs them): every name a config gives is checked by its registry before any
piece is asked about its options; a stray argument; a seed jax.random.key would wrap; a workdir that cannot be
written; a second stage without its first stage's checkpoint; NaN bits/dim; a save that never finished.
"""
from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest
from absl import flags
from conftest import load_config, parse_command_line

from vdm import compilation, configlib, main, resume, train
from vdm.configlib import validation


def _cli(argv: list[str], capsys, monkeypatch) -> tuple[int, list[str]]:
    """(exit code, stderr's lines) of ``python -m vdm.main ARGV``, run in this process."""
    monkeypatch.setattr(main, "quiet_logs", lambda: None)  # the process's logging is the test runner's
    full = ["vdm.main", *argv]
    fv = flags.FlagValues()
    main.define_flags(fv, full)
    capsys.readouterr()
    try:
        code = main.main(main.parse_or_exit(full, fv), fv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Workdirs of configs/test.py holding one checkpoint (step 0, untrained: nothing but the initialiser is
    compiled): ``plain``, and ``nan`` with NaN EMA parameters; and ``images``, an .npz of 5 of its digits."""
    out = {}
    for name in ("plain", "nan"):
        workdir = str(tmp_path_factory.mktemp(name) / "run")
        trainer = train.Trainer(load_config("test"), workdir, exclusive=True)
        if name == "nan":
            trainer.state = trainer.state.replace(ema_params=jax.tree.map(lambda x: x * np.nan,
                                                                          trainer.state.ema_params))
        trainer.save()
        trainer.close()
        out[name] = workdir
    from sklearn.datasets import load_digits

    out["images"] = str(tmp_path_factory.mktemp("images") / "digits.npz")
    np.savez(out["images"], images=load_digits().images[:5, :, :, None].astype(np.uint8))
    return out


def _copy(workdir: str, tmp_path) -> str:
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    return copy


def _no_compiling(monkeypatch):
    def compiled(*args, **kwargs):
        raise AssertionError("compiled before the input was checked")
    monkeypatch.setattr(compilation, "compile_run", compiled)


# -- 1. every name a config gives is checked by its registry first -------------------------------------------


@pytest.mark.parametrize("config,field,mode", [
    ("mnist_diffenc", "model.mean_encoder", "train"),
    ("mnist_mulan", "model.latent_encoder", "train"),
    ("mnist", "model.latent_encoder", "train"),  # a config without a latent
    ("mnist", "model.latent_encoder", "score"),
    ("mnist_diffenc", "model.mean_encoder", "eval"),
])
def test_an_unknown_piece_name_is_one_line_in_every_mode(config, field, mode, tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "run"
    code, err = _cli(["--config", config, "--workdir", str(workdir), f"--config.{field}=bogus", "--mode", mode]
                     + (["--images", "x.npz"] if mode == "score" else []), capsys, monkeypatch)
    table = {"model.mean_encoder": "unet, multires_unet, mlp", "model.latent_encoder": "mlp"}[field]
    assert (code, err) == (2, [f"error: config.{field}='bogus': valid names: {table}"])
    assert not workdir.exists()


def test_every_name_is_looked_up_before_any_piece_is_asked_about_its_options():
    """Generic over ``PIECES`` and ``NAMED``: an unknown name, even with keyword arguments its piece could not
    be asked about, is the name's error, listing the registry's names."""
    fields = [(p.name_field, p.kwargs_field, p.table) for p in configlib.PIECES]
    fields += [(field, None, table) for field, table, _ in validation.NAMED]
    assert {f for f, _, _ in fields} >= {"model.schedule", "model.network", "model.mean_encoder",
                                         "model.latent_encoder", "loss.weighting", "data.source", "sample.sampler",
                                         "model.prediction", "eval.method", "train.lr_schedule"}
    for field, kwargs_field, table in fields:
        overrides = {field: "bogus"} | ({f"{kwargs_field}.nonsense": 1} if kwargs_field else {})
        config, _ = configlib.override(load_config("test"), overrides)
        with pytest.raises(configlib.ConfigError) as info:
            configlib.validate(config)
        assert str(info.value) == f"config.{field}='bogus': valid names: {', '.join(table)}"
    configlib.validate(load_config("test"))  # mean_encoder "" and importance_sampling "": none, no lookup


# -- 2. an argument that is not a flag ----------------------------------------------------------------------------


@pytest.mark.parametrize("extra,mode,message", [
    (["extra"], "train", "unexpected argument 'extra': the command takes flags only (--help lists them)"),
    (["a", "b"], "eval", "unexpected arguments 'a', 'b': the command takes flags only (--help lists them)"),
    (["file.npz"], "score", "unexpected argument 'file.npz': give the images to score with --images "
                            "(--images file.npz)"),
])
def test_a_stray_argument_is_one_line(extra, mode, message, tmp_path, capsys, monkeypatch):
    argv = ["--config", "test", "--workdir", str(tmp_path / "run"), "--mode", mode, *extra]
    with pytest.raises(main.CommandLineError, match=f"^{message.replace('(', '[(]').replace(')', '[)]')}$"):
        parse_command_line(argv)
    assert _cli(argv, capsys, monkeypatch) == (2, [f"error: {message}"])
    assert not (tmp_path / "run").exists()


# -- 3. the seed ---------------------------------------------------------------------------------------------------


def test_a_seed_jax_would_wrap_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    for seed in (-1, 2**32):
        code, err = _cli(["--config", "test", "--workdir", str(tmp_path / "run"), f"--config.seed={seed}"], capsys,
                         monkeypatch)
        assert (code, err) == (2, [f"error: config.seed={seed}: must be in [0, 2**32): jax.random.key takes a 32-bit "
                                   "seed (it would wrap this one onto another)"])
        assert not (tmp_path / "run").exists()
    config, _ = configlib.override(load_config("test"), {"seed": 2**32 - 1})
    configlib.validate(config)


# -- 4. a workdir that cannot be written ------------------------------------------------------------------------


def test_scoring_into_a_workdir_that_cannot_be_written_is_one_line_before_compiling(runs, tmp_path, capsys,
                                                                                    monkeypatch):
    """The check a training run's lock makes (``<workdir>/lock`` opened for appending), here failing because the
    lock is a folder (a read-only file system fails it the same way: "Read-only file system")."""
    workdir = _copy(runs["plain"], tmp_path)
    os.remove(os.path.join(workdir, "lock"))
    os.mkdir(os.path.join(workdir, "lock"))
    before = sorted(os.listdir(workdir))
    _no_compiling(monkeypatch)
    code, err = _cli(["--config", "test", "--workdir", workdir, "--mode", "score", "--images", runs["images"]], capsys,
                     monkeypatch)
    assert (code, err) == (2, [f"error: cannot write to the workdir {workdir}: Is a directory"])
    assert sorted(os.listdir(workdir)) == before


# -- 5. a second stage without its first ------------------------------------------------------------------------


def test_a_second_stage_without_its_first_stages_checkpoint_is_refused(runs, tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "run"
    code, err = _cli(["--config", "mnist_idode_finetune", "--workdir", str(workdir)], capsys, monkeypatch)
    assert (code, err) == (2, [f"error: no checkpoint in {workdir}/checkpoints: this config continues a run of "
                               "mnist_idode (train.continues), and without one it would start from scratch; train "
                               "mnist_idode in this workdir first, or copy its workdir here"])
    assert not workdir.exists()
    # With a checkpoint there (whose model check_compatible then compares), and for a config continuing nothing:
    resume.check_required(load_config("mnist_idode_finetune"), os.path.join(runs["plain"], "checkpoints"))
    resume.check_required(load_config("mnist_idode"), str(workdir / "checkpoints"))


# -- 6. NaN bits/dim ------------------------------------------------------------------------------------------------


def test_scoring_a_nan_checkpoint_exits_3_and_writes_no_csv(runs, tmp_path, capsys, monkeypatch):
    workdir = _copy(runs["nan"], tmp_path)
    before = sorted(os.listdir(workdir))
    code, err = _cli(["--config", "test", "--workdir", workdir, "--mode", "score", "--images", runs["images"],
                      "--config.eval.score_draws=4"], capsys, monkeypatch)
    assert code == 3 and err[-1] == ("error: non-finite bits/dim at step 0 (mean_bpd=nan; 5 of 5 images): the "
                                     "parameters give no finite bound (nothing was written)"), err
    assert [line for line in err if line.startswith("error")] == err[-1:]
    assert sorted(os.listdir(workdir)) == before


# -- 7. a save that never finished ------------------------------------------------------------------------------


def test_a_save_that_never_finished_is_removed_by_the_next_training_run_and_left_by_readers(runs, tmp_path):
    """A second Ctrl-C during a save leaves ``<step>.orbax-checkpoint-tmp`` (made here as Orbax names it; a
    process killed during an asynchronous save leaves the same). Eval, sample and score only read: they leave
    it (a save in progress looks the same). Training holds the workdir's lock: it removes it, with a note."""
    workdir = _copy(runs["plain"], tmp_path)
    unfinished = os.path.join(workdir, "checkpoints", "2.orbax-checkpoint-tmp")
    os.makedirs(os.path.join(unfinished, "default"))
    config = load_config("test")
    reader = train.restored_trainer(config, workdir)
    reader.close()
    assert os.path.isdir(unfinished) and reader.restore_notes == []
    trainer = train.Trainer(config, workdir, exclusive=True)
    try:
        assert trainer.restore_latest() == 0
        assert trainer.restore_notes == [f"removed {unfinished}: a save that never finished (its process was "
                                         "stopped during the save)"]
    finally:
        trainer.close()
    assert not os.path.exists(unfinished) and trainer.checkpointer.all_steps() == [0]
