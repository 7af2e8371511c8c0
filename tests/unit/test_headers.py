from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from proxy.headers import (
    CREDENTIALS,
    HOP_BY_HOP,
    add_defaults,
    connection_named,
    filter_response,
    inbound_drop_set,
    strip_inbound,
)

names = st.sampled_from(
    [
        "Authorization",
        "authorization",
        "Cookie",
        "X-Api-Key",
        "x-api-key",
        "Accept",
        "X-Foo",
        "Connection",
        "Keep-Alive",
        "TE",
        "Transfer-Encoding",
        "Upgrade",
        "Proxy-Connection",
        "Proxy-Authorization",
        "Host",
        "X-Session",
        "Content-Type",
        "X-Strip",
        "Trailer",
        "Expect",
    ]
)
headers = st.lists(st.tuples(names, st.text(max_size=8)), max_size=12)


@given(
    headers, st.one_of(st.none(), st.sampled_from(["close, X-Foo", "keep-alive", "X-Foo,Accept"]))
)
@example([("Connection", "close, X-Foo"), ("X-Foo", "1"), ("Accept", "a")], "close, X-Foo")
def test_strip_inbound_drops_exactly_the_drop_set(
    given_headers: list[tuple[str, str]], connection: str | None
) -> None:
    drop = inbound_drop_set("X-Api-Key", ["X-Strip"])
    out = strip_inbound(given_headers, drop, connection)
    gone = drop | connection_named(connection)
    assert all(k.lower() not in gone for k, _ in out)
    # Everything else is kept, in order.
    assert out == [(k, v) for k, v in given_headers if k.lower() not in gone]


def test_drop_set_contents() -> None:
    drop = inbound_drop_set("X-Session", ["X-Extra"])
    assert drop >= CREDENTIALS and drop >= HOP_BY_HOP
    assert {"x-session", "x-extra", "host"} <= drop
    assert "accept" not in drop


@given(headers, st.one_of(st.none(), st.just("close, X-Foo")))
def test_filter_response_removes_hop_by_hop(
    given_headers: list[tuple[str, str]], connection: str | None
) -> None:
    answer = given_headers if connection is None else [*given_headers, ("Connection", connection)]
    connections = [v for k, v in answer if k.lower() == "connection"]
    gone = HOP_BY_HOP | connection_named(",".join(connections))
    out = filter_response(answer)
    assert out == [(k, k.lower(), v) for k, v in answer if k.lower() not in gone]


def test_defaults_only_when_absent() -> None:
    out = add_defaults([("accept", "text/html")], (("Accept", "application/json"), ("X-A", "1")))
    assert out == [("accept", "text/html"), ("X-A", "1")]
