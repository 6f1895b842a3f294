import pytest

from npud.emulator.config import PRESETS, DeviceConfig, make_config


def test_presets_exist_and_differ():
    assert {"edge", "server"} <= set(PRESETS)
    edge, server = PRESETS["edge"], PRESETS["server"]
    assert (edge.cores, edge.mac_rows, edge.mac_cols, edge.sram_bytes) == (1, 16, 16, 256 * 1024)
    assert server.cores == 4 and server.mac_rows == 32
    assert edge.target_hash() != server.target_hash()


def test_round_trip_and_stable_hash():
    for cfg in PRESETS.values():
        d = cfg.to_dict()
        assert DeviceConfig.from_dict(d) == cfg
        assert len(cfg.target_hash()) == 8
        assert DeviceConfig.from_dict(d).target_hash() == cfg.target_hash()


def test_hash_tracks_stream_relevant_parameters_only():
    edge = PRESETS["edge"]
    assert make_config("edge", sram_bytes=128 * 1024).target_hash() != edge.target_hash()
    assert make_config("edge", memory_bytes=1 << 20).target_hash() == edge.target_hash()


@pytest.mark.parametrize("key,value", [
    ("cores", 0), ("sram_bytes", -1), ("page_size", 3000), ("page_size", 2048),
    ("macs_per_cycle", {"int8": 1}), ("clock_mhz", "fast"), ("hw_contexts", 1.5),
])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        make_config("edge", **{key: value})


def test_unknown_preset_and_key():
    with pytest.raises(ValueError, match="nope"):
        make_config("nope")
    with pytest.raises(ValueError, match="turbo"):
        make_config("edge", turbo=True)
    d = PRESETS["edge"].to_dict()
    d["extra"] = 1
    with pytest.raises(ValueError, match="extra"):
        DeviceConfig.from_dict(d)
    del d["extra"], d["cores"]
    with pytest.raises(ValueError, match="cores"):
        DeviceConfig.from_dict(d)
