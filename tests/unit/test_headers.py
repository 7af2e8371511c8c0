"""Header handling against SPEC §4's lists, spelled out here (never the module's own
constants: an oracle built from the code under test cannot see a name go missing)."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from proxy.headers import (
    add_defaults,
    connection_named,
    filter_response,
    inbound_drop_set,
    strip_inbound,
)

# SPEC §4 "Stripping": hop-by-hop headers (RFC 9110 §7.6.1), removed in both directions.
SPEC_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
    }
)
# SPEC §4 "Stripping": the client's credentials, always removed before forwarding.
SPEC_CREDENTIALS = frozenset({"authorization", "proxy-authorization", "cookie"})
# Set by the proxy, never passed through: Host (SPEC §4 "Host is set to the upstream's"),
# X-Request-ID (SPEC §5: the client's or a new one, forwarded once), Expect (our server
# answered it already).
PROXY_SETS = frozenset({"host", "x-request-id", "expect"})

names = st.sampled_from(
    [
        "Authorization",
        "authorization",
        "Cookie",
        "COOKIE",
        "X-Api-Key",
        "x-api-key",
        "Accept",
        "X-Foo",
        "Connection",
        "Keep-Alive",
        "TE",
        "te",
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
        "X-Request-ID",
    ]
)
headers = st.lists(st.tuples(names, st.text(max_size=8)), max_size=12)


def named_by(connection: str | None) -> set[str]:
    """The header names a Connection value lists (RFC 9110 §7.6.1), by hand."""
    return {t.strip().lower() for t in (connection or "").split(",") if t.strip()}


@given(
    headers, st.one_of(st.none(), st.sampled_from(["close, X-Foo", "keep-alive", "X-Foo,Accept"]))
)
@example([("Connection", "close, X-Foo"), ("X-Foo", "1"), ("Accept", "a")], "close, X-Foo")
@example([("Cookie", "a=1"), ("Proxy-Authorization", "Basic x"), ("TE", "trailers")], None)
def test_strip_inbound_drops_exactly_the_spec_lists(
    given_headers: list[tuple[str, str]], connection: str | None
) -> None:
    drop = inbound_drop_set("X-Api-Key", ["X-Strip"])
    out = strip_inbound(given_headers, drop, connection)
    gone = (SPEC_HOP_BY_HOP | SPEC_CREDENTIALS | PROXY_SETS | {"x-api-key", "x-strip"}) | named_by(
        connection
    )
    # Exactly those go; everything else is kept, in order.
    assert out == [(k, v) for k, v in given_headers if k.lower() not in gone]


def test_drop_set_is_the_spec_lists_plus_the_routes_own() -> None:
    drop = inbound_drop_set("X-Session", ["X-Extra"])
    expected = SPEC_HOP_BY_HOP | SPEC_CREDENTIALS | PROXY_SETS | {"x-session", "x-extra"}
    assert drop == expected
    assert inbound_drop_set(None, []) == SPEC_HOP_BY_HOP | SPEC_CREDENTIALS | PROXY_SETS


def test_connection_named() -> None:
    assert connection_named(None) == frozenset()
    assert connection_named("") == frozenset()
    assert connection_named(" Close , X-Foo,,x-bar ") == {"close", "x-foo", "x-bar"}
    assert connection_named(",") == frozenset()


@given(headers, st.one_of(st.none(), st.just("close, X-Foo"), st.just("TE, Accept")))
@example([("TE", "trailers"), ("Accept", "a")], None)
@example([("X-Foo", "1"), ("Accept", "a")], "close, X-Foo")
@example([("Connection", "close"), ("X-Foo", "1"), ("Accept", "a")], "X-Foo")  # two of them
def test_filter_response_removes_the_spec_hop_by_hop_list(
    given_headers: list[tuple[str, str]], connection: str | None
) -> None:
    answer = given_headers if connection is None else [*given_headers, ("Connection", connection)]
    connections = ",".join(v for k, v in answer if k.lower() == "connection")
    gone = SPEC_HOP_BY_HOP | named_by(connections)
    out = filter_response(answer)
    # Credentials are the upstream's business on the way back (Set-Cookie passes, §4).
    assert out == [(k, k.lower(), v) for k, v in answer if k.lower() not in gone]


def test_defaults_only_when_absent() -> None:
    out = add_defaults([("accept", "text/html")], (("Accept", "application/json"), ("X-A", "1")))
    assert out == [("accept", "text/html"), ("X-A", "1")]
    assert add_defaults([("a", "1")], ()) == [("a", "1")]
