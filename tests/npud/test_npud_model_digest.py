"""Loading by digest: a repeated load of a model file sends 32 bytes, not the model.

A digest alone never lets a user run a model it has not sent itself.
"""

import os

import numpy as np
import onnx
import pytest

import npu
from examples import tiny_cnn
from npu.local import LocalDaemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = LocalDaemon("--cache-dir", str(tmp_path_factory.mktemp("cache")))
    yield d
    d.stop()


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(tiny_cnn.build(), path)
    return path


def _load_by_digest(client, digest, **extra):
    return client._request("load", {"device": 0, "model_digest": digest, **extra})


def test_a_repeated_load_of_a_file_sends_only_its_digest(daemon, model_path):
    with npu.connect(daemon.endpoint) as client:
        first = client.load(model_path)
        assert len(client._digests._known) == 1
        _version, digest, _externals = next(iter(client._digests._known.values()))
        second = client.load(model_path)
        assert second.cached
        x = np.random.default_rng(0).standard_normal(tiny_cnn.INPUT_SHAPE).astype(np.float32)
        np.testing.assert_allclose(second.run(x)["probs"], first.run(x)["probs"])
        # The same digest by hand loads the model without any bytes.
        info = _load_by_digest(client, digest)
        assert info["cached"] and info["model_digest"] == digest


def test_a_changed_file_is_sent_again(daemon, model_path):
    with npu.connect(daemon.endpoint) as client:
        client.load(model_path)
        [(_, old, _)] = client._digests._known.values()
        onnx.save(tiny_cnn.build(seed=8), model_path)   # other weights, same path
        st = os.stat(model_path)
        os.utime(model_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        model = client.load(model_path)
        assert not model.cached            # new bytes: compiled, not served by the old digest
        [(_, new, _)] = client._digests._known.values()   # the file's entry was replaced, not added to
        assert new != old


def test_an_unknown_digest_or_options_mismatch_asks_for_the_bytes(daemon, model_path):
    with npu.connect(daemon.endpoint) as client:
        with pytest.raises(npu.NotFound, match="send the model's bytes"):
            _load_by_digest(client, b"\x01" * 32)
        client.load(model_path)
        _version, digest, _externals = next(iter(client._digests._known.values()))
        with pytest.raises(npu.NotFound):   # compiled with other options: another cache entry
            _load_by_digest(client, digest, options={"name": "other"})


@pytest.mark.parametrize("args, problem", [
    ({"model_digest": b"\x00" * 31}, "model_digest"),
    ({"model_digest": "ab" * 16}, "model_digest"),
    ({"model_digest": b"\x00" * 32, "model": b"x"}, "exactly one of"),
])
def test_malformed_digest_loads_are_refused(daemon, args, problem):
    with npu.connect(daemon.endpoint) as client:
        with pytest.raises(npu.InvalidArgument, match=problem):
            client._request("load", {"device": 0, **args})
        client.ping()  # the session is still usable


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_another_user_cannot_load_by_digest_alone(daemon, model_path):
    with npu.connect(daemon.endpoint) as client:
        client.load(model_path)
        _version, digest, _externals = next(iter(client._digests._known.values()))
    os.chmod(os.path.dirname(daemon.endpoint[len("ipc://"):]), 0o755)
    for path in (daemon.endpoint[len("ipc://"):], daemon.endpoint[len("ipc://"):-len(".sock")] + ".fds"):
        os.chmod(path, 0o666)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nobody, who has never sent this model
        os.close(read)
        code = "unexpected"
        try:
            os.setgid(65534)
            os.setuid(65534)
            with npu.connect(daemon.endpoint) as other:
                try:
                    _load_by_digest(other, digest)
                    code = "loaded"
                except npu.NotFound:
                    code = "refused"
        except BaseException as exc:  # report, never raise, in a forked child
            code = f"error {exc!r}"
        os.write(write, code.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        outcome = f.read()
    os.waitpid(pid, 0)
    assert outcome == "refused"


async def test_presented_digests_are_bounded_least_recent_first(monkeypatch):
    """The table of digests a user has sent forgets the least recently presented past its bound;
    a forgotten digest is ENOENT, which makes the client send the bytes again."""
    from npud.ipc_schema.errors import RequestError
    from npud import models

    monkeypatch.setattr(models, "PRESENTED_KEPT", 3)
    loader = models.ModelLoader(pool=None, cache=None)
    for i in range(5):
        loader.presented(bytes([i]) * 32, uid=1000)
    loader.presented(bytes([2]) * 32, uid=1001)          # presented again: the most recent now
    assert list(loader._presented) == [bytes([3]) * 32, bytes([4]) * 32, bytes([2]) * 32]
    with pytest.raises(RequestError) as info:
        await loader.by_digest(bytes([0]) * 32, {}, None, uid=1000)
    assert info.value.info.code.value == "ENOENT" and "send the model's bytes" in info.value.info.message


def test_presented_digests_match_a_least_recently_presented_table():
    """The preallocated table answers as a dict kept in presentation order would, through
    evictions (the index's backward-shift deletions) and second users."""
    import random
    from collections import OrderedDict

    from npud.models import PresentedDigests

    rng = random.Random(7)
    table, model = PresentedDigests(64), OrderedDict()
    # 16-bit digests' first bytes collide often: long probe runs, shifts across the table's wrap.
    pool = [rng.randbytes(2) + bytes(30) for _ in range(300)]
    for _ in range(20_000):
        digest, uid = rng.choice(pool), rng.choice((1000, 1000, 1000, 1001))
        table.add(digest, uid)
        users = model.pop(digest, ())
        model[digest] = users if uid in users else (*users, uid)
        if len(model) > 64:
            model.popitem(last=False)
        probe = rng.choice(pool)
        assert sorted(table.users(probe)) == sorted(model.get(probe, ()))
    assert list(table) == list(model) and len(table) == 64
    assert table.users(b"short") == ()


def test_presenting_digests_makes_no_objects_per_digest():
    """A dict of bytes to tuples took ~200 bytes in three small objects per digest, made under
    load and outliving it: they kept pymalloc's arenas from being returned."""
    import tracemalloc

    from npud import models

    loader = models.ModelLoader(pool=None, cache=None)
    digests = [os.urandom(32) for _ in range(10_000)]
    tracemalloc.start()
    for digest in digests:
        loader.presented(digest, uid=1000)
    grown, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert grown < 64 << 10, f"{grown} bytes for 10,000 digests"
    assert all(loader._presented.users(d) == (1000,) for d in digests[-100:])
