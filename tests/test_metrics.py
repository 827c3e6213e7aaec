"""Tests for vdm.metrics: JSON lines, TensorBoard events, progress output."""

from __future__ import annotations

import glob
import io
import json
import math
import os
import re
import struct
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vdm.metrics import MetricWriter, Progress, format_eta, in_notebook, read_jsonl


# --- an independent TFRecord reader (length-prefixed records with masked CRC32C)

def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_records(path: str) -> list[bytes]:
    records = []
    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            (length_crc,) = struct.unpack("<I", header[8:])
            assert length_crc == _masked_crc32c(header[:8]), "bad length CRC"
            data = f.read(length)
            (data_crc,) = struct.unpack("<I", f.read(4))
            assert data_crc == _masked_crc32c(data), "bad data CRC"
            records.append(data)
    return records


def _events(logdir: str):
    """(step, tag, kind, value) for every summary value in the event files of logdir."""
    from tensorboardX.proto.event_pb2 import Event

    files = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
    assert files, f"no event file in {logdir}"
    out = []
    for path in files:
        for rec in _read_records(path):
            event = Event.FromString(rec)
            for v in event.summary.value:
                kind = v.WhichOneof("value")
                value = v.simple_value if kind == "simple_value" else getattr(v, kind)
                out.append((event.step, v.tag, kind, value))
    return out


# --- MetricWriter

def test_jsonl_and_tensorboard_scalars(tmp_path):
    with MetricWriter(tmp_path, is_main=True) as w:
        w.write(10, {"loss": jnp.asarray(1.5), "bpd": np.float32(0.25), "epoch": 1})
        w.write(20, {"loss": 1.25, "bpd": 0.125, "epoch": 2})
        w.write(30, {"loss": float("nan"), "lr": jnp.asarray([3e-4])})
        w.flush()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert json.loads(lines[0]) == {"step": 10, "loss": 1.5, "bpd": 0.25, "epoch": 1}
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [10, 20, 30]
    assert records[1] == {"step": 20, "loss": 1.25, "bpd": 0.125, "epoch": 2}
    assert records[2]["loss"] is None and records[2]["lr"] == pytest.approx(3e-4)  # strict JSON: NaN as null
    for line in lines:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert isinstance(records[0]["epoch"], int)

    events = _events(str(tmp_path / "tensorboard"))
    scalars = {(step, tag): value for step, tag, kind, value in events if kind == "simple_value"}
    assert scalars[(10, "loss")] == 1.5
    assert scalars[(20, "bpd")] == 0.125
    assert scalars[(20, "epoch")] == 2.0
    assert math.isnan(scalars[(30, "loss")])
    assert len(scalars) == 8

    # Appending: a resumed run continues the same file.
    with MetricWriter(tmp_path, is_main=True, enable_tensorboard=False) as w:
        w.write(40, {"loss": 1.0})
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [10, 20, 30, 40]


def test_write_image(tmp_path):
    img = (np.arange(6 * 5 * 3) % 256).astype(np.uint8).reshape(6, 5, 3)
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
    with MetricWriter(tmp_path, is_main=True) as w:
        w.write_image(7, "samples/grid", img)
        w.write_image(7, "gray", gray)
        with pytest.raises(TypeError, match="uint8"):
            w.write_image(7, "bad", img.astype(np.float32))
    images = {tag: value for step, tag, kind, value in _events(str(tmp_path / "tensorboard")) if kind == "image"}
    assert set(images) == {"samples/grid", "gray"}
    assert (images["samples/grid"].height, images["samples/grid"].width) == (6, 5)
    decoded = np.asarray(Image.open(io.BytesIO(images["samples/grid"].encoded_image_string)))
    np.testing.assert_array_equal(decoded, img)
    decoded = np.asarray(Image.open(io.BytesIO(images["gray"].encoded_image_string)))
    np.testing.assert_array_equal(decoded.reshape(3, 4, -1)[..., 0], gray[..., 0])


def test_writer_rejects_bad_input_and_non_main_is_silent(tmp_path):
    with MetricWriter(tmp_path / "main", is_main=True, enable_tensorboard=False) as w:
        with pytest.raises(ValueError, match="reserved"):
            w.write(1, {"step": 3})
        with pytest.raises(ValueError, match="not a scalar"):
            w.write(1, {"loss": np.ones(3)})
    quiet = MetricWriter(tmp_path / "other", is_main=False)
    quiet.write(1, {"loss": 1.0})
    quiet.write_image(1, "x", np.zeros((2, 2), np.uint8))
    quiet.close()
    assert not (tmp_path / "other").exists()


def test_read_jsonl_truncated_and_malformed(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.0}\n{"step": 3, "lo')
    assert read_jsonl(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2"):
        read_jsonl(path)


# --- Progress and format_eta

def test_a_resumed_writer_cuts_the_incomplete_last_line_a_killed_run_left_and_says_so(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')  # killed mid-write
    writer = MetricWriter(tmp_path, enable_tensorboard=False, is_main=True)
    writer.write(4, {"loss": 1.0})
    writer.close()
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 4]  # the whole file reads again
    assert writer.notes == [f"note: {path}: dropped an incomplete last line (a run stopped mid-write)"]
    again = MetricWriter(tmp_path, enable_tensorboard=False, is_main=True)  # a whole file: nothing to say
    again.close()
    assert again.notes == [] and path.read_text().endswith('{"step": 4, "loss": 1.0}\n')


def test_format_eta():
    assert format_eta(0) == "0:00:00"
    assert format_eta(59.6) == "0:01:00"
    assert format_eta(102) == "0:01:42"
    assert format_eta(3725.4) == "1:02:05"
    assert format_eta(90061) == "25:01:01"
    assert format_eta(-5) == "0:00:00"
    assert format_eta(None) == format_eta(float("inf")) == format_eta(float("nan")) == "--:--:--"


class _FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_plain_lines_when_not_a_tty(capsys):
    clock = _FakeClock()
    progress = Progress(250, log_every=100, clock=clock)  # stderr is captured: not a TTY
    assert progress.interactive is False
    for step in range(1, 251):
        clock.t += 0.5  # 2 steps/s
        progress.update(step, loss=jnp.asarray(1.2344), bpd=1.23)
    progress.close()
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == ""
    assert lines == [
        "step 100/250  loss 1.234  bpd 1.23  2 steps/s  ETA 0:01:15",
        "step 200/250  loss 1.234  bpd 1.23  2 steps/s  ETA 0:00:25",
        "step 250/250  loss 1.234  bpd 1.23  2 steps/s  ETA 0:00:00",
    ]


def test_progress_resumed_run_and_rate_window(capsys):
    clock = _FakeClock()
    progress = Progress(1000, initial_step=600, log_every=200, rate_window=10.0, clock=clock)
    clock.t = 60.0  # a slow first step (compilation) ...
    progress.update(601)
    for step in range(602, 1001):
        clock.t += 0.1  # ... then 10 steps/s
        progress.update(step, loss=0.5)
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split("  ")[0] for ln in lines] == ["step 800/1000", "step 1000/1000"]
    # The 60 s compile is outside the 10 s window, so the rate is the steady one.
    assert re.fullmatch(r"step 800/1000  loss 0\.5  10 steps/s  ETA 0:00:20", lines[0]), lines[0]


def test_progress_in_place_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    clock = _FakeClock()
    progress = Progress(50, stream=stream, clock=clock, min_interval=1.0)
    assert progress.interactive is True
    for step in range(1, 51):
        clock.t += 0.25
        progress.update(step, loss=2.0)
    progress.log("sampling...")
    progress.close()
    out = stream.getvalue()
    frames = [f for f in out.split("\r") if f]
    # Redrawn at most once per second (12.5 s of steps) plus the final step.
    assert 10 <= len(frames) <= 16
    assert "\n" not in "".join(frames[:-2])
    assert "step 50/50" in out and "[" + "#" * 24 + "]" in out
    assert out.endswith("sampling...\n")


def test_progress_silent_off_main(capsys):
    progress = Progress(10, log_every=1, is_main=False)
    for step in range(1, 11):
        progress.update(step, loss=1.0)
    progress.close()
    assert capsys.readouterr().err == ""


def test_in_notebook_is_a_jupyter_kernel(monkeypatch):
    class Shell:
        def __init__(self, config):
            self.config = config

    class IPython(types.ModuleType):
        shell = None

        def get_ipython(self):
            return self.shell

    fake = IPython("IPython")
    monkeypatch.setitem(sys.modules, "IPython", fake)
    assert not in_notebook()  # IPython imported, no shell
    fake.shell = Shell({"TerminalInteractiveShell": {}})
    assert not in_notebook()  # the IPython terminal: its stderr is a TTY, the in-place bar serves
    fake.shell = Shell({"IPKernelApp": {"connection_file": "kernel.json"}})  # Jupyter, Colab
    assert in_notebook() and Progress(10, stream=io.StringIO(), is_main=True).notebook
    monkeypatch.delitem(sys.modules, "IPython")
    assert not in_notebook() and not Progress(10, stream=io.StringIO(), is_main=True).notebook


def test_progress_in_a_notebook_draws_tqdm_below_the_start_up_lines():
    stream = io.StringIO()
    progress = Progress(100, initial_step=20, notebook=True, stream=stream, is_main=True)
    progress.log("vdm: start-up line")
    for step in range(30, 101, 10):
        progress.update(step, loss=jnp.asarray(1.23456), bpd=2.5)
    progress.log("step 100: test bpd 2.5")
    progress.close()
    out = stream.getvalue()
    assert out.startswith("vdm: start-up line\n")  # the bar starts at the first update, below it
    assert " 20/100 " in out  # resumed at step 20
    last = out.rstrip("\n").split("\r")[-1]
    assert last.startswith("100%|") and " 100/100 " in last and "step/s, loss=1.235, bpd=2.5]" in last
    assert "\rstep 100: test bpd 2.5\n" in out  # tqdm.write: the bar cleared, the line printed, the bar redrawn


def test_sample_pictures_of_any_channel_count_are_grey_or_rgb():
    """The grid of samples: grey and RGB images as they are; any other channel count shows each channel as a
    grey image side by side (TensorBoard and PNG take only grey, RGB or RGBA)."""
    from vdm import pictures

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 17, (4, 3, 5, 1))
    grid = pictures.draw_samples(grey, 17, "image", columns=2)
    assert grid.shape == (2 * 5 + 2, 2 * 7 + 2)
    np.testing.assert_array_equal(grid[2:5, 2:7], np.round(grey[0, ..., 0] * 255 / 16))
    two = rng.integers(0, 17, (4, 3, 5, 2))
    grid = pictures.draw_samples(two, 17, "image", columns=2)
    assert grid.shape == (2 * 5 + 2, 2 * 12 + 2)  # each image 5 + 5 wide: its two channels
    np.testing.assert_array_equal(grid[2:5, 2:12], np.round(np.concatenate([two[0, ..., 0], two[0, ..., 1]], 1) * 255 / 16))
    assert pictures.draw_samples(rng.integers(0, 17, (4, 3, 5, 3)), 17, "image").shape[-1] == 3
