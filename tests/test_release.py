"""The release: its workflows run what the repository has, one distribution name is documented and installed
everywhere (the README, the notebooks, the CHANGELOG's newest release), and no user-facing file shows a
placeholder. The build itself is checked in tests/test_install.py."""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

import pytest
import yaml
from conftest import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import vdm

WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, ".github", "workflows", "*.yml")))
PYPROJECT = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
DISTRIBUTION = PYPROJECT["project"]["name"]
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
USER_FACING = (["README.md", "ARCHITECTURE.md", "CHANGELOG.md", "pyproject.toml"]
               + [os.path.relpath(p, ROOT) for p in NOTEBOOKS + WORKFLOWS]
               + [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "experiments", "**", "README.md"),
                                                              recursive=True)]
               + [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "vdm", "configs", "*.py"))])
# A placeholder: the repository's owner, or any web address with an angle-bracketed part.
PLACEHOLDER = re.compile(r"<owner>|https?://[^\s)\"'`]*<")

# Programs a workflow may call that are not the repository's: the shell's own tools.
SHELL_TOOLS = {"cd", "echo", "printf", "test", "[", "true", "false", "export", "set", "grep", "ls", "cat", "mkdir",
               "cp", "mv", "rm", "tar", "unzip", "git", "pip"}
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", "!"}
REPOSITORY_FILE = re.compile(r"^[\w./-]+\.(py|sh|md|toml|txt|cfg|json|yml|yaml|ipynb)$")  # an argument naming a file


# ---------------------------------------------------------------------------------------------- workflow checker

def load_workflow(text: str) -> dict:
    """A workflow file as a dict, with its triggers under "on" (YAML 1.1 reads the key `on` as True)."""
    doc = yaml.safe_load(text)
    if True in doc:
        doc["on"] = doc.pop(True)
    return doc


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a `run:` script, each as its argv, without leading VAR=value assignments and
    redirections."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        argv, skip = [], False
        for token in [*lexer, ";"]:
            if skip:
                skip = False
            elif token in SEPARATORS:
                if argv:
                    commands.append(argv)
                argv = []
            elif set(token) <= set("<>&"):  # a redirection (2>&1, > file): not part of the command
                skip = True
                if argv and argv[-1].isdigit():  # the 2 of 2>&1
                    argv.pop()
            elif argv or not re.match(r"^\w+=", token):
                argv.append(token)
    return commands


def make_targets() -> set[str]:
    text = open(os.path.join(ROOT, "Makefile")).read()
    targets = set()
    for match in re.finditer(r"^([^\s:=#][^:=]*?)\s*:(?!=)", text, re.M):
        targets.update(t for t in match.group(1).split() if "$" not in t)
    return targets


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _exists(path: str) -> bool:
    return os.path.exists(os.path.join(ROOT, path))


def missing(argv: list[str]) -> str | None:
    """Why the command `argv` does not exist in the repository, or None where it does."""
    program, args = argv[0], argv[1:]
    operands = [a for a in args if not a.startswith("-")]
    if program == "make":
        unknown = [t for t in operands if "=" not in t and t not in make_targets()]
        if unknown:
            return f"make: no target {unknown[0]!r} in the Makefile"
    elif re.fullmatch(r"(.*/)?python(3(\.\d+)?)?", program):
        if "-m" in args:
            module = args[args.index("-m") + 1]
            if not (_importable(module) or _exists(module.replace(".", "/") + ".py")):
                return f"python -m {module}: no such module"
        elif "-c" not in args and (not operands or not _exists(operands[0])):
            return f"python {operands[0] if operands else ''}: no such file in the repository"
    elif program in ("bash", "sh"):
        if not operands or not _exists(operands[0]):
            return f"{program} {operands[0] if operands else ''}: no such file in the repository"
    elif "/" in program:
        if not _exists(program):
            return f"{program}: no such file in the repository"
    elif program not in SHELL_TOOLS:
        return f"{program}: neither the repository's nor a shell tool"
    for arg in args:
        if REPOSITORY_FILE.match(arg) and not _exists(arg):
            return f"{' '.join(argv)}: no file {arg!r} in the repository"
    return None


def problems(workflow: dict) -> list[str]:
    """Every command of a workflow's `run:` steps that does not exist, as 'job: reason'."""
    return [f"{job}: {reason}" for job, spec in workflow["jobs"].items() for step in spec["steps"] if "run" in step
            for argv in shell_commands(step["run"]) if (reason := missing(argv))]


def workflow(name: str) -> dict:
    return load_workflow(open(os.path.join(ROOT, ".github", "workflows", name)).read())


def runs(job: dict) -> list[list[str]]:
    return [argv for step in job["steps"] if "run" in step for argv in shell_commands(step["run"])]


def uses(job: dict, action: str) -> list[dict]:
    """The steps of `job` that use `action` (owner/name, any version), as their `with:`."""
    return [step.get("with") or {} for step in job["steps"] if step.get("uses", "").split("@")[0] == action]


# ---------------------------------------------------------------------------------------------- workflows

def test_the_workflows_are_there():
    assert [os.path.basename(p) for p in WORKFLOWS] == ["release.yml", "tests.yml"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_every_command_a_workflow_runs_exists(path):
    doc = load_workflow(open(path).read())
    assert any(runs(job) for job in doc["jobs"].values()), "a workflow without commands"
    assert problems(doc) == []


@pytest.mark.parametrize("command,reason", [
    ("make no-such-target", "make: no target 'no-such-target'"),
    ("python -m vdm.no_such_module --flag", "python -m vdm.no_such_module: no such module"),
    ("python scripts/no_such_script.py", "python scripts/no_such_script.py: no such file"),
    ("make test && scripts/no_such_script.sh", "scripts/no_such_script.sh: no such file"),
    ("frobnicate --all", "frobnicate: neither the repository's nor a shell tool"),
    ("X=1 grep -q x NO_SUCH_FILE.md > out.txt", "no file 'NO_SUCH_FILE.md'"),
])
def test_the_checker_finds_a_made_up_command(command, reason):
    doc = load_workflow(f"on: push\njobs:\n  a:\n    steps:\n      - run: {command}\n")
    assert doc["on"] == "push"
    found = problems(doc)
    assert len(found) == 1 and found[0].startswith("a: ") and reason in found[0], found


def test_the_checker_passes_real_commands():
    doc = load_workflow("on: push\njobs:\n  a:\n    steps:\n      - run: |\n"
                        "          make test WORKDIR=x 2>&1 | tee log\n"
                        "          python -m vdm.main --help; python -m pip --version\n"
                        "          V=1 .ci/run && grep -q vdm-jax pyproject.toml\n")
    assert problems(doc) == ["a: tee: neither the repository's nor a shell tool"]
    assert shell_commands("a=1 make test 2>&1 | tee log # note") == [["make", "test"], ["tee", "log"]]


def test_tests_workflow_runs_the_readme_test_command_on_every_push_and_pull_request():
    doc = workflow("tests.yml")
    assert set(doc["on"]) == {"push", "pull_request"} and not any(doc["on"].values()), "every push and pull request"
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert re.search(r"^```bash\n(?:.*\n)*?make test\b", readme, re.M), "the README's test command is `make test`"
    (job,) = doc["jobs"].values()
    assert job["runs-on"].startswith("ubuntu")
    assert runs(job) == [["make", "oldest"], ["make", "test"]]
    assert job["strategy"]["matrix"]["versions"] == ["newest", "oldest"], "both ends of the declared range"
    (oldest,) = [step for step in job["steps"] if step.get("run") == "make oldest"]
    assert oldest["if"] == "matrix.versions == 'oldest'"
    assert [w.get("fetch-depth") for w in uses(job, "actions/checkout")] == [0], "setuptools-scm needs the tags"
    assert [str(w.get("python-version")) for w in uses(job, "actions/setup-python")] == ["3.12"]


def test_the_oldest_versions_ci_installs_are_the_lower_bounds_of_pyproject(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("install_oldest", os.path.join(ROOT, "scripts", "install_oldest.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        declared = {m.group(1): m.group(2) for m in re.finditer(r'"(jax|jaxlib|flax)>=([\w.]+)"', f.read())}
    assert script.lower_bounds() == [f"{name}=={declared[name]}" for name in ("jax", "jaxlib", "flax")]
    bad = tmp_path / "pyproject.toml"
    bad.write_text('[project]\ndependencies = ["jax>=0.12.0", "flax"]\n')
    with pytest.raises(ValueError, match="jaxlib needs one lower bound"):
        script.lower_bounds(str(bad))


def test_release_workflow_builds_checks_and_publishes_a_pushed_tag_by_trusted_publishing():
    doc = workflow("release.yml")
    assert doc["on"] == {"push": {"tags": ["v*"]}}
    build, publish = doc["jobs"]["build"], doc["jobs"]["publish"]
    assert [w.get("fetch-depth") for w in uses(build, "actions/checkout")] == [0]
    commands = [" ".join(argv) for argv in runs(build)]
    assert "python -m build" in commands and any(c.startswith("python -m twine check") for c in commands)
    (upload,) = uses(build, "actions/upload-artifact")
    assert "id-token" not in (build.get("permissions") or {}), "only the publishing job may mint the token"

    needs = publish["needs"]
    assert "build" in ([needs] if isinstance(needs, str) else needs)
    assert publish["permissions"] == {"id-token": "write"}
    environment = publish["environment"]
    assert (environment if isinstance(environment, str) else environment["name"]) == "pypi"
    (download,) = uses(publish, "actions/download-artifact")
    assert download["name"] == upload["name"] and download["path"].rstrip("/") == "dist"
    assert [s["uses"] for s in publish["steps"]][-1] == "pypa/gh-action-pypi-publish@release/v1"
    assert runs(publish) == [], "publishing runs nothing of the repository: it uploads what the build made"


# ---------------------------------------------------------------------------------------------- the name

def newest_release() -> str:
    """The version of the CHANGELOG's newest release (its first heading that is not Unreleased)."""
    changelog = open(os.path.join(ROOT, "CHANGELOG.md")).read()
    assert re.search(r"^## \[Unreleased\]", changelog, re.M)
    return re.search(r"^## \[(\d[^\]]*)\] - \d{4}-\d\d-\d\d$", changelog, re.M).group(1)


def test_the_readme_installs_the_distribution_by_its_name():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert DISTRIBUTION == "vdm-jax"  # "vdm" on PyPI is another project
    assert re.search(rf"^pip install {re.escape(DISTRIBUTION)}$", readme, re.M)
    for path in USER_FACING:
        text = open(os.path.join(ROOT, path), encoding="utf-8").read()
        assert not re.search(r"pip install [\"']?vdm(?![\w-])", text), f"{path} installs the old distribution name"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_a_notebook_installs_the_newest_release_by_name_only_where_vdm_is_not_importable(path, monkeypatch):
    transformer = pytest.importorskip("IPython.core.inputtransformer2").TransformerManager()
    cells = ["".join(c["source"]) for c in json.load(open(path, encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
    (cell,) = [c for c in cells if "%pip install" in c]
    code = transformer.transform_cell(cell)  # what the kernel runs: %pip becomes get_ipython().run_line_magic
    find_spec = importlib.util.find_spec

    def run(vdm_importable: bool) -> list[str]:
        calls, namespace = [], {}

        class Shell:
            def run_line_magic(self, magic, line):
                calls.append(f"%{magic} {line.format_map(namespace)}")  # IPython expands {name} from the cell

        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "vdm" and not vdm_importable else find_spec(name, *a))
        namespace["get_ipython"] = Shell
        exec(code, namespace)
        return calls

    assert run(vdm_importable=True) == []  # the test suite's kernel, a clone with vdm installed
    (call,) = run(vdm_importable=False)   # Colab
    magic, command, *args = shlex.split(call)
    requirements = [Requirement(a) for a in args if not a.startswith("-")]
    assert (magic, command, len(requirements)) == ("%pip", "install", 1), call
    assert canonicalize_name(requirements[0].name) == canonicalize_name(DISTRIBUTION), call
    assert str(requirements[0].specifier) == f"=={newest_release()}", call


# ---------------------------------------------------------------------------------------------- placeholders

@pytest.mark.parametrize("path", USER_FACING)
def test_no_placeholder_in_a_user_facing_file(path):
    text = open(os.path.join(ROOT, path), encoding="utf-8").read()
    found = [m.group(0) for m in PLACEHOLDER.finditer(text)]
    assert not found, f"{path}: {found}"


def test_the_placeholder_pattern_finds_placeholders():
    assert len(USER_FACING) > 20 and "CHANGELOG.md" in USER_FACING
    for text in ("https://github.com/<owner>/vdm", "[badge](https://colab.research.google.com/github/<o>/vdm)",
                 "VDM_REPOSITORY = '<owner>'"):
        assert PLACEHOLDER.search(text), text
    assert not PLACEHOLDER.search("vdm/configs/<name>.py, https://pypi.org/project/vdm-jax/")


# ---------------------------------------------------------------------------------------------- the version

def test_the_version_is_the_installed_distributions_and_import_vdm_does_not_look_it_up():
    from importlib import metadata

    assert vdm.__version__ == metadata.version(DISTRIBUTION)
    out = subprocess.run([sys.executable, "-c", "import sys, vdm; print('importlib.metadata' in sys.modules)"],
                         capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_the_version_of_sources_that_are_not_installed_is_the_fallback_version(tmp_path):
    (tmp_path / "vdm").mkdir()
    shutil.copy(os.path.join(ROOT, "vdm", "__init__.py"), tmp_path / "vdm")  # what `import vdm` runs
    # -S: no site-packages, where the development install's metadata is; only the copied sources.
    out = subprocess.run([sys.executable, "-S", "-c", "import vdm; print(vdm.__version__)"], cwd=tmp_path,
                         capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == PYPROJECT["tool"]["setuptools_scm"]["fallback_version"]
