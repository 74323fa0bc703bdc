# ruff: noqa: SIM115
"""A service for the sidecar tests: numbered JSON lines to stdout and a rotating file.

usage: writer_child.py STATE_FILE DIR TOTAL ROTATE_EVERY RATE

Writes lines seq = next..TOTAL-1 to stdout and to DIR/app.log, which is rotated
every ROTATE_EVERY lines, alternately by rename (app.log -> app.log.<k>, a new
app.log) and by copytruncate (app.log copied to app.log.<k>, then truncated).
Progress (what stdout and the files got) is saved to STATE_FILE on exit, so a
second run continues the sequence. SIGTERM (sent when the sidecar dies) stops it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time

state_file, d, total, every, rate = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
state = {"out": 0, "file": 0}
if os.path.exists(state_file):
    state = json.load(open(state_file))
stop = False


def on_term(*_: object) -> None:
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)
pad = "p" * 60
log_path = os.path.join(d, "app.log")
app = open(log_path, "a")
CHUNK = 250
started = time.monotonic()
written = 0


def line(i: int) -> str:
    return json.dumps({"seq": i, "level": "info", "msg": f"line {i}", "pad": pad}) + "\n"


def save() -> None:
    with open(state_file + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(state_file + ".tmp", state_file)


try:
    while not stop and (state["out"] < total or state["file"] < total):
        # files: whole chunks, rotation exactly at multiples of `every`
        if state["file"] < total:
            i = state["file"]
            n = min(CHUNK, total - i, every - i % every)
            text = "".join(line(k) for k in range(i, i + n))
            app.write(text)
            app.flush()
            state["file"] = i + n
            if state["file"] % every == 0 and state["file"] < total:
                k = state["file"] // every
                if k % 2:  # rotation by rename
                    app.close()
                    os.rename(log_path, f"{log_path}.{k}")
                    app = open(log_path, "a")
                else:  # rotation by copytruncate
                    shutil.copyfile(log_path, f"{log_path}.{k}")
                    os.truncate(log_path, 0)
        if state["out"] < total and not stop:
            i = state["out"]
            n = min(CHUNK, total - i)
            data = "".join(line(k) for k in range(i, i + n)).encode()
            sent = 0
            try:
                while sent < len(data):
                    sent += os.write(1, data[sent:])
            except BrokenPipeError:
                state["out"] = i + data[:sent].count(b"\n")  # the rest never reached the pipe
                break
            state["out"] = i + n
        written += CHUNK
        ahead = written / rate - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)
finally:
    save()
sys.exit(0 if state["out"] >= total and state["file"] >= total else 3)
