"""Renamed config fields (``vdm.configlib.RENAMED``): each old name still sets its new field for one release, from
the command line, a config file and ``override``, with exactly one warning line; both names set to different values
is an error; a workdir written before the rename resumes and evaluates bitwise as one written after it; and no
shipped file uses an old name."""
import glob
import json
import os
import re
import shutil

import pytest
from conftest import ROOT, parse_command_line

from vdm import compilation, configlib, configs, train

CASES = [(old, new, value) for (old, new), value in zip(configlib.RENAMED.items(), (10, 7, 3))]


def _warning(old: str) -> str:
    return (f"warning: config.{old} is deprecated: use config.{configlib.RENAMED[old]} "
            "(the old name goes in the next release)")


def _value(config, dotted: str):
    return configlib.field_value(config, dotted)


def _has(config, dotted: str) -> bool:
    """Whether the field ``dotted`` holds a value (an old name, once resolved, stays unset)."""
    return configlib.field_value(config, dotted) is not None


def test_the_table_names_fields_of_the_schema_and_each_old_name_is_an_unset_field_of_the_new_ones_type():
    base = configlib.base_config()
    assert set(configlib.RENAMED) == {"loss.num_steps", "eval.num_steps", "sample.num_steps"}
    assert dict(configlib.RENAMED) == {"loss.num_steps": "loss.timesteps", "eval.num_steps": "eval.timesteps",
                                       "sample.num_steps": "sample.steps"}
    for old, new in configlib.RENAMED.items():
        assert _value(base, old) is None and isinstance(_value(base, new), int)
    assert (base.loss.timesteps, base.eval.timesteps, base.sample.steps, base.train.num_steps) == (0, 0, 256, 10_000)


@pytest.mark.parametrize("old,new,value", CASES)
def test_an_old_name_on_the_command_line_sets_the_new_field_with_one_warning(tmp_path, old, new, value):
    config, _, _, notes = parse_command_line(["--config", "test", "--workdir", str(tmp_path), f"--config.{old}={value}"])
    assert _value(config, new) == value and not _has(config, old)
    assert notes == [_warning(old)]
    configlib.validate(config)
    # Resolving the resolved config again (as train_and_evaluate does) says nothing twice and changes nothing.
    again, more = configlib.override(config, {})
    assert more == [] and _value(again, new) == value


@pytest.mark.parametrize("old,new,value", CASES)
def test_an_old_name_in_a_config_file_sets_the_new_field_with_one_warning(tmp_path, capsys, old, new, value):
    path = tmp_path / "mine.py"
    path.write_text(f"from vdm import configs\n\n\ndef get_config():\n    c = configs.get('test')\n"
                    f"    c.{old} = {value}\n    return c\n")
    config, _, _, notes = parse_command_line(["--config", str(path), "--workdir", str(tmp_path)])
    assert _value(config, new) == value and not _has(config, old) and notes == [_warning(old)]
    # The same file given to the Python API: one warning line on stderr.
    resolved = train.resolve_config(str(path))
    assert _value(resolved, new) == value and not _has(resolved, old)
    assert capsys.readouterr().err.splitlines() == [_warning(old)]
    # A later layer (the command line) setting the new name wins over the file's old name.
    config, _, _, notes = parse_command_line(["--config", str(path), "--workdir", str(tmp_path),
                                              f"--config.{new}={value + 1}"])
    assert _value(config, new) == value + 1 and notes == [_warning(old)]


@pytest.mark.parametrize("old,new,value", CASES)
def test_an_old_name_in_override_sets_the_new_field_with_one_warning(capsys, old, new, value):
    config, notes = configlib.override(configs.get("test"), {old: value})
    assert _value(config, new) == value and not _has(config, old) and notes == [_warning(old)]
    resolved = train.resolve_config("test", {old: value})
    assert _value(resolved, new) == value and capsys.readouterr().err.splitlines() == [_warning(old)]
    # Both names with the same value: no conflict, one warning.
    config, notes = configlib.override(configs.get("test"), {old: value, new: value})
    assert _value(config, new) == value and notes == [_warning(old)]


@pytest.mark.parametrize("old,new,value", CASES)
def test_both_names_set_differently_is_one_error_naming_both(tmp_path, old, new, value):
    expected = (f"config.{old}={value} and config.{new}={value + 1} are both set: config.{old} is the deprecated "
                f"name of config.{new}; set only the new one")
    with pytest.raises(configlib.ConfigError) as e:
        configlib.override(configs.get("test"), {old: value, new: value + 1})
    assert str(e.value) == expected
    with pytest.raises(configlib.ConfigError) as e:
        parse_command_line(["--config", "test", "--workdir", str(tmp_path), f"--config.{old}={value}",
                            f"--config.{new}={value + 1}"])
    assert str(e.value) == expected


def test_an_old_name_set_on_a_config_never_resolved_is_refused_not_ignored():
    config = configs.get("test")
    config.loss.num_steps = 10
    with pytest.raises(configlib.ConfigError, match=r"^config\.loss\.num_steps=10: the deprecated name of "
                                                    r"config\.loss\.timesteps"):
        configlib.validate(config)


def test_a_stored_config_with_the_old_names_reads_as_one_with_the_new():
    stored = {"loss": {"num_steps": 10, "weighting": "elbo"}, "eval": {"num_steps": 10}, "sample": {"num_steps": 2},
              "model": {"network": "mlp"}}
    assert configlib.upgrade_stored(stored) == {"loss": {"timesteps": 10, "weighting": "elbo"},
                                                "eval": {"timesteps": 10}, "sample": {"steps": 2},
                                                "model": {"network": "mlp"}}
    assert stored["loss"] == {"num_steps": 10, "weighting": "elbo"}  # the argument is not changed
    new = {"loss": {"timesteps": 5}, "sample": {"steps": 2, "num_steps": None}}
    assert configlib.upgrade_stored(new) == {"loss": {"timesteps": 5}, "sample": {"steps": 2}}


def _rename_back(tree):
    """A stored config (nested dicts) with the new names of RENAMED turned back into the old ones."""
    tree = json.loads(json.dumps(tree))
    for old, new in configlib.RENAMED.items():
        (section, name), (new_section, new_name) = old.split("."), new.split(".")
        tree[section][name] = tree[new_section].pop(new_name)
    return tree


def _as_before_the_rename(workdir: str) -> None:
    """Make ``workdir`` (a run of this release) what the release before the rename wrote: its config.json and
    every checkpoint's stored config name the fields by their old names."""
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        stored = json.load(f)
    with open(path, "w") as f:
        json.dump(_rename_back(stored), f, indent=2, sort_keys=True)
    found = 0
    for meta_path in glob.glob(os.path.join(workdir, "checkpoints", "*", "_CHECKPOINT_METADATA")):
        with open(meta_path) as f:
            meta = json.load(f)
        meta["custom_metadata"]["config"] = _rename_back(meta["custom_metadata"]["config"])
        with open(meta_path, "w") as f:
            json.dump(meta, f)
        found += 1
    assert found, os.listdir(os.path.join(workdir, "checkpoints"))


def _figures(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "samples"}  # the samples' path names the workdir


def test_a_workdir_written_before_the_rename_evaluates_and_resumes_bitwise_as_one_written_after(tmp_path):
    new = {"loss.timesteps": 10, "eval.timesteps": 10, "sample.steps": 2, "sample.num_images": 2,
           "eval.num_examples": 32}
    old = {"loss.num_steps": 10, "eval.num_steps": 10, "sample.num_steps": 2, "sample.num_images": 2,
           "eval.num_examples": 32}
    cache = compilation.CompileCache()  # both runs resolve to one config: its functions compiled once
    after, before = str(tmp_path / "after"), str(tmp_path / "before")
    train.train_and_evaluate("test", after, new | {"train.num_steps": 2}, compile_cache=cache)
    shutil.copytree(after, before)
    _as_before_the_rename(before)
    with open(os.path.join(before, "config.json")) as f:
        assert json.load(f)["loss"]["num_steps"] == 10  # the old names really are what the workdir holds

    # --mode eval, the old workdir read with the old names and the new workdir with the new: the same figures.
    evaluated = train.evaluate_checkpoint("test", before, old, compile_cache=cache)
    assert evaluated == train.evaluate_checkpoint("test", after, new, compile_cache=cache)
    assert evaluated["step"] == 2

    # A resumed training run: the same figures, the same logged losses, and config.json now in the new names.
    resumed = train.train_and_evaluate("test", before, old | {"train.num_steps": 4}, compile_cache=cache)
    assert _figures(resumed) == _figures(train.train_and_evaluate("test", after, new | {"train.num_steps": 4},
                                                                  compile_cache=cache))
    assert resumed["step"] == 4

    def losses(workdir):
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        return [(r["step"], r["loss"], r["grad_norm"], r["bpd"]) for r in rows if "loss" in r]

    assert losses(before) == losses(after) and [s for s, *_ in losses(after)] == [2, 4]
    with open(os.path.join(before, "config.json")) as f:
        stored = json.load(f)
    assert stored["loss"]["timesteps"] == 10 and stored["loss"]["num_steps"] is None and stored["sample"]["steps"] == 2


# Where the old names may still be written: the table itself, this file's tests and the change log.
_ALLOWED = {os.path.join("vdm", "configlib", "renames.py"), os.path.join("tests", "test_config_renames.py")}
_OLD = re.compile(r"(loss|eval|sample)\.num_steps")


def test_no_shipped_file_uses_an_old_name():
    found = []
    for top in ("vdm", "configs", "experiments", "notebooks", "scripts", "tests", "README.md", "ARCHITECTURE.md"):
        where = os.path.join(ROOT, top)
        files = [where] if os.path.isfile(where) else [os.path.join(d, f) for d, _, fs in os.walk(where) for f in fs]
        for path in files:
            relative = os.path.relpath(path, ROOT)
            if relative in _ALLOWED or not path.endswith((".py", ".md", ".ipynb", ".sh", ".json", ".txt")):
                continue
            with open(path, encoding="utf-8", errors="replace") as f:
                found += [f"{relative}:{i}" for i, line in enumerate(f, 1) if _OLD.search(line)]
    assert found == []
