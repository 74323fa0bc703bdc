"""Message and event encoding, shared by every pattern (msgspec JSON).

:class:`JsonCodec` encodes dicts, lists, msgspec Structs, dataclasses, UUIDs,
datetimes and enums to compact JSON bytes and decodes them back, optionally
into a given type with validation. Instances are cheap, thread-safe and
reusable; keep one per component.

.. versionadded:: 0.1
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar, overload

import msgspec

from stanchion.errors import ConfigError

__all__ = ["Codec", "DecodeError", "EncodeError", "JsonCodec", "json_codec"]

T = TypeVar("T")


class EncodeError(ConfigError, TypeError):
    """A value cannot be encoded (an unsupported type, say)."""


class DecodeError(ConfigError):
    """Bytes are not valid for the codec or do not match the requested type."""


class Codec(Protocol):
    """Turns values into bytes and back."""

    content_type: str

    def encode(self, value: object) -> bytes:
        """Encode ``value``; raise :class:`EncodeError` when it cannot be."""
        ...

    def decode(self, data: bytes | bytearray | memoryview | str) -> Any:
        """Decode ``data`` into plain Python values."""
        ...


class JsonCodec:
    """JSON via msgspec: the fastest JSON codec for Python, with typed decoding."""

    content_type = "application/json"

    __slots__ = ("_decoder", "_encoder", "_typed")

    def __init__(self) -> None:
        self._encoder = msgspec.json.Encoder(enc_hook=_enc_hook)
        self._decoder = msgspec.json.Decoder()
        self._typed: dict[Any, msgspec.json.Decoder[Any]] = {}

    def encode(self, value: object) -> bytes:
        """Encode ``value`` to JSON bytes.

        Raises:
            EncodeError: the value (or something inside it) is not serialisable.
        """
        try:
            return self._encoder.encode(value)
        except (TypeError, msgspec.EncodeError, OverflowError) as exc:
            raise EncodeError(
                f"cannot encode {type(value).__name__} as JSON: {exc}; "
                "pass dicts, lists, str, numbers, msgspec Structs or dataclasses"
            ) from exc

    @overload
    def decode(self, data: bytes | bytearray | memoryview | str) -> Any: ...

    @overload
    def decode(self, data: bytes | bytearray | memoryview | str, type: type[T]) -> T: ...

    def decode(self, data: bytes | bytearray | memoryview | str, type: Any = None) -> Any:
        """Decode JSON ``data``; with ``type``, validate and convert into it.

        Raises:
            DecodeError: invalid JSON, or it does not match ``type``.
        """
        try:
            if type is None:
                return self._decoder.decode(data)
            decoder = self._typed.get(type)
            if decoder is None:
                decoder = self._typed[type] = msgspec.json.Decoder(type)
            return decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise DecodeError(f"cannot decode JSON: {exc}") from exc


def _enc_hook(obj: object) -> object:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if isinstance(obj, bytes | bytearray | memoryview):
        return bytes(obj).decode("utf-8", "backslashreplace")
    raise TypeError(f"objects of type {type(obj).__name__} are not supported")


json_codec = JsonCodec()
"""A shared, stateless JSON codec instance."""
