"""The EMA of the parameters and its warm-up, step by step against a direct computation of the recursion."""
import jax
import numpy as np
from conftest import load_config

from vdm import train

EMA_DECAY = 0.6  # the warm-up (1 + s) / (10 + s) passes it between steps 12 (0.591) and 13 (0.609)
NUM_STEPS = 15


def _ema_recursion(params: list, decay) -> list:
    """ema_0 = params_0 (the initial parameters); after step s (s = 0, 1, ...), with params_{s+1} the parameters
    the step left: ema_{s+1} = d_s ema_s + (1 - d_s) params_{s+1}, d_s = decay(s). In float64."""
    ema = [np.asarray(p, np.float64) for p in params[0]]
    out = []
    for s, after in enumerate(params[1:]):
        d = decay(s)
        ema = [d * e + (1.0 - d) * np.asarray(p, np.float64) for e, p in zip(ema, after)]
        out.append(ema)
    return out


def _max_error(ema: list, reference: list) -> float:
    """The largest error of ``ema`` against ``reference`` over every leaf, relative to the leaf's largest value."""
    return max(float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(float(np.max(np.abs(b))), 1e-12))
               for a, b in zip(ema, reference))


def test_ema_follows_its_warm_up_then_the_configured_decay(tmp_path):
    """The trainer's compiled step (configs/test.py with train.ema_decay = 0.6 and a learning rate that moves the
    parameters visibly from the first step) against ``ema = d ema + (1 - d) params`` with
    d = min(ema_decay, (1 + s) / (10 + s)) at step s = 0, 1, ...: the warm-up's decays 0.1, 0.18, ... and the cap
    from step 13 on. A step off in the warm-up (s + 1 or s - 1), or the cap ignored, is far outside the tolerance."""
    config = load_config("test")
    config.train.ema_decay = EMA_DECAY
    config.train.lr = 3e-2
    config.train.warmup_steps = 1
    config.train.steps_per_call = 1
    config.model.schedule, config.model.schedule_kwargs = "fixed_linear", {}  # compiles in half the time
    trainer = train.Trainer(config, str(tmp_path / "run"))
    try:
        states = [jax.device_get(trainer.state)]
        for step in range(NUM_STEPS):
            trainer.state, _ = trainer.train_step(trainer.state, trainer.train_batch(step))
            states.append(jax.device_get(trainer.state))
    finally:
        trainer.close()
    assert [int(s.step) for s in states] == list(range(NUM_STEPS + 1))
    assert int(states[-1].health.skipped) == 0  # every step applied: none is left out of the recursion
    params = [jax.tree_util.tree_leaves(s.params) for s in states]
    ema = [jax.tree_util.tree_leaves(s.ema_params) for s in states]
    for a, b in zip(params[0], ema[0]):
        np.testing.assert_array_equal(a, b)  # the EMA starts as a copy of the initial parameters

    def decay(s):
        return min(EMA_DECAY, (1.0 + s) / (10.0 + s))

    assert decay(0) == 0.1 and decay(12) < EMA_DECAY and decay(13) == EMA_DECAY  # both regimes are exercised
    expected = _ema_recursion(params, decay)
    errors = [_max_error(e, x) for e, x in zip(ema[1:], expected)]
    assert max(errors) < 1e-5, errors  # float32 rounding of a handful of multiply-adds
    # The parameters move at every step, so a recursion with another decay is told apart at every step.
    moved = min(_max_error(after, [np.asarray(p, np.float64) for p in before])
                for after, before in zip(params[1:], params[:-1]))
    assert moved > 1e-3
    for wrong in (lambda s: min(EMA_DECAY, (2.0 + s) / (11.0 + s)),  # the step after
                  lambda s: min(EMA_DECAY, s / (9.0 + s)),  # the step before
                  lambda s: (1.0 + s) / (10.0 + s),  # no cap
                  lambda s: EMA_DECAY):  # no warm-up
        wrong_errors = [_max_error(e, x) for e, x in zip(ema[1:], _ema_recursion(params, wrong))]
        assert max(wrong_errors) > 100 * max(max(errors), 1e-7), wrong_errors
