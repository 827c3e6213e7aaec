"""The network contract: what the model gives every network (:class:`NetworkContext`), what a network is
(:class:`Network`), and the registry of networks by name (:data:`NETWORKS`, :func:`register`).

The interface itself (shapes, conditioning, dropout, the gamma map) is stated once, in the docstring of
``vdm.nets``; the behavioural checks of it are ``vdm.testing.network``.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from vdm import registry, schedules
from vdm.nets.kernels import Convolutions

INPUT_RANKS = (4, 2)  # images [B, H, W, C], vectors [B, D]


@dataclasses.dataclass(frozen=True)
class NetworkContext:
    """What the model tells every network it builds: one value, built once by ``vdm.model.VDM``.

    A network takes it as its first argument, ``Net(context, *, <its own hyper-parameters>, rngs=...)``, and
    reads what it needs; an argument the model gains is a field here, not an edit of every network. A
    network must not store the context itself (its attributes would join the network's graph): it keeps
    the fields it uses.

    Attributes:
        data_shape: the shape of one example, ``(H, W, C)`` for images (``(D,)`` for vectors); the model's data.
            A network reads the size of its input from it with :meth:`in_channels`.
        gamma_min: the schedule's range of gamma = -log SNR: networks normalise gamma to ``[0, 1]`` by it.
        gamma_max: the upper end of that range (``gamma_min < gamma_max``).
        num_classes: classes to condition on (``cond["label"]``; 0: unconditional). The label ``num_classes``
            is the null class of classifier-free guidance, and ``cond=None`` means it.
        latent_size: the size of MuLAN's auxiliary latent ``cond["latent"]`` to condition on (0: none).
        gamma_map: gamma comes per element (the schedule is elementwise): take the normalised gamma as input
            channels beside ``z`` too (``vdm.nets.layers.gamma_map``).
        remat: rematerialise the network's blocks in the backward pass (memory for compute; same values).
        convolutions: how every convolution is computed (``vdm.nets.kernels.Convolutions``; speed only); a
            network without convolutions ignores it.
        dtype: the compute dtype (``jnp.float32``, ``jnp.bfloat16``); the output is float32 whatever it is.

    Raises:
        vdm.options.OptionError: ``gamma_min >= gamma_max``.
        ValueError: a ``data_shape`` that is not a tuple of positive sizes, or a negative ``num_classes`` or
            ``latent_size``.
    """

    data_shape: tuple[int, ...]
    gamma_min: float = -13.3
    gamma_max: float = 5.0
    num_classes: int = 0
    latent_size: int = 0
    gamma_map: bool = False
    remat: bool = False
    convolutions: Convolutions = Convolutions()
    dtype: Any = jnp.float32

    def __post_init__(self):
        try:
            shape = tuple(int(d) for d in self.data_shape)
        except TypeError:
            shape = ()
        if not shape or min(shape) < 1:
            raise ValueError(f"data_shape={self.data_shape!r}: must be the shape of one example, positive sizes")
        object.__setattr__(self, "data_shape", shape)
        schedules.check_endpoints(self.gamma_min, self.gamma_max)
        for field in ("num_classes", "latent_size"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field}={getattr(self, field)}: must be >= 0")

    def in_channels(self, input_rank: int) -> int:
        """The size of the last axis of ``z`` for a network taking inputs of rank ``input_rank``.

        Args:
            input_rank: 4 (images ``[B, H, W, C]``) or 2 (vectors ``[B, D]``; the model flattens the data).

        Returns:
            ``C = data_shape[-1]`` for images, ``D = prod(data_shape)`` for vectors.

        Raises:
            ValueError: images asked of data that are not ``(H, W, C)``, or another rank.
        """
        if input_rank == 2:
            return math.prod(self.data_shape)
        if input_rank == 4:
            if len(self.data_shape) != 3:
                raise ValueError(f"a network of images [B, H, W, C] needs data of shape (H, W, C); the data's shape "
                                 f"is {self.data_shape}")
            return self.data_shape[-1]
        raise ValueError(f"input_rank={input_rank!r}: must be one of {INPUT_RANKS}")


class Network(nnx.Module):
    """The contract of a denoising network (stated in full in the docstring of ``vdm.nets``).

    A network subclasses this class, declares ``input_rank``, is built as
    ``Net(context, *, <hyper-parameters>, rngs=nnx.Rngs(...))`` (``context`` a :class:`NetworkContext`; each
    hyper-parameter a keyword with a default, set by the config's ``network_kwargs``) and is called as
    ``net(z, gamma, cond=None, *, dropout_rng=None) -> out``, float32 of ``z``'s shape, exactly zero at
    initialisation.

    Attributes:
        input_rank: 4 if the network takes images ``[B, H, W, C]``, 2 if vectors ``[B, D]`` (the model then
            flattens the data); a class attribute every network declares.
    """

    input_rank: ClassVar[int]

    @abc.abstractmethod
    def __call__(self, z: jax.Array, gamma: jax.Array, cond: dict | None = None, *,
                 dropout_rng: jax.Array | None = None) -> jax.Array:
        """The network's output for ``z`` (``[B, H, W, C]`` or ``[B, D]``), ``gamma`` (a scalar, ``[B]`` or ``z``'s
        shape) and ``cond`` (``None`` or ``{"label": int32 [B], "latent": [B, k]}``): float32, ``z``'s shape.
        Dropout is on if and only if ``dropout_rng`` is given."""


@dataclasses.dataclass(frozen=True)
class Example:
    """What a network's contract checks (``vdm.testing.network``) build and feed: keep it tiny (it compiles).

    Attributes:
        kwargs: the network's hyper-parameters for the checks (``channels=8``, one block, ``dropout > 0`` so
            that the dropout check has something to see); ``{}`` takes the network's defaults.
        shape: the shape of ``z``, batch first; ``None`` for ``[2, 8, 8, 1]`` (images) or ``[2, 2]`` (vectors)
            by the network's ``input_rank``.
    """

    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    shape: tuple[int, ...] | None = None

    def z_shape(self, input_rank: int) -> tuple[int, ...]:
        """The shape of ``z`` for a network of ``input_rank``: :attr:`shape`, or the default of that rank."""
        if self.shape is not None:
            return tuple(self.shape)
        return (2, 8, 8, 1) if input_rank == 4 else (2, 2)


def _positional_or_keyword(params: Mapping[str, inspect.Parameter], name: str) -> bool:
    p = params.get(name)
    return (p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) or any(
        q.kind is q.VAR_KEYWORD for q in params.values())


def check_contract(name: str, piece: Any) -> None:
    """The static contract of a network, run at registration (the behaviour is ``vdm.testing.network``'s).

    Args:
        name: its name, for messages.
        piece: what is registered: a concrete subclass of :class:`Network` declaring ``input_rank`` (4 or 2),
            whose ``__init__`` takes ``context`` and ``rngs`` and whose ``__call__`` takes
            ``(z, gamma, cond=None, *, dropout_rng=None)``.

    Raises:
        TypeError: what the piece lacks, in one line.
        ValueError: an ``input_rank`` other than 4 or 2.
    """
    if not (isinstance(piece, type) and issubclass(piece, Network)):
        raise TypeError(f"{piece!r} is not a subclass of vdm.nets.Network")
    if not hasattr(piece, "input_rank"):
        raise TypeError(f"{piece.__name__} does not declare input_rank (4: images [B, H, W, C], 2: vectors [B, D])")
    if piece.input_rank not in INPUT_RANKS:
        raise ValueError(f"{piece.__name__}.input_rank={piece.input_rank!r}: must be 4 (images) or 2 (vectors)")
    if inspect.isabstract(piece):
        raise TypeError(f"{piece.__name__} does not define {', '.join(sorted(piece.__abstractmethods__))}")
    init = inspect.signature(piece.__init__).parameters
    for argument in ("context", "rngs"):
        if not _positional_or_keyword(init, argument):
            raise TypeError(f"{piece.__name__}.__init__ does not take {argument!r} (Net(context, *, ..., rngs))")
    try:
        inspect.signature(piece.__call__).bind(None, "z", "gamma", None, dropout_rng=None)
    except TypeError as e:
        raise TypeError(f"{piece.__name__}.__call__ does not take (z, gamma, cond=None, *, dropout_rng=None): "
                        f"{e}") from None


NETWORKS: registry.Registry[type[Network]] = registry.Registry("network", check_contract)


def as_example(example: Example | Mapping | None) -> Example:
    """``example`` as an :class:`Example`: ``None`` is the default one, a dict gives its fields.

    Args:
        example: an :class:`Example`, a dict with any of ``kwargs`` and ``shape``, or ``None``.

    Raises:
        TypeError: another type, or a dict with other keys.
    """
    if example is None:
        return Example()
    if isinstance(example, Example):
        return example
    fields = [f.name for f in dataclasses.fields(Example)]
    if isinstance(example, Mapping) and set(example) <= set(fields):
        return Example(**example)
    raise TypeError(f"example={example!r}: must be a vdm.nets.Example, a dict with keys among "
                    f"{', '.join(fields)}, or None")


def _as_example(name: str, example: Example | Mapping | None) -> Example | None:
    try:
        return None if example is None else as_example(example)
    except TypeError as e:
        raise registry.RegistrationError(f"network {name!r}: {e}") from None


def register(name: str, *, example: Example | Mapping | None = None):
    """Register a network class in :data:`NETWORKS` under ``name``: a class decorator.

    Example::

        @nets.register("my_net", example=nets.Example(kwargs={"width": 8}))
        class MyNet(nets.Network):
            input_rank = 4
            def __init__(self, context, *, width=64, rngs): ...
            def __call__(self, z, gamma, cond=None, *, dropout_rng=None): ...

    Args:
        name: the name ``config.model.network`` (or ``model.mean_encoder``) gives.
        example: what its contract checks (``vdm.testing.network``) build: an :class:`Example` (or a dict of
            its fields, ``{"kwargs": {...}, "shape": (...)}``); ``None``: the network's defaults, at the shape of
            its ``input_rank``.

    Returns:
        The decorator; it returns the class unchanged.

    Raises:
        vdm.registry.RegistrationError: the name is taken, the class fails :func:`check_contract`, or the
            example is of another type.
    """
    return NETWORKS.register(name, example=_as_example(name, example))


def lookup(name: str) -> type[Network]:
    """The network class registered as ``name``.

    Raises:
        ValueError: ``unknown network 'name'; valid names: ...``.
    """
    return NETWORKS.lookup(name)


def build(name: str, context: NetworkContext, *, rngs: nnx.Rngs, **kwargs: Any) -> Network:
    """The network registered as ``name``, built for ``context`` with its hyper-parameters ``kwargs``.

    Example: ``build("unet", NetworkContext((28, 28, 1)), channels=32, num_blocks=4, rngs=nnx.Rngs(0))``.

    Raises:
        ValueError: an unknown name (or whatever the network raises for its arguments).
    """
    return lookup(name)(context, rngs=rngs, **kwargs)
