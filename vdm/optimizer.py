"""The optimizer: AdamW with a linear warm-up, masked weight decay and optional gradient clipping.

The learning rate warms up linearly, lr * (step + 1) / warmup_steps, so that the very first
step already moves; then follows ``config.train.lr_schedule``, a name in ``LR_SCHEDULES``:

* ``constant``: lr;
* ``cosine``: lr * 0.5 (1 + cos(pi s / S)) from the warm-up's last step (s = 0) to 0 at
  ``train.num_steps`` (S = num_steps - warmup_steps + 1).
"""
from __future__ import annotations

import optax

from vdm import registry


def make_optimizer(config, decay_mask) -> optax.GradientTransformation:
    """AdamW at ``learning_rate(config)``, weight decay on ``decay_mask`` only, optional global-norm clipping."""
    opt = config.train
    lr = learning_rate(config)
    adamw = optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=decay_mask)
    # The same chain (and optimizer state) with or without clipping: a run may resume with either.
    clip = optax.clip_by_global_norm(opt.grad_clip) if opt.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw)


def learning_rate(config) -> optax.Schedule:
    """The learning rate by optimizer step: the linear warm-up, then ``LR_SCHEDULES[train.lr_schedule]``."""
    opt = config.train
    warmup = max(int(opt.warmup_steps), 1)
    after = registry.lookup(LR_SCHEDULES, opt.lr_schedule, "learning-rate schedule")(
        opt.lr, max(int(opt.num_steps) - warmup + 1, 1))
    return optax.join_schedules([optax.linear_schedule(opt.lr / warmup, opt.lr, warmup - 1), after], [warmup - 1])


# name -> (lr, steps from the warm-up's last step to train.num_steps) -> the schedule after the warm-up; a new one
# is a function decorated with @LR_SCHEDULES.register(name)
LR_SCHEDULES: registry.Registry = registry.Registry("learning-rate schedule")


@LR_SCHEDULES.register("constant")
def constant(lr: float, decay_steps: int) -> optax.Schedule:
    """lr throughout."""
    del decay_steps
    return optax.constant_schedule(lr)


@LR_SCHEDULES.register("cosine")
def cosine(lr: float, decay_steps: int) -> optax.Schedule:
    """A cosine from lr to 0 over ``decay_steps`` (which ``train.num_steps`` sets: it is compiled in)."""
    return optax.cosine_decay_schedule(lr, decay_steps)
