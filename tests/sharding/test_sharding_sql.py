"""Statement checks and ``:name`` translation (pure), and the public API surface."""

from __future__ import annotations

import pytest

import stanchion.sharding as sharding
from stanchion.sharding._core import inspect_statement, translate_named

TABLES = {"users": "user_id", "posts": "user_id"}


def test_translate_named() -> None:
    sql, names = translate_named(
        "SELECT * FROM users WHERE user_id = :id AND note::text <> ':id' "
        'AND "weird:col" = :x AND y = :id /* :c */ -- :d'
    )
    assert names == ("id", "x")
    assert sql == (
        "SELECT * FROM users WHERE user_id = $1 AND note::text <> ':id' "
        'AND "weird:col" = $2 AND y = $1 /* :c */ -- :d'
    )
    assert translate_named("SELECT 'it''s :not' , :yes") == ("SELECT 'it''s :not' , $1", ("yes",))


@pytest.mark.parametrize(
    ("sql", "missing"),
    [
        ("SELECT * FROM users WHERE user_id = :k", None),
        ("select name from USERS where user_id in (1, 2)", None),
        ('SELECT * FROM "users" WHERE "user_id" = ?', None),
        ("UPDATE users SET name = 'x' WHERE user_id = $1", None),
        ("DELETE FROM users WHERE user_id = :k", None),
        ("INSERT INTO users (user_id, name) VALUES (:k, :n)", None),
        ("INSERT INTO users VALUES (1, 'a')", None),
        ("SELECT * FROM users u JOIN posts p ON p.user_id = u.user_id WHERE u.user_id = 1", None),
        ("SELECT 1", None),
        ("CREATE TABLE users (user_id int)", None),
        ("SELECT * FROM users", ("users", "user_id")),
        ("UPDATE users SET name = 'user_id'", ("users", "user_id")),
        ("DELETE FROM posts", ("posts", "user_id")),
        ("INSERT INTO users (name) VALUES ('user_id')", ("users", "user_id")),
    ],
)
def test_shard_key_required(sql: str, missing: tuple[str, str] | None) -> None:
    assert inspect_statement(sql, TABLES).missing_key == missing


def test_reference_and_kinds() -> None:
    info = inspect_statement("INSERT INTO regions (code) VALUES ('eu')", TABLES, ["regions"])
    assert info.writes and info.reference == ("regions",) and info.sharded == ()
    assert not inspect_statement("SELECT * FROM users WHERE user_id = 1", TABLES).writes


def test_public_api_is_documented() -> None:
    for name in sharding.__all__:
        obj = getattr(sharding, name)
        assert obj.__doc__, f"{name} has no docstring"
    assert sorted(sharding.__all__) == sharding.__all__
