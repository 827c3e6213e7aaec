"""The ``.vdmz`` file: a header, a checksum of everything after the magic, and the ANS words.

Layout (all integers little-endian)::

    b"VDMZ"                 4 bytes, the magic
    version                 uint16 (``VERSION``)
    header length           uint32
    header                  UTF-8 JSON (``Header``): the model's fingerprint and step, num_steps, the grid,
                            the images' shape, count and levels, the labels, the chunking, the initial words and
                            the sha256 of the decoded images
    checksum                32 bytes: sha256 of version, header length, header and payload
    payload                 the ANS coder's words, uint32

A file from a newer format, a truncated file, an altered byte anywhere after the magic (the checksum) and decoded
images that differ from those compressed (their sha256: another platform's arithmetic) are each one
``CodecError`` line naming which.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import struct

import numpy as np

MAGIC = b"VDMZ"
VERSION = 1
_PREFIX = struct.Struct("<HI")  # version, header length


class CodecError(ValueError):
    """A file the codec cannot decode, or input it cannot code; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Header:
    """What a decoder needs besides the model and the words.

    Attributes:
        fingerprint: the model's fingerprint (``vdm.codec.Pieces.fingerprint``).
        step: the checkpoint's step.
        num_steps: T, the discrete-time model's steps.
        grid: the discretisation of the latents (``vdm.codec.discretise.Grid`` as a dict).
        shape: one image's shape.
        count: the number of images.
        vocab_size: the pixel levels V.
        batch_size: images coded per network call (the chunks, coded one after another).
        initial_words: the random words the stream starts from (``vdm.codec.discretise.initial_words``).
        labels: the class of each image (a conditional model), or None.
        images_sha256: hex sha256 of the images (uint8, C order) and their labels.
    """

    fingerprint: str
    step: int
    num_steps: int
    grid: dict
    shape: tuple
    count: int
    vocab_size: int
    batch_size: int
    initial_words: int
    labels: tuple | None
    images_sha256: str


def images_digest(images: np.ndarray, labels: np.ndarray | None) -> str:
    """The hex sha256 of ``images`` (uint8 [N, ...]) and, where given, their ``labels`` (as int64)."""
    h = hashlib.sha256(np.ascontiguousarray(images, np.uint8).tobytes())
    h.update(str(images.shape).encode())
    if labels is not None:
        h.update(np.ascontiguousarray(labels, np.int64).tobytes())
    return h.hexdigest()


def pack(header: Header, words: np.ndarray) -> bytes:
    """The file's bytes for ``header`` and the coder's ``words`` (uint32 [n])."""
    fields = dataclasses.asdict(header)
    fields["shape"] = list(header.shape)
    fields["labels"] = None if header.labels is None else list(header.labels)
    text = json.dumps(fields, sort_keys=True).encode()
    body = _PREFIX.pack(VERSION, len(text)) + text
    payload = np.ascontiguousarray(words, "<u4").tobytes()
    return MAGIC + body + hashlib.sha256(body + payload).digest() + payload


def unpack(data: bytes) -> tuple[Header, np.ndarray]:
    """(the header, the words uint32 [n]) of a file's bytes.

    Raises:
        CodecError: not a ``.vdmz`` file (the magic), a newer format version, a truncated file, or bytes that fail
            the checksum (an altered header or payload).
    """
    data = bytes(data)
    if data[:4] != MAGIC:
        raise CodecError("not a .vdmz file (its first bytes are not b'VDMZ')")
    if len(data) < 4 + _PREFIX.size:
        raise CodecError("truncated file: it ends inside its header")
    version, length = _PREFIX.unpack_from(data, 4)
    if version > VERSION:
        raise CodecError(f"format version {version} is newer than this library's ({VERSION}): upgrade vdm to read it")
    start = 4 + _PREFIX.size
    if len(data) < start + length + 32:
        raise CodecError("truncated file: it ends inside its header or checksum")
    body, digest, payload = data[4:start + length], data[start + length:start + length + 32], data[start + length + 32:]
    if len(payload) % 4 or hashlib.sha256(body + payload).digest() != digest:
        raise CodecError("damaged or truncated file: its checksum does not match its contents")
    try:
        fields = json.loads(data[start:start + length].decode())
        fields["shape"] = tuple(fields["shape"])
        fields["labels"] = None if fields["labels"] is None else tuple(fields["labels"])
        header = Header(**fields)
    except (ValueError, TypeError, KeyError) as e:  # a checksum-valid header from a broken writer
        raise CodecError(f"unreadable header ({e})") from None
    return header, np.frombuffer(payload, "<u4").astype(np.uint32)
