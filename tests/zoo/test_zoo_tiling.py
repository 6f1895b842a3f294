"""Tiling fits `edge`'s 256 KiB SRAM where the plan's own arithmetic said it did not: a reduction
plan counted its output as large as its input (ShuffleNetV2's ReduceMean at 224x224 was refused
with "tile plan needs 401408 bytes of SRAM")."""

from zoo_models import compare, global_mean


def test_reduce_mean_over_a_large_map_fits_edge_sram():
    row = compare(global_mean())
    assert row["match"], row
