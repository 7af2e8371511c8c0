"""Property tests for the pure routing functions, with the known edge cases pinned."""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.errors import BadRequest
from proxy.routing import (
    REDACTED,
    Target,
    build_upstream_target,
    check_remainder,
    match_prefix,
    redact_query,
    rewrite_location,
    sort_prefixes,
    split_target,
    strip_query_params,
)

segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=6)
prefix = st.lists(segment, min_size=1, max_size=3).map(lambda parts: "/" + "/".join(parts))
# Anything a client could put in a path: printable ASCII plus escapes.
raw_path_chars = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40
)
base_url = st.sampled_from(
    [
        "http://api.example.com",
        "https://h.example:8443/v1",
        "http://127.0.0.1:9/a/b",
        "https://x.io/api",
    ]
)


@given(st.lists(prefix, min_size=1, max_size=6, unique=True), raw_path_chars)
@example(["/pay", "/paymo"], "/paymo/x")
@example(["/paymo"], "/pay/x")
@example(["/a", "/a/b"], "/a/b/c")
@example(["/a"], "/a")
def test_match_is_longest_segment_boundary_prefix(prefixes: list[str], tail: str) -> None:
    path = "/" + tail.lstrip("/")
    matched = match_prefix(sort_prefixes(prefixes), path)
    candidates = [p for p in prefixes if path == p or path.startswith(p + "/")]
    if not candidates:
        assert matched is None
        return
    assert matched is not None
    best = max(candidates, key=len)
    assert matched == (best, path[len(best) :])
    assert matched[1] == "" or matched[1].startswith("/")


def test_pay_does_not_match_paymo() -> None:
    assert match_prefix(["/pay"], "/paymo/clients") is None
    assert match_prefix(sort_prefixes(["/pay", "/paymo"]), "/paymo/clients") == (
        "/paymo",
        "/clients",
    )


_PIECES = st.sampled_from(
    ["/", ".", "..", ";", "x", "%2e", "%2f", "%5c", "%25", "2e", "%c0%ae", "%u002e", "\\", "..;"]
)
hostile_tail = st.one_of(raw_path_chars, st.lists(_PIECES, max_size=12).map("".join))


@given(base_url, hostile_tail, st.text(alphabet="abc=&%20+", max_size=20))
@example("https://x.io/api", "/..%2f..%2fevil.com", "")
@example("http://api.example.com", "//evil.com/x", "")
@example("http://api.example.com", "/@evil.com", "")
@example("https://h.example:8443/v1", "", "a=1")
@example("https://x.io/api", "..;/x", "")
@example("https://x.io/api", "%252e%252e/x", "")
@example("https://x.io/api", "%c0%ae%c0%ae/x", "")
@example("https://x.io/api", "..%5c..%5cx", "")
def test_built_url_never_leaves_host_or_base_path(base: str, tail: str, query: str) -> None:
    remainder = "/" + tail if tail else ""
    try:
        check_remainder(remainder)
    except BadRequest:
        return
    # As the clients build it: the endpoint's origin, then the target.
    target = Target.from_url(base)
    url = target.origin + build_upstream_target(target.base_path, remainder, query)
    want, got = urlsplit(base), urlsplit(url)
    assert (got.scheme, got.hostname, got.port) == (want.scheme, want.hostname, want.port)
    assert got.path.startswith(want.path)
    # Byte for byte: nothing re-encoded.
    assert url == base + (remainder or ("" if want.path else "/")) + (f"?{query}" if query else "")
    # ... and under the base path whichever decoder the upstream uses (SPEC §4).
    for path in upstream_readings(got.path):
        assert path.startswith(want.path.rstrip("/") + "/") or path == want.path, (url, path)


def upstream_readings(path: str) -> list[str]:
    """The paths an upstream might resolve `path` to: decoded none, once or twice,
    `\\` read as `/`, `;params` dropped (Tomcat), overlong `%c0%ae` as `.`, and
    IIS's `%u002e`; each with its dot-segments removed (RFC 3986 §5.2.4)."""
    readings = []
    for form in (path, unquote(path), unquote(unquote(path))):
        for variant in (form, re.sub(r"%c0%ae|%u002e", ".", form, flags=re.IGNORECASE)):
            flat = variant.replace("\\", "/")
            flat = "/".join(seg.split(";", 1)[0] for seg in flat.split("/"))
            readings.append(_remove_dot_segments(flat))
    return readings


def _remove_dot_segments(path: str) -> str:
    out: list[str] = []
    for seg in path.split("/")[1:]:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    return "/" + "/".join(out)


@pytest.mark.parametrize(
    "remainder",
    [
        "/..",
        "/../x",
        "/a/./b",
        "/%2e%2e/x",
        "/%2E%2e",
        "/.%2e/x",
        "/%2e",
        "/a\\b",
        "/a%5cb",
        "/a%00b",
        "/a\x01b",
        "/x#frag",
        "/..;/x",
        "/.;x",
        "/%2e%2e;/x",
        "/..%2fx",
        "/%2e%2e%2fx",
        "/%252e%252e/x",
        "/%c0%ae%c0%ae/x",
        "/..%c0%afx",
        "/%u002e%u002e/x",
        "/%2e%2e%5cx",
    ],
)
def test_unsafe_remainders_rejected(remainder: str) -> None:
    with pytest.raises(BadRequest):
        check_remainder(remainder)


@pytest.mark.parametrize(
    "remainder",
    ["", "/", "/a%2Fb", "/a%20b+c", "/...", "/.well-known/x", "/a..b", "/a;b=c", "/x..%2fy"],
)
def test_safe_remainders_pass(remainder: str) -> None:
    check_remainder(remainder)


@pytest.mark.parametrize(
    "target",
    ["http://localhost:8080/paymo/x", "localhost:443", "*", "//evil.com/x", ""],
)
def test_non_origin_form_targets_rejected(target: str) -> None:
    with pytest.raises(BadRequest):
        split_target(target)


def test_split_target_keeps_raw_query() -> None:
    assert split_target("/a%2Fb?x=%20&y") == ("/a%2Fb", "x=%20&y")


@given(st.lists(st.sampled_from(["token", "a", "b%20c", "tok", "x"]), max_size=6), st.data())
@example(["token", "a"], None)
def test_strip_query_keeps_other_bytes(names: list[str], data: st.DataObject | None) -> None:
    parts = [f"{n}=v{i}" for i, n in enumerate(names)]
    query = "&".join(parts)
    stripped = strip_query_params(query, frozenset({"token"}))
    kept = [p for p in parts if not p.startswith("token=")]
    assert stripped == "&".join(kept)


def test_strip_query_matches_decoded_names() -> None:
    assert strip_query_params("to%6Ben=1&a=2&token&b", frozenset({"token"})) == "a=2&b"


def test_redact_query() -> None:
    assert redact_query("/p?token=abc&a=1&api_key=k&refresh_token=r") == (
        f"/p?token={REDACTED}&a=1&api_key={REDACTED}&refresh_token={REDACTED}"
    )
    assert redact_query("/p") == "/p"


TARGET = Target.from_url("https://app.paymoapp.com/api")


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("https://app.paymoapp.com/api/clients/1", "/paymo/clients/1"),
        ("https://APP.paymoapp.com:443/api/x?y=1", "/paymo/x?y=1"),
        ("https://app.paymoapp.com/api", "/paymo"),
        ("/api/clients", "/paymo/clients"),
        ("/apix/clients", "/apix/clients"),
        ("/other", "/other"),
        ("https://app.paymoapp.com/other", "https://app.paymoapp.com/other"),
        ("http://app.paymoapp.com/api/x", "http://app.paymoapp.com/api/x"),
        ("https://evil.com/api/x", "https://evil.com/api/x"),
        ("relative/path", "relative/path"),
        ("//app.paymoapp.com/api/x", "//app.paymoapp.com/api/x"),
    ],
)
def test_rewrite_location(location: str, expected: str) -> None:
    assert rewrite_location(location, TARGET, "/paymo") == expected


def test_rewrite_location_root_base() -> None:
    target = Target.from_url("http://127.0.0.1:9000")
    assert rewrite_location("http://127.0.0.1:9000/x", target, "/e") == "/e/x"
    assert rewrite_location("/x", target, "/e") == "/e/x"


# -- pinned by the mutation run (tests/README.md) ------------------------------------------


@pytest.mark.parametrize(
    ("url", "base_path"),
    [
        ("https://h.example/v1/", "/v1"),
        ("https://h.example/v1//", "/v1"),
        ("https://h.example/FOX/", "/FOX"),  # only slashes go, not the letters around them
        ("https://h.example/v1 ", "/v1 "),
        ("https://h.example", ""),
    ],
)
def test_base_path_loses_only_its_trailing_slashes(url: str, base_path: str) -> None:
    assert Target.from_url(url).base_path == base_path


def test_refusals_say_what_is_wrong() -> None:
    """The 400's message is what the user reads (SPEC §4: errors a user can act on)."""
    with pytest.raises(BadRequest, match=r"^request target must be a path \(origin-form\)$"):
        split_target("http://h/x")
    with pytest.raises(BadRequest, match=r"^path contains a forbidden character$"):
        check_remainder("/a\\b")
    with pytest.raises(BadRequest, match=r"^path must not contain \. or \.\. segments$"):
        check_remainder("/a/../b")


def test_split_target_splits_at_the_first_question_mark() -> None:
    assert split_target("/a?b=1?c=2") == ("/a", "b=1?c=2")


def test_redact_query_reads_the_query_from_the_first_question_mark() -> None:
    # Upstreams parse the query from the first `?`: a second one belongs to a value.
    assert redact_query("/p?token=s3cret?a=1") == f"/p?token={REDACTED}"


def test_redact_query_hides_the_whole_value() -> None:
    assert redact_query("/p?token=ab=cd&x=1") == f"/p?token={REDACTED}&x=1"


ROOT = Target.from_url("http://api.example.com")
V1 = Target.from_url("http://api.example.com/v1")


@pytest.mark.parametrize(
    ("target", "location", "expected"),
    [
        # A network-path reference is not a path under the base: it names another host.
        (ROOT, "//evil.com/x", "//evil.com/x"),
        # http's default port is 80 (and 443 only for https).
        (V1, "http://api.example.com/v1/x", "/p/x"),
        (V1, "http://api.example.com:80/v1/x", "/p/x"),
        (V1, "http://api.example.com:81/v1/x", "http://api.example.com:81/v1/x"),
        # The host name may appear again in the path.
        (V1, "http://api.example.com/v1/x/api.example.com", "/p/x/api.example.com"),
        # No path at all: the root.
        (ROOT, "http://api.example.com", "/p/"),
        (ROOT, "http://api.example.com?x=1", "/p/?x=1"),
        (V1, "http://api.example.com/v1?x=1", "/p?x=1"),
        (V1, "http://api.example.com/v1#f", "/p#f"),
        # /v1X is not under /v1.
        (V1, "/v1X/y", "/v1X/y"),
        (V1, "http://api.example.com/v1X", "http://api.example.com/v1X"),
    ],
)
def test_rewrite_location_edges(target: Target, location: str, expected: str) -> None:
    assert rewrite_location(location, target, "/p") == expected


def test_rewrite_location_drops_the_credential_and_strip_query_params() -> None:
    target = Target.from_url("https://api.example.com/base")
    strip = frozenset({"api_key", "internal"})
    location = "https://api.example.com/base/dir/?a=1&api%5Fkey=SECRET&internal=x&b=2#f"
    assert rewrite_location(location, target, "/q", strip) == "/q/dir/?a=1&b=2#f"
    assert rewrite_location("/base/x?api_key=SECRET", target, "/q", strip) == "/q/x"
    # Elsewhere: not ours to rewrite (the forwarder still scrubs configured secrets).
    assert rewrite_location("https://other/x?api_key=1", target, "/q", strip) == (
        "https://other/x?api_key=1"
    )


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/a?x=1#frag", ("/a", "x=1")),
        ("/a?x=1#f#g", ("/a", "x=1")),
        ("/a?#", ("/a", "")),
        ("/a?x=1", ("/a", "x=1")),
    ],
)
def test_split_target_drops_a_fragment_after_the_query(
    target: str, expected: tuple[str, str]
) -> None:
    assert split_target(target) == expected


@pytest.mark.parametrize(
    ("remainder", "message"),
    [
        ("/%c0%ae%c0%ae/x", "path contains an overlong UTF-8 or %u escape"),
        ("/%u002e%u002e/x", "path contains an overlong UTF-8 or %u escape"),
        ("/%2e%2e/x", "path must not contain . or .. segments"),
        ("/..;x/y", "path must not contain . or .. segments"),
    ],
)
def test_encoded_refusals_say_what_is_wrong(remainder: str, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        check_remainder(remainder)
    assert str(info.value) == message


@pytest.mark.parametrize("remainder", ["/a%ff", "/a%25ff", "/caf%C3%A9%25e9"])
def test_undecodable_escapes_are_not_a_crash(remainder: str) -> None:
    check_remainder(remainder)  # not UTF-8 at either decoding: forwarded as sent
