"""Tests for vdm.parallel.

Multi-device and multi-process behaviour needs XLA flags set before JAX starts,
so those checks run in fresh Python subprocesses; the pytest process itself
never changes its JAX configuration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import free_port, xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 120


def _env(n_devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(
        XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={n_devices}"),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


def _run(code: str, n_devices: int) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=_env(n_devices),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


# Independent reference for the linear-model step: closed-form MSE gradient in numpy.
def _numpy_sgd_step(w, b, x, y, lr):
    pred = x @ w + b
    err = pred - y
    loss = np.mean(err**2)
    g_pred = 2.0 * err / err.size
    return w - lr * (x.T @ g_pred), b - lr * g_pred.sum(0), loss


def _linear_data():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 2)).astype(np.float32)
    b = rng.normal(size=(2,)).astype(np.float32)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    y = rng.normal(size=(16, 2)).astype(np.float32)
    return w, b, x, y


def test_single_device_helpers_in_process():
    import jax

    from vdm.parallel import check_batch_divisible, make_data_mesh

    mesh = make_data_mesh(jax.devices()[:1])
    check_batch_divisible(30, mesh)  # one device: any positive size works
    with pytest.raises(ValueError, match=r"^data\.eval_batch_size=0 is not divisible by the 1 devices$"):
        check_batch_divisible(0, mesh, name="data.eval_batch_size")


EIGHT_DEVICE_CODE = """
import json
import numpy as np
import jax, jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P
from vdm.parallel import (batch_sharded, check_batch_divisible, host_batch_to_global,
                          make_data_mesh, replicate, replicated)

out = {}
mesh = make_data_mesh()
assert mesh.size == 8 and mesh.axis_names == ("data",), mesh
assert mesh.axis_types == (AxisType.Auto,), mesh.axis_types
assert list(mesh.devices.flat) == jax.devices()
assert batch_sharded(mesh).spec == P("data") and replicated(mesh).spec == P()

# --- batch divisibility
check_batch_divisible(32, mesh)
try:
    check_batch_divisible(30, mesh)
except ValueError as e:
    out["divisible_msg"] = str(e)

# --- host batch -> global array (pytree), round trip and per-device rows
x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
labels = np.arange(16, dtype=np.int32)
g = host_batch_to_global(mesh, {"x": x, "labels": labels})
assert g["x"].shape == (16, 3) and g["labels"].dtype == np.int32
np.testing.assert_array_equal(np.asarray(g["x"]), x)
np.testing.assert_array_equal(np.asarray(g["labels"]), labels)
pos = {d: i for i, d in enumerate(mesh.devices.flat)}
for shard in g["x"].addressable_shards:
    i = pos[shard.device]
    np.testing.assert_array_equal(np.asarray(shard.data), x[2 * i: 2 * i + 2])
assert len(g["x"].addressable_shards) == 8

# --- a stack of steps [k, B, ...] sharded along its batch axis
stack = np.arange(3 * 16, dtype=np.float32).reshape(3, 16)
gs = host_batch_to_global(mesh, stack, batch_axis=1)
assert gs.sharding.spec == P(None, "data")
for shard in gs.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), stack[:, 2 * pos[shard.device]: 2 * pos[shard.device] + 2])

# --- jitted reduction over the sharded batch
m = jax.jit(lambda a: jnp.mean(a, axis=0), out_shardings=replicated(mesh))(g["x"])
np.testing.assert_allclose(np.asarray(m), x.mean(0), rtol=1e-6)

# --- data-parallel SGD step on a linear model vs the same step on one device
def step(params, batch):
    def loss_fn(p):
        pred = batch["x"] @ p["w"] + p["b"]
        return jnp.mean((pred - batch["y"]) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return jax.tree.map(lambda p, gr: p - 0.1 * gr, params, grads), loss

data = np.load("__DATA__")
params_np = {"w": data["w"], "b": data["b"]}
batch_np = {"x": data["x"], "y": data["y"]}
dp_step = jax.jit(step, in_shardings=(replicated(mesh), batch_sharded(mesh)),
                  out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=0)
params = replicate(params_np, mesh)
assert all(a.sharding == replicated(mesh) for a in jax.tree.leaves(params))
new_params, loss = dp_step(params, host_batch_to_global(mesh, batch_np))
assert params["w"].is_deleted(), "params were not donated"
assert new_params["w"].sharding == replicated(mesh)
dev0 = jax.devices()[0]
one = jax.jit(step)(jax.device_put(params_np, dev0), jax.device_put(batch_np, dev0))
for k in ("w", "b"):
    np.testing.assert_allclose(np.asarray(new_params[k]), np.asarray(one[0][k]), rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(float(loss), float(one[1]), rtol=1e-6)
out["dp"] = {k: np.asarray(v).tolist() for k, v in new_params.items()}
out["dp_loss"] = float(loss)

# --- a convolution step (needs Auto axes) matches one device too
def conv_loss(k, imgs):
    yk = jax.lax.conv_general_dilated(imgs, k, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.mean(yk ** 2)
imgs = np.random.default_rng(1).normal(size=(8, 6, 6, 2)).astype(np.float32)
kern = np.random.default_rng(2).normal(size=(3, 3, 2, 3)).astype(np.float32)
conv_grad = jax.jit(jax.value_and_grad(conv_loss),
                    in_shardings=(replicated(mesh), batch_sharded(mesh)),
                    out_shardings=replicated(mesh))
l8, g8 = conv_grad(replicate(kern, mesh), host_batch_to_global(mesh, imgs))
l1, g1 = jax.jit(jax.value_and_grad(conv_loss))(jax.device_put(kern, dev0), jax.device_put(imgs, dev0))
np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), rtol=1e-4, atol=1e-6)
np.testing.assert_allclose(float(l8), float(l1), rtol=1e-5)

# --- replicate handles numpy, Python scalars and typed PRNG keys
tree = replicate({"a": np.ones(3), "n": 5, "key": jax.random.key(7)}, mesh)
assert all(l.sharding == replicated(mesh) for l in jax.tree.leaves(tree))
assert int(tree["n"]) == 5
np.testing.assert_array_equal(np.asarray(jax.random.key_data(tree["key"])),
                              np.asarray(jax.random.key_data(jax.random.key(7))))
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_eight_devices(tmp_path):
    w, b, x, y = _linear_data()
    data_path = tmp_path / "linear.npz"
    np.savez(data_path, w=w, b=b, x=x, y=y)
    stdout = _run(EIGHT_DEVICE_CODE.replace("__DATA__", str(data_path)), n_devices=8)
    out = json.loads(stdout.split("RESULT ", 1)[1])
    assert out["divisible_msg"] == "train.batch_size=30 is not divisible by the 8 devices"
    w_ref, b_ref, loss_ref = _numpy_sgd_step(w, b, x, y, lr=0.1)
    np.testing.assert_allclose(np.array(out["dp"]["w"]), w_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(out["dp"]["b"]), b_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["dp_loss"], loss_ref, rtol=1e-5)


INIT_CODE = """
import os
import jax
from vdm.parallel import maybe_initialize_distributed
assert maybe_initialize_distributed() is False            # no env: single process
assert maybe_initialize_distributed(enable=False) is False
assert not jax.distributed.is_initialized()
# Deciding must not have started a JAX backend, otherwise this would raise.
os.environ["JAX_COORDINATOR_ADDRESS"] = "127.0.0.1:__PORT__"
os.environ["JAX_NUM_PROCESSES"] = "1"
os.environ["JAX_PROCESS_ID"] = "0"
assert maybe_initialize_distributed(initialization_timeout=30) is True
assert maybe_initialize_distributed() is True            # idempotent
assert jax.process_count() == 1 and jax.device_count() == 2
print("OK")
"""


def test_maybe_initialize_distributed_decides_without_touching_devices():
    stdout = _run(INIT_CODE.replace("__PORT__", str(free_port())), n_devices=2)
    assert stdout.strip().endswith("OK")


WORKER_CODE = """
import json, sys
import numpy as np
from vdm.parallel import (batch_sharded, host_batch_to_global, make_data_mesh,
                          maybe_initialize_distributed, replicate, replicated)
assert maybe_initialize_distributed(initialization_timeout=60)   # env: JAX_COORDINATOR_ADDRESS etc.
import jax, jax.numpy as jnp
pid = jax.process_index()
assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2

mesh = make_data_mesh()
data = np.load("__DATA__")
full = {"x": data["x"], "y": data["y"]}          # the global batch (16 rows)
rows = slice(8 * pid, 8 * pid + 8)  # process p supplies rows p B/P .. (p + 1) B/P, as vdm.data does
g = host_batch_to_global(mesh, {k: v[rows] for k, v in full.items()})
assert g["x"].shape == (16, 4) and not g["x"].is_fully_addressable
for shard in g["x"].addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), full["x"][shard.index])

mean = jax.jit(lambda a: jnp.mean(a, axis=0), out_shardings=replicated(mesh))(g["x"])

def step(params, batch):
    def loss_fn(p):
        return jnp.mean((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return jax.tree.map(lambda p, gr: p - 0.1 * gr, params, grads), loss

dp_step = jax.jit(step, in_shardings=(replicated(mesh), batch_sharded(mesh)),
                  out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=0)
params, loss = dp_step(replicate({"w": data["w"], "b": data["b"]}, mesh), g)
local = lambda a: np.asarray(a.addressable_data(0)).tolist()
print("RESULT " + json.dumps({"pid": pid, "mean": local(mean), "loss": float(local(loss)),
                              "w": local(params["w"]), "b": local(params["b"])}), flush=True)
jax.distributed.shutdown()
"""


@pytest.mark.slow
def test_two_processes_on_localhost(tmp_path):
    w, b, x, y = _linear_data()
    data_path = tmp_path / "linear.npz"
    np.savez(data_path, w=w, b=b, x=x, y=y)
    code = WORKER_CODE.replace("__DATA__", str(data_path))
    port = free_port()
    procs = []
    for pid in range(2):
        env = _env(
            2,
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
            JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code], env=env, cwd=REPO,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
        )
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT_S)
            assert p.returncode == 0, f"worker failed:\n{out}\n{err[-4000:]}"
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = [json.loads(o.split("RESULT ", 1)[1].splitlines()[0]) for o in outputs]
    assert sorted(r["pid"] for r in results) == [0, 1]
    r0, r1 = results
    for key in ("mean", "loss", "w", "b"):
        assert r0[key] == r1[key], key  # both processes hold the same global result
    np.testing.assert_allclose(r0["mean"], x.mean(0), rtol=1e-6)
    w_ref, b_ref, loss_ref = _numpy_sgd_step(w, b, x, y, lr=0.1)
    np.testing.assert_allclose(r0["w"], w_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r0["b"], b_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r0["loss"], loss_ref, rtol=1e-5)
