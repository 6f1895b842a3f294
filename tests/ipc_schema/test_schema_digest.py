"""The protocol's model digest (PROTOCOL.md, ``load``): one definition, as specified."""

import hashlib

import pytest

from npud.ipc_schema import digest


def by_the_spec(data: bytes) -> bytes:
    chunks = [hashlib.sha256(data[i:i + (16 << 20)]).digest() for i in range(0, max(len(data), 1), 16 << 20)]
    return hashlib.sha256(len(data).to_bytes(8, "little") + b"".join(chunks)).digest()


@pytest.mark.parametrize("size", [0, 1, (16 << 20) - 1, 16 << 20, (16 << 20) + 1, (40 << 20) + 3])
def test_digest_follows_the_protocol(size):
    data = bytes(range(256)) * (size // 256) + b"\x07" * (size % 256)
    assert digest.model_digest(data) == by_the_spec(data)


def test_copy_to_receives_the_bytes_it_hashed():
    data = bytearray(b"\x01" * ((16 << 20) + 5))
    copy = bytearray(len(data))
    assert digest.model_digest(data, copy) == by_the_spec(bytes(data))
    assert copy == data


def test_client_and_daemon_share_one_definition():
    from npu import ray
    from npud import compile_cache

    assert ray.model_digest is digest.model_digest is compile_cache.model_digest
