"""Cloud workdirs: every file the trainer writes goes through etils.epath (here a gs:// URL backed by
fsspec's in-memory file system), and only process 0 writes the shared files."""
from unittest import mock

import fsspec
import jax
import numpy as np
import pytest
from conftest import load_config
from etils.epath import backend
from PIL import Image

from vdm import checkpoint, metrics, paths, train


@pytest.fixture
def memory_gcs():
    """``gs://`` URLs stored in fsspec's memory file system for the test's duration."""
    fs = fsspec.filesystem("memory")
    fs.store.clear()
    with mock.patch.object(backend._FileSystemSpecBackend, "_get_filesystem", lambda self, name: fs):
        yield fs
    fs.store.clear()


def test_files_of_a_run_land_under_a_gs_workdir(memory_gcs, monkeypatch, tmp_path):
    # Orbax writes gs:// checkpoints itself (tensorstore, google-cloud-storage): not ours to fake here.
    checkpointer = checkpoint.Checkpointer
    monkeypatch.setattr(checkpoint, "Checkpointer", lambda directory, **kw: checkpointer(tmp_path / "ck", **kw))
    config = load_config("test")
    config.sample.num_images = 4
    config.sample.steps = 2
    workdir = "gs://bucket/runs/a"
    trainer = train.Trainer(config, workdir)
    train.write_config(config, workdir)
    with metrics.MetricWriter(workdir) as writer:
        writer.write(1, {"loss": 2.0})
        writer.write(2, {"loss": 1.0})
        png = trainer.sample(2, writer)["samples"]
    stored = sorted(memory_gcs.store)
    assert png == "gs://bucket/runs/a/samples_2.png"
    for name in ("config.json", "metrics.jsonl", "samples_2.npz", "samples_2.png"):
        assert f"{workdir}/{name}" in stored, stored
    assert any(key.startswith(f"{workdir}/tensorboard/events.out.tfevents") for key in stored)
    assert [r["step"] for r in metrics.read_jsonl(f"{workdir}/metrics.jsonl")] == [1, 2]  # appended
    with paths.path(f"{workdir}/samples_2.npz").open("rb") as f:
        images = np.load(f)["images"]
    with paths.path(png).open("rb") as f:
        picture = np.asarray(Image.open(f))
    assert images.shape == (4, 8, 8, 1) and picture.ndim == 2
    trainer.close()


def test_only_process_0_writes_shared_files(memory_gcs, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    train.write_config(load_config("test"), "gs://bucket/runs/b")
    with metrics.MetricWriter("gs://bucket/runs/b", is_main=False) as writer:
        writer.write(1, {"loss": 1.0})
    assert not [key for key in memory_gcs.store if key.startswith("gs://bucket/runs/b")]


def test_a_write_that_fails_for_want_of_space_leaves_the_old_file_whole_and_no_temporary(tmp_path):
    """A full disk mid-write (here the process's file-size limit, which fails a write as a full disk
    does, with no special file system): config.json keeps its old contents, never truncated."""
    import resource
    import signal

    target = tmp_path / "config.json"
    paths.write_bytes(target, b"old config")
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG, not a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))
    try:
        with pytest.raises(OSError):
            paths.write_bytes(target, b"x" * 100_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert target.read_bytes() == b"old config"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    paths.write_bytes(target, b"new config")  # and a write with room replaces it
    assert target.read_bytes() == b"new config"


@pytest.mark.parametrize("url,package", [("gs://bucket/runs/a", "gcsfs"), ("s3://bucket/runs/a", "s3fs")])
def test_a_cloud_workdir_without_its_package_is_one_line_before_the_data_are_read(url, package, monkeypatch):
    import importlib.util

    if importlib.util.find_spec(package):
        pytest.skip(f"{package} is installed here")
    from vdm import lock

    monkeypatch.setattr(train, "prepare", lambda config: pytest.fail("the data were read first"))
    with pytest.raises(lock.WorkdirError) as info:
        train.Trainer(load_config("test"), url)
    assert str(info.value).startswith(f"--workdir {url}: ") and package in str(info.value)
    assert "\n" not in str(info.value)
