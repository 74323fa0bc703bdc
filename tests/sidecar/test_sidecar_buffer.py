"""The disk buffer: append, batches, acks, reopen after a crash, the size cap."""

from __future__ import annotations

import os
from pathlib import Path

from stanchion.sidecar import BufferPolicy, DiskBuffer


def _lines(start: int, n: int, width: int = 20) -> bytes:
    return b"".join(b'{"n":%d,"pad":"%s"}\n' % (i, b"x" * width) for i in range(start, start + n))


def test_batches_acks_and_reopen(tmp_path: Path) -> None:
    policy = BufferPolicy(max_bytes=1 << 20, batch_max_records=3, batch_max_bytes=1 << 16)
    b = DiskBuffer(tmp_path, policy)
    b.append(_lines(0, 5), 5)
    first = b.read(3, 1 << 16)
    assert first is not None and first.count == 3 and first.data == _lines(0, 3)
    b.ack(first)
    second = b.read(3, 1 << 16)
    assert second is not None and second.count == 2
    b.close()  # crash before the second batch was acknowledged
    b = DiskBuffer(tmp_path, policy)
    assert b.pending_records == 2
    again = b.read(10, 1 << 16)
    assert again is not None and again.data == _lines(3, 2)  # re-sent, nothing else
    b.rewind()
    assert b.read(10, 1 << 16) == again
    b.ack(again)
    assert b.read(10, 1 << 16) is None and b.pending_records == 0
    b.close()


def test_partial_line_from_a_cut_write_is_dropped_on_reopen(tmp_path: Path) -> None:
    policy = BufferPolicy(max_bytes=1 << 20)
    b = DiskBuffer(tmp_path, policy)
    b.append(_lines(0, 2), 2)
    b.close()
    seg = sorted(tmp_path.glob("*.seg"))[-1]
    with open(seg, "ab") as f:
        f.write(b'{"n":2,"pa')
    b = DiskBuffer(tmp_path, policy)
    batch = b.read(10, 1 << 20)
    assert batch is not None and batch.data == _lines(0, 2)
    b.close()


def test_cap_drops_oldest_segments_and_counts(tmp_path: Path) -> None:
    policy = BufferPolicy(max_bytes=256 * 1024)  # 32 KiB segments
    b = DiskBuffer(tmp_path, policy)
    total = 0
    for i in range(200):
        chunk = _lines(i * 50, 50)
        b.append(chunk, 50)
        total += 50
    on_disk = sum(os.path.getsize(p) for p in tmp_path.glob("*.seg"))
    assert on_disk <= 256 * 1024
    assert b.dropped_records > 0
    assert b.pending_records + b.dropped_records == total
    seen = 0
    last = -1
    while (batch := b.read(1000, 1 << 20)) is not None:
        nums = [int(line.split(b",")[0][5:]) for line in batch.data.splitlines()]
        assert nums == sorted(nums) and nums[0] > last  # the newest survive, in order
        last = nums[-1]
        seen += batch.count
        b.ack(batch)
    assert b.pending_records == 0 and last == total - 1
    b.close()


def test_one_line_longer_than_a_batch_is_sent_whole(tmp_path: Path) -> None:
    b = DiskBuffer(tmp_path, BufferPolicy(max_bytes=8 << 20))
    big = b'{"m":"' + b"y" * 300_000 + b'"}\n'
    b.append(big + _lines(0, 1), 2)
    batch = b.read(100, 1024)
    assert batch is not None and batch.data == big and batch.count == 1
    b.close()
