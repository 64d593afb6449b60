"""``bench/bench_codecs.py`` on the CPU: one small run end to end, and its byte accounting."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from tests import bench_scripts


@pytest.fixture(scope="module")
def bench_codecs():
    return bench_scripts.load("bench_codecs")


def test_cpu_run_writes_every_column_with_consistent_figures(bench_codecs, tmp_path):
    rc = bench_codecs.main(
        ["--sizes", "4K", "--channels", "128", "--codecs", "int8_token", "bool1", "--repeats", "2",
         "--warmup", "1", "--device", "cpu", "--out", str(tmp_path), "--tag", "t"]
    )
    assert rc == 0
    with open(tmp_path / "codecs_t.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == bench_codecs.COLUMNS
    meta = json.loads((tmp_path / "codecs_t.json").read_text())
    assert len(meta["rows"]) == len(rows)
    codecs = bench_codecs.import_codecs()
    for row in meta["rows"]:
        codec = codecs.get_codec(row["codec"])
        numel = row["numel"]
        assert numel == 4096
        if codec.lossless:
            in_bytes, shape, dtype = numel, [numel], torch.bool
        else:
            in_bytes, shape, dtype = 4 * numel, [numel // 128, 128], torch.float32
        payload = codec.compressed_nbytes(shape, dtype)
        assert row["ratio"] == round(in_bytes / payload, 3)
        # GB/s is the bytes moved over the median time (both rounded in the file).
        assert row["compress_gbps"] == pytest.approx((in_bytes + payload) / (row["compress_ms"] / 1e3) / 1e9, rel=0.02, abs=0.006)
        assert row["decompress_gbps"] == pytest.approx((in_bytes + payload) / (row["decompress_ms"] / 1e3) / 1e9, rel=0.02, abs=0.006)
        # On the CPU the host time is the wall time: the same samples.
        assert row["compress_host_us"] == pytest.approx(row["compress_ms"] * 1e3, rel=0.01, abs=0.2)
        assert row["decompress_host_us"] == pytest.approx(row["decompress_ms"] * 1e3, rel=0.01, abs=0.2)
        assert row["compress_of_copy"] > 0 and row["decompress_of_copy"] > 0
