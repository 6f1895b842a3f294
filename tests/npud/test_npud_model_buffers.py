"""A model larger than one buffer reaches the daemon in several staging buffers (protocol 1.8).

The daemon's ``max_buffer_bytes`` bounds one allocation; a model past it (an ONNX model with
2+ GiB of external data against the default 1 GiB) is split by the client over several
buffers named in order by ``model_buffers``, hashed and copied by the daemon as one model.
Shown here with a small ``max_buffer_bytes`` so that a 20 MiB model needs three buffers.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import npu
from npu.local import LocalDaemon
from npu.session import staging_parts
from npud.ipc_schema.digest import model_digest

MiB = 1 << 20
BUFFER = 8 * MiB


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    cfg = tmp_path_factory.mktemp("cfg") / "npud.toml"
    cfg.write_text(f'[limits]\nmax_buffer_bytes = {BUFFER}\nmemory_quota = "64MiB"\n')
    d = LocalDaemon("--config", str(cfg))
    yield d
    assert d.stop() == 0


def matmul_model(k: int = 2560, n: int = 2048) -> tuple[bytes, np.ndarray]:
    """y = x @ w with a (k, n) float32 weight: 20 MiB of model by default."""
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(), w


@pytest.fixture(scope="module")
def model():
    return matmul_model()


def test_the_client_splits_past_max_buffer_bytes():
    assert staging_parts(5, 8) == [(0, 5)]
    assert staging_parts(8 * MiB, 8 * MiB) == [(0, 8 * MiB)]
    assert staging_parts(20 * MiB, 8 * MiB) == [(0, 8 * MiB), (8 * MiB, 16 * MiB), (16 * MiB, 20 * MiB)]
    # buffers but the last stay whole pages of any device, whatever the limit
    assert all(b % 65536 == 0 for _, b in staging_parts(10**8, 10**7)[:-1])


def test_a_model_over_one_buffer_loads_runs_and_reloads_by_digest(daemon, model):
    data, w = model
    assert len(data) > BUFFER * 2
    x = np.random.default_rng(1).standard_normal((1, w.shape[0])).astype(np.float32)
    with npu.connect(daemon.endpoint) as c:
        loaded = c.load(data)
        np.testing.assert_allclose(loaded.run({"x": x})["y"], x @ w, rtol=1e-4, atol=1e-3)
        assert c.check(data) == []
    with npu.connect(daemon.endpoint) as c:   # held compiled under the protocol's digest of all the bytes
        again = c._request("load", {"device": 0, "model_digest": model_digest(data)})
        assert again["cached"] and again["model_digest"] == model_digest(data)


def _staged(c, data: bytes) -> list:
    """``data`` written into buffers as the client would stage it."""
    out = []
    for start, stop in staging_parts(len(data), BUFFER):
        out.append(c.alloc(stop - start))
        out[-1].write(data[start:stop])
    return out


def _refusal(c, **source) -> npu.NpuError:
    with pytest.raises(npu.NpuError) as e:
        c._request("load", {"device": 0, **source})
    return e.value


def test_malformed_buffer_lists_are_refused_naming_the_problem(daemon, model):
    data, _w = model
    with npu.connect(daemon.endpoint) as other, npu.connect(daemon.endpoint) as c:
        foreign = [other.alloc(4096) for _ in range(8)][-1]
        parts = _staged(c, data)
        handles = [b.handle for b in parts]
        assert foreign.handle not in handles
        size = len(data)
        cases = {
            "listed twice": dict(model_buffers=[handles[0], handles[0], handles[2]], model_size=size),
            f"no buffer with handle {foreign.handle}": dict(model_buffers=[*handles[:2], foreign.handle],
                                                            model_size=size),
            "does not add up": dict(model_buffers=handles, model_size=size + BUFFER),
            "would hold 0": dict(model_buffers=handles, model_size=2 * BUFFER),
            "needs model_size": dict(model_buffers=handles),
            "exactly one of": dict(model_buffers=handles, model_size=size, model=b"x"),
        }
        for words, source in cases.items():
            err = _refusal(c, **source)
            assert err.code == "EINVAL" and words in err.message, (words, err)
        err = _refusal(c, model_buffers=[], model_size=size)
        assert err.code in ("EINVAL", "EPROTO") and "model_buffers" in err.message
        # in order: the same buffers out of order are another model (which does not parse)
        err = _refusal(c, model_buffers=[handles[1], handles[0], handles[2]], model_size=size)
        assert err.code == "EINVAL" and "compile error" in err.message
        assert c._request("load", {"device": 0, "model_buffers": handles, "model_size": size})["model"]


def test_a_model_over_the_quota_is_edquot_and_leaves_no_staging_buffer(daemon):
    with npu.connect(daemon.endpoint) as c:
        with pytest.raises(npu.NpuError) as e:
            c.load(bytes(80 * MiB))          # more than the session's 64 MiB quota
        assert e.value.code == "EDQUOT" and "quota" in e.value.message
        held = [c.alloc(BUFFER) for _ in range(8)]   # the whole quota: nothing was left behind
        assert len(held) == 8


def test_the_digest_of_parts_is_that_of_their_concatenation_and_copies_them():
    data = np.random.default_rng(2).integers(0, 256, 40 * MiB + 5, np.uint8).tobytes()
    cuts = [0, 3, 17 * MiB, 17 * MiB, 33 * MiB + 1, len(data)]     # across 16 MiB chunks, one empty
    parts = [data[a:b] for a, b in zip(cuts, cuts[1:])]
    copy = bytearray(len(data))
    assert model_digest(parts, copy) == model_digest(data) and copy == data
    assert model_digest([]) == model_digest(b"") == model_digest([b""])


def _anon_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def test_the_daemon_lets_go_of_its_copy_of_the_model_while_the_worker_compiles(tmp_path):
    """The daemon copies a model sent in buffers (the bytes it hashes must be those it compiles):
    held until the executable came back, a 2 GiB model's copy and executable were in memory at
    once.  It is freed once sent: during a slow compile the daemon holds no copy of it."""
    import threading
    import time

    d = LocalDaemon("--test-mode", "--cache-dir", str(tmp_path / "cache"))
    size = 200 * MiB
    try:
        with npu.connect(d.endpoint, timeout=120) as c:
            c.load(matmul_model(64, 64)[0])                      # the worker is up, the daemon warm
            c.inject_fault("slow_compile", slow_ms=4000)
            before = _anon_rss(d.process.pid)
            failed = []
            loading = threading.Thread(target=lambda: failed.append(pytest.raises(npu.NpuError, c.load, bytes(size))))
            loading.start()
            peak_during = 0
            deadline = time.monotonic() + 60
            while loading.is_alive() and time.monotonic() < deadline:
                peak_during = max(peak_during, _anon_rss(d.process.pid))  # includes the copy while it is made
                time.sleep(0.05)
                if peak_during - before > size // 2:
                    break
            time.sleep(2.0)                       # the worker sleeps 4 s before compiling: still waiting
            during = _anon_rss(d.process.pid)
            loading.join(60)
            assert failed and failed[0].value.code == "EINVAL"   # zeros are no ONNX model
        assert peak_during - before > size // 2, "the daemon never made its copy"
        assert during - before < size // 4, f"{(during - before) >> 20} MiB still held while compiling"
    finally:
        d.stop()
