"""Trajectory shards written as they fill and read back memory-mapped."""

import pytest
import torch

from repro.agd.trajectories import FIELDS, ShardWriter, TrajectoryStore, load_trajectories
from repro.core.errors import ReproInputError
from repro.core.io import map_tensors, save_tensors


def batch(start, n):
    rows = torch.arange(start, start + n)
    return dict(
        x_t=rows[:, None, None, None].float().expand(n, 1, 2, 2).clone(),
        t=rows,
        labels=rows % 10,
        w=rows.float() / 7,
        eps=-rows[:, None, None, None].float().expand(n, 1, 2, 2).clone(),
    )


@pytest.fixture
def store_dir(tmp_path):
    writer = ShardWriter(tmp_path / "traj", shard_size=16, meta={"kind": "cfg"})
    start = 0
    for n in (5, 30, 1, 9):  # batches that straddle shard boundaries
        writer.add(**batch(start, n))
        start += n
    assert writer.close() == 45
    return tmp_path / "traj"


def test_writer_cuts_shards_of_the_requested_size(store_dir):
    shards = sorted(store_dir.glob("shard_*.safetensors"))
    assert [len(map_tensors(p)[0]["t"]) for p in shards] == [16, 16, 13]


def test_store_gathers_any_rows_in_order(store_dir):
    store = TrajectoryStore(store_dir)
    assert len(store) == 45
    rows = torch.tensor([44, 0, 16, 15, 16, 31, 32])
    got = store[rows]
    want = batch(0, 45)
    for key in FIELDS:
        assert torch.equal(got[key], want[key][rows]), key
    assert torch.equal(load_trajectories(store_dir)["t"], torch.arange(45))
    with pytest.raises(IndexError):
        store[torch.tensor([45])]


def test_map_tensors_refuses_a_shard_cut_inside_its_data(store_dir):
    shard = store_dir / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(ReproInputError, match="shard_00001.safetensors.*truncated"):
        TrajectoryStore(store_dir)


def test_map_tensors_round_trips_every_dtype(tmp_path):
    tensors = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).bfloat16(),
        "f16": torch.randn(2, 2).half(),
        "i64": torch.arange(7),
        "u8": torch.arange(4, dtype=torch.uint8),
        "empty": torch.zeros(0, 3),
    }
    save_tensors(tmp_path / "a.safetensors", tensors, kind="test")
    mapped, meta = map_tensors(tmp_path / "a.safetensors", kind="test", required=("f32",))
    assert meta["repro_kind"] == "test"
    for key, value in tensors.items():
        assert torch.equal(mapped[key], value), key
    mapped["f32"][0, 0] = 1e6  # copy-on-write: the file keeps its value
    again, _ = map_tensors(tmp_path / "a.safetensors")
    assert torch.equal(again["f32"], tensors["f32"])
    with pytest.raises(ReproInputError, match="a.safetensors.*expected a 'other'"):
        map_tensors(tmp_path / "a.safetensors", kind="other")
