"""Pure cores: lines, multiline, parsers, records, policies, tail decisions, queries."""

from __future__ import annotations

import hashlib

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stanchion.errors import ConfigError
from stanchion.sidecar import (
    Backoff,
    BufferPolicy,
    LineParser,
    LineSplitter,
    LogQuery,
    LogRecord,
    Multiline,
    Pipeline,
    RestartPolicy,
    TailTracker,
)
from stanchion.sidecar._core import FileStat, fingerprint, parse_duration, parse_ts


def test_splitter_partial_line_waits_for_newline() -> None:
    s = LineSplitter(offset=100)
    assert s.feed(b"abc\nde") == [(100, b"abc", False)]
    assert s.pending_offset == 104
    assert s.feed(b"f\r\n") == [(104, b"def", False)]
    assert s.pending_offset == 109
    assert s.flush() is None


@given(st.lists(st.binary(max_size=40).filter(lambda b: b"\n" not in b), max_size=30), st.data())
def test_splitter_any_chunking_gives_the_same_lines(
    lines: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    s = LineSplitter(max_line_bytes=1000)
    out = []
    prev = 0
    for c in [*cuts, len(stream)]:
        out += s.feed(stream[prev:c])
        prev = c
    assert [line for _, line, _ in out] == [x[:-1] if x.endswith(b"\r") else x for x in lines]
    offsets = [o for o, _, _ in out]
    expected, pos = [], 0
    for line in lines:
        expected.append(pos)
        pos += len(line) + 1
    assert offsets == expected
    assert s.pending_offset == len(stream)


def test_one_megabyte_line_is_truncated_by_the_documented_rule() -> None:
    s = LineSplitter(max_line_bytes=1024)
    big = b"x" * (1024 * 1024)
    out = []
    for i in range(0, len(big), 65536):  # arrives in pieces, memory stays bounded
        out += s.feed(big[i : i + 65536])
        assert s.pending_bytes <= 1024
    out += s.feed(b"\nnext\n")
    assert out == [(0, b"x" * 1024, True), (len(big) + 1, b"next", False)]
    assert s.skipped_bytes == len(big) - 1024


def test_multiline_groups_a_stack_trace() -> None:
    m = Multiline(r"^\d{4}-")
    lines = [
        (0, b"2024-01-01 ERROR boom", False),
        (22, b"Traceback (most recent call last):", False),
        (57, b'  File "x.py", line 1', False),
        (79, b"2024-01-01 INFO next", False),
    ]
    done = m.push(lines, now=0.0)
    assert done == [
        (
            0,
            b'2024-01-01 ERROR boom\nTraceback (most recent call last):\n  File "x.py", line 1',
            False,
        )
    ]
    assert m.pending_offset == 79
    assert m.poll(0.5) is None
    assert m.poll(1.0) == (79, b"2024-01-01 INFO next", False)
    with pytest.raises(ConfigError):
        Multiline("(")


def test_json_parser_lifts_ts_level_message() -> None:
    p = LineParser("json")
    ts, level, msg, fields = p.parse(
        b'{"ts":"2024-05-01T10:00:00Z","level":"WARN","msg":"disk","free":3}'
    )
    assert ts == "2024-05-01T10:00:00Z"  # RFC 3339 kept as given
    assert p.parse(b'{"time": 1714557600, "msg": "x"}')[0] == 1714557600.0
    assert p.parse(b'{"time": "2024-05-01 10:00:00", "msg": "x"}')[0] == parse_ts(
        "2024-05-01T10:00:00+00:00"
    )
    assert (level, msg, fields) == ("warning", "disk", {"free": 3})
    assert p.parse(b"not json") == (None, "info", "not json", {})
    assert p.parse(b"[1,2]")[2] == "[1,2]"


def test_logfmt_regex_and_text_parsers() -> None:
    _ts, level, msg, fields = LineParser("logfmt").parse(
        b'level=error msg="db down" retry=3 path=/x'
    )
    assert (level, msg, fields) == ("error", "db down", {"retry": "3", "path": "/x"})
    rp = LineParser("regex", r"^(?P<level>\w+) \[(?P<mod>\w+)\] (?P<message>.*)$")
    assert rp.parse(b"ERROR [db] connection lost")[1:] == (
        "error",
        "connection lost",
        {"mod": "db"},
    )
    assert rp.parse(b"garbage")[2] == "garbage"
    assert LineParser("text").parse(b'{"a":1}')[2] == '{"a":1}'
    with pytest.raises(ConfigError, match="named groups"):
        LineParser("regex", r"\w+")
    with pytest.raises(ConfigError, match="unknown format"):
        LineParser("xml")


def test_pipeline_builds_stable_ids_and_runs_processors() -> None:
    def drop_debug(r: LogRecord) -> LogRecord | None:
        return None if r.level == "debug" else r

    pipe = Pipeline(LineParser("json"), "app", {"service": "s"}, [drop_debug])
    recs = pipe.build(
        "ino.0-fp",
        [(0, b'{"level":"debug","msg":"x"}', False), (30, b'{"msg":"y"}', True)],
        1_700_000_000.0,
    )
    assert len(recs) == 1
    r = recs[0]
    assert r.id == "app/ino.0-fp/30" and r.source == "app" and r.fields == {"truncated": True}
    assert r.ts == "2023-11-14T22:13:20.000000Z" and r.labels == {"service": "s"}
    again = pipe.build("ino.0-fp", [(30, b'{"msg":"y"}', True)], 1_800_000_000.0)
    assert again[0].id == r.id  # same bytes, same id: a re-send deduplicates
    assert set(msgspec.json.decode(msgspec.json.encode(r))) == {
        "id",
        "source",
        "ts",
        "level",
        "message",
        "fields",
        "labels",
    }


def test_buffer_policy_batches_and_cap() -> None:
    p = BufferPolicy(max_bytes=100_000, batch_max_records=10, batch_max_bytes=1000, batch_timeout=1)
    assert not p.ready(0, 0, 5.0)
    assert not p.ready(3, 100, 0.5)
    assert p.ready(10, 100, 0.0) and p.ready(3, 1000, 0.0) and p.ready(1, 1, 1.0)
    assert p.segments_to_drop([40_000, 40_000, 10_000], 5_000) == 0
    assert p.segments_to_drop([40_000, 40_000, 10_000], 20_000) == 1
    assert p.segments_to_drop([90_000, 10_000], 50_000) == 1
    assert p.segments_to_drop([90_000], 50_000) == 1  # even the one being written
    with pytest.raises(ConfigError):
        BufferPolicy(max_bytes=10)


def test_backoff_and_restart_policy() -> None:
    b = Backoff(0.1, 1.0, 2.0, 0.0)
    assert [b.delay(i) for i in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert 0.08 <= Backoff(0.1, 1.0, 2.0, 0.2).delay(0, 0.0) <= 0.12
    never = RestartPolicy("never")
    assert not never.decide(1, 0, False).restart
    onf = RestartPolicy("on-failure", max_restarts=2, backoff=b)
    assert not onf.decide(0, 0, False).restart
    assert onf.decide(1, 0, False).restart and onf.decide(-9, 1, False).delay == 0.2
    assert not onf.decide(1, 2, False).restart
    assert not RestartPolicy("always").decide(0, 0, True).restart  # shutting down
    assert RestartPolicy("always", max_restarts=0).decide(0, 100, False).restart
    with pytest.raises(ConfigError, match="on-failure"):
        RestartPolicy("sometimes")


def _stat(path: str, inode: int, content: bytes, mtime: float = 0.0) -> FileStat:
    return FileStat(path, 1, inode, len(content), content[:64], mtime)


def test_tail_rename_rotation_keeps_reading_the_same_inode() -> None:
    t = TailTracker(fingerprint_bytes=64)
    a = b"line one\nline two\n"
    plans = t.observe([_stat("app.log", 10, a)])
    assert [(p.path, p.offset) for p in plans] == [("app.log", 0)]
    plans[0].state.offset = len(a)
    # rename: app.log -> app.log.1 (same inode, more data), a new app.log
    a2 = a + b"line three\n"
    plans = t.observe([_stat("app.log.1", 10, a2, 1.0), _stat("app.log", 11, b"new 1\n", 2.0)])
    assert [(p.path, p.inode, p.offset) for p in plans] == [
        ("app.log.1", 10, len(a)),
        ("app.log", 11, 0),
    ]
    assert plans[0].state.identity != plans[1].state.identity


def test_tail_copytruncate_reads_the_rest_from_the_copy() -> None:
    t = TailTracker(fingerprint_bytes=64)
    content = b"".join(b"line %03d\n" % i for i in range(20))
    plan = t.observe([_stat("app.log", 10, content)])[0]
    plan.state.offset = 90  # we had read 10 lines when the rotation happened
    old_identity = plan.state.identity
    plans = t.observe([_stat("app.log", 10, b"fresh\n"), _stat("app.log.1", 12, content)])
    assert [(p.path, p.offset, p.final, p.reset) for p in plans] == [
        ("app.log.1", 90, True, False),  # the rest of the old generation, from the copy
        ("app.log", 0, False, True),  # then the new generation
    ]
    assert plans[0].state.identity == old_identity
    assert plans[1].state.identity != old_identity
    plans[1].state.offset = 6
    # the copy is remembered: not read again as a new file
    again = t.observe([_stat("app.log", 10, b"fresh\nmore\n"), _stat("app.log.1", 12, content)])
    assert [p.path for p in again] == ["app.log"]


def test_tail_inode_reuse_and_short_files() -> None:
    t = TailTracker(fingerprint_bytes=64)
    assert t.observe([_stat("a", 5, b"partial no newline")]) == []  # waits
    p = t.observe([_stat("a", 5, b"first\n")])[0]
    p.state.offset = 6
    # same inode, different first bytes: a new file reusing the inode
    p2 = t.observe([_stat("a", 5, b"other content\n")])
    assert p2[0].offset == 0 and p2[0].reset and p2[0].state.identity != p.state.identity
    assert fingerprint(b"abc\ndef", 64) == (hashlib.blake2b(b"abc\n", digest_size=8).hexdigest(), 4)


def test_tail_read_from_end_and_restore_from_checkpoint() -> None:
    t = TailTracker(fingerprint_bytes=64, read_from="end")
    p = t.observe([_stat("a", 5, b"old stuff\n")])[0]
    assert p.offset == 10
    p.state.offset = 10
    saved = [s.to_dict() for s in t.states.values()]
    from stanchion.sidecar._core import FileState

    t2 = TailTracker(64, "beginning", [FileState.from_dict(d) for d in saved])
    plans = t2.observe([_stat("a", 5, b"old stuff\nnew\n")])
    assert [(p.offset, p.state.identity) for p in plans] == [(10, p.state.identity)]


def test_log_query_params() -> None:
    q = LogQuery.from_params(
        {"service": "api", "level": "error,WARN", "since": "15m", "q": "Boom", "limit": "5"},
        now_epoch=10_000.0,
    )
    assert q.levels == ("error", "warning") and q.since == 10_000.0 - 900 and q.limit == 5
    rec = LogRecord(
        id="1", source="s", ts="", level="error", message="a BOOM here", labels={"service": "api"}
    )
    assert q.matches(rec, 9_500.0)
    assert not q.matches(rec, 9_000.0)
    assert LogQuery.from_params({"until": "2024-01-01T00:00:00Z"}, 0).until == 1704067200.0
    with pytest.raises(ConfigError):
        LogQuery.from_params({"bogus": "1"}, 0)
    with pytest.raises(ConfigError):
        LogQuery.from_params({"since": "yesterday"}, 0)
    assert parse_duration("7d") == 604800
    empty = LogQuery.from_params(
        {"service": "", "level": "", "since": "", "until": "", "q": "", "limit": ""}, 0
    )
    assert empty == LogQuery()


def test_tail_copy_seen_after_the_truncate_is_still_read() -> None:
    t = TailTracker(fingerprint_bytes=64)
    content = b"".join(b"line %03d\n" % i for i in range(20))
    plan = t.observe([_stat("app.log", 10, content)])[0]
    plan.state.offset = 90
    # the truncate is seen first (the copy was not globbed yet): new generation from 0
    plans = t.observe([_stat("app.log", 10, b"fresh\n")])
    assert [(p.offset, p.reset) for p in plans] == [(0, True)]
    plans[0].state.offset = 6
    # then the copy shows up: the rest of the old generation is read from it
    late = t.observe([_stat("app.log", 10, b"fresh\n"), _stat("app.log.1", 12, content)])
    assert [(p.path, p.offset, p.final, p.state.identity) for p in late] == [
        ("app.log.1", 90, True, plan.state.identity),  # the old generation's rest first
        ("app.log", 6, False, plans[0].state.identity),
    ]
    again = t.observe([_stat("app.log", 10, b"fresh\n"), _stat("app.log.1", 12, content)])
    assert [p.path for p in again] == ["app.log"]
