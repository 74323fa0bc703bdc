"""The decorators keep signatures for the type checker (ParamSpec), sync and async."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SNIPPET = textwrap.dedent(
    """
    from stanchion.resilience import CircuitBreaker, Policy, Retry

    breaker = CircuitBreaker("t")

    @breaker
    def sync_fn(x: int, *, y: str = "") -> str:
        return y * x

    @breaker
    async def async_fn(x: int) -> bytes:
        return b""

    @Policy(Retry(2), breaker)
    async def pol(x: int) -> float:
        return 1.0

    reveal_type(sync_fn)
    reveal_type(async_fn)
    reveal_type(pol)
    reveal_type(breaker.call(sync_fn, 1, y="a"))
    sync_fn("wrong")
    """
)


def test_decorators_keep_signatures(tmp_path: Path) -> None:
    src = tmp_path / "snippet.py"
    src.write_text(SNIPPET)
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(src)],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    out = out.replace("builtins.", "")
    assert '"def (x: int, *, y: str =) -> str"' in out, out
    assert '"def (x: int) -> typing.Coroutine[Any, Any, bytes]"' in out, out
    assert '"def (x: int) -> typing.Coroutine[Any, Any, float]"' in out, out
    assert 'Revealed type is "str"' in out, out
    assert 'Argument 1 to "sync_fn" has incompatible type "str"; expected "int"' in out, out
