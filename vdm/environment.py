"""What a measurement ran on: the versions of the software that compiled it and the machine, recorded beside
every performance figure (``vdm.bench``'s table and JSON, ``experiments/performance``'s records), so that two
figures are compared only where these agree.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform

# The distributions whose versions are recorded: the record's key -> the installed distribution's name.
PACKAGES = (("jax", "jax"), ("jaxlib", "jaxlib"), ("flax", "flax"), ("optax", "optax"), ("orbax", "orbax-checkpoint"))


def version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (its name on PyPI), or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name: the first ``model name`` (x86) or ``Model`` / ``Hardware`` (ARM) line of
    ``/proc/cpuinfo`` (or of the text ``cpuinfo``), else ``platform.processor()``, else the machine type.

    Args:
        cpuinfo: the text of a ``/proc/cpuinfo``; None: read this machine's, where there is one.

    Returns:
        A name such as ``"AMD EPYC 7B13"``; ``"unknown"`` if nothing names it.
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    for field in ("model name", "Model", "Hardware"):
        for line in cpuinfo.splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == field and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def environment(device: bool = True) -> dict:
    """The software and hardware of this process, as JSON-able values.

    Args:
        device: also ask JAX for its backend and devices. False leaves JAX's backends untouched (a parent
            process whose children use the GPU must not take its memory).

    Returns:
        ``{"jax", "jaxlib", "flax", "optax", "orbax"}``: installed versions (None where not installed);
        ``"python"``: its version; ``"platform"``: the operating system (``platform.platform()``);
        ``"cpu_model"`` (``cpu_model()``) and ``"cpu_count"``; with ``device``, ``"backend"``, ``"device_kind"``
        (of the first device) and ``"device_count"``.
    """
    out = {key: version(name) for key, name in PACKAGES}
    out |= {"python": platform.python_version(), "platform": platform.platform(), "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count()}
    if device:
        import jax

        out |= {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
                "device_count": jax.device_count()}
    return out


def describe(env: dict) -> str:
    """One line of ``environment()``'s record: ``jax 0.12.1 (jaxlib 0.12.1), flax ..., Python 3.12.1; CPU ...``."""
    software = ", ".join(f"{key} {env.get(key)}" for key, _ in PACKAGES[2:])
    line = f"jax {env.get('jax')} (jaxlib {env.get('jaxlib')}), {software}, Python {env.get('python')}; " \
           f"CPU {env.get('cpu_model')} x {env.get('cpu_count')}; {env.get('platform')}"
    if "device_kind" in env:
        line += f"; {env['device_kind']} x {env.get('device_count')} ({env.get('backend')})"
    return line
