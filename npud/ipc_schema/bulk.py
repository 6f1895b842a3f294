"""One large binary field of a message as a ZeroMQ frame of its own (the daemon<->compiler messages).

A compile request carries the model and its reply the executable: 100 MB for a ResNet-50.  Packed
inside a msgpack map, each is copied into the map's buffer (which grows as it goes: ~150 ms for
100 MB) and out of it again on the other side.  As a frame of its own it is sent without a copy
(ZeroMQ's zero-copy send) and received as one buffer.  The map names the field under ``bulk``:

    frame 0: msgpack map without the field, plus {"bulk": field name}
    frame 1: the field's bytes
"""

from __future__ import annotations

import msgpack

BULK = "bulk"


class MalformedFrames(ValueError):
    """Frames that are not a message: not a msgpack map first, or a second frame no field claims."""


def to_frames(message: dict, field: str) -> list:
    """``message`` as frames: the map, then ``message[field]`` on its own if it is there."""
    if message.get(field) is None:
        return [msgpack.packb(message, use_bin_type=True)]
    head = {k: v for k, v in message.items() if k != field}
    head[BULK] = field
    return [msgpack.packb(head, use_bin_type=True), message[field]]


def from_frames(frames: list) -> dict:
    """The message ``to_frames`` made (the bulk field as the frame's bytes-like object), or
    MalformedFrames saying what is wrong."""
    if not 1 <= len(frames) <= 2:
        raise MalformedFrames(f"{len(frames)} frames; a message has one, or two with a bulk field")
    try:
        message = msgpack.unpackb(frames[0], raw=False)
    except Exception as exc:
        raise MalformedFrames(f"the first frame is not msgpack ({exc})") from None
    if type(message) is not dict:
        raise MalformedFrames(f"the first frame is a {type(message).__name__}, not a map")
    field = message.pop(BULK, None)
    if (field is None) != (len(frames) == 1) or (field is not None and (type(field) is not str or field in message)):
        raise MalformedFrames(f"bulk field {field!r} does not match the {len(frames) - 1} frame(s) after the map")
    if field is not None:
        message[field] = frames[1]
    return message
