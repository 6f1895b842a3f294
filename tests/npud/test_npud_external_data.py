"""ONNX external data through the daemon: never a file-disclosure hole, and still usable.

The attack (issue 13.1): a model whose initializer names an external data file by a relative
location was resolved against the compiler worker's working directory, so an unprivileged
client read root's files byte for byte through its model's outputs.  Here the daemon runs as
root from a directory holding a root-only secret; a client of another uid sends models naming
it every way it can; none may compile, and no answer may carry the secret or its size.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper

import npu
from npud.ipc_schema import model_container
from npu import model_source
from npu.local import LocalDaemon
from tests.asuser import needs_root, npu_error, open_to_everyone, run_as

NOBODY = 65534
SECRET = np.arange(64, dtype=np.float32).reshape(8, 8) * 1.5 + 7   # 256 bytes


def identity_model(location: str | None, w: np.ndarray = SECRET) -> onnx.ModelProto:
    """y = x @ w with x the identity: the output *is* w.  With ``location``, w's data is an
    external reference to it instead of inline."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(w.shape[:1]) * 2)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [w.shape[0], w.shape[1]])
    init = numpy_helper.from_array(w, "w")
    if location is not None:
        external_data_helper.set_external_data(init, location, 0, w.nbytes)
        init.ClearField("raw_data")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g", [x], [y], [init])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def root_daemon(tmp_path_factory):
    """A daemon started from a directory that holds ``secret/weights.bin`` (root-only, 0600 in a
    0700 directory), and ``link`` (a symlink to it): what relative locations would reach."""
    home = tmp_path_factory.mktemp("npud-cwd")
    os.chmod(home, 0o755)
    secret_dir = home / "secret"
    secret_dir.mkdir(mode=0o700)
    secret = secret_dir / "weights.bin"
    secret.write_bytes(SECRET.tobytes())
    os.chmod(secret, 0o600)
    os.symlink(secret, home / "link")
    before = os.getcwd()
    os.chdir(home)
    try:
        d = LocalDaemon()
    finally:
        os.chdir(before)
    open_to_everyone(d)
    yield d, secret
    d.stop()


def _attempt(endpoint: str, model: bytes) -> dict | None:
    with npu.connect(endpoint) as c:
        return npu_error(c.load, model)


@needs_root
@pytest.mark.parametrize("how", ["relative", "symlink", "absolute", "dotdot", "file-url"])
def test_another_uid_cannot_read_the_daemons_files_through_external_data(root_daemon, how):
    daemon, secret = root_daemon
    location = {"relative": "secret/weights.bin", "symlink": "link", "absolute": str(secret),
                "dotdot": "../" * 8 + str(secret).lstrip("/"), "file-url": f"file://{secret}"}[how]
    model = identity_model(location).SerializeToString()
    err = run_as(NOBODY, NOBODY, _attempt, daemon.endpoint, model)
    assert err is not None, f"a model naming {location!r} loaded"
    assert err["code"] == "EINVAL"
    assert "initializer 'w'" in err["message"] and "never opens files" in err["message"]
    assert str(SECRET.nbytes) not in err["message"]          # not even the file's size


@needs_root
def test_the_daemon_stays_serving_after_the_attempts(root_daemon):
    daemon, _ = root_daemon
    with npu.connect(daemon.endpoint) as c:
        model = c.load(identity_model(None, np.eye(8, dtype=np.float32)))
        np.testing.assert_array_equal(model.run({"x": np.eye(8, dtype=np.float32)})["y"], np.eye(8))


def save_with_external_data(path, w: np.ndarray) -> None:
    onnx.save(identity_model(None, w), str(path), save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.data", size_threshold=0)


def test_a_model_with_external_data_next_to_it_loads_and_runs(client, tmp_path):
    w = np.random.default_rng(1).standard_normal((8, 8)).astype(np.float32)
    path = tmp_path / "model.onnx"
    save_with_external_data(path, w)
    assert os.path.getsize(path) < w.nbytes       # the weights really are outside the model file
    model = client.load(path)
    out = model.run({"x": np.eye(8, dtype=np.float32)})["y"]
    np.testing.assert_array_equal(out, w)


def test_a_changed_external_data_file_is_sent_again(client, tmp_path):
    """The client's digest memo must not serve the old weights when only the data file changed."""
    path = tmp_path / "model.onnx"
    save_with_external_data(path, np.ones((8, 8), np.float32))
    client.load(path)
    data = tmp_path / "model.data"
    stat = os.stat(path)
    data.write_bytes((np.full((8, 8), 3, np.float32)).tobytes())   # same size, new mtime
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    out = client.load(path).run({"x": np.eye(8, dtype=np.float32)})["y"]
    np.testing.assert_array_equal(out, np.full((8, 8), 3, np.float32))


def test_external_data_outside_the_models_directory_is_refused_by_the_client(client, tmp_path):
    """As onnx.load does: a model file cannot make the client read (and send) other files."""
    model = identity_model("../elsewhere.bin")
    (tmp_path / "elsewhere.bin").write_bytes(SECRET.tobytes())
    sub = tmp_path / "m"
    sub.mkdir()
    onnx.save(model, str(sub / "model.onnx"))
    with pytest.raises(npu.NpuError) as e:
        client.load(sub / "model.onnx")
    assert e.value.code == "EINVAL" and "tensor 'w'" in e.value.message


def test_a_model_past_the_protobuf_limit_travels_as_a_container(client, tmp_path):
    """Past 2 GiB the data goes in a container's data section; shown here with a lower limit."""
    w = np.random.default_rng(2).standard_normal((8, 8)).astype(np.float32)
    path = tmp_path / "model.onnx"
    save_with_external_data(path, w)
    model = onnx.load(str(path), load_external_data=False)
    packed = model_source.self_contained(model, str(tmp_path), limit=model.ByteSize() + 64)
    assert model_container.is_container(packed)
    out = client.load(packed).run({"x": np.eye(8, dtype=np.float32)})["y"]
    np.testing.assert_array_equal(out, w)
