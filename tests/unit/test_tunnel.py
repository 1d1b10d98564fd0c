import socket

import pytest

from raybridge.transport.tunnel import PortInUse, check_free


def listener() -> socket.socket:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the tunnel's own listener
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    return srv


def test_a_listening_port_is_in_use():
    srv = listener()
    port = srv.getsockname()[1]
    with srv, pytest.raises(PortInUse, match=f"local port {port} is in use"):
        check_free(port)


def test_a_port_left_in_time_wait_by_an_earlier_tunnel_is_free():
    srv = listener()
    port = srv.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.close()  # the tunnel's side closes first: its port stays in TIME_WAIT for a minute
    client.close()
    srv.close()
    check_free(port)  # a new tunnel on the same port can start at once


def signed_in(fwd, request: bytes) -> bytes:
    """Send one HTTP request to the forwarder's dashboard sign-in handler; return its answer."""
    a, b = socket.socketpair()
    with a, b:
        a.sendall(request)
        assert fwd._maybe_login(b)
        a.settimeout(2)
        return a.recv(4096)


def forwarder():
    from raybridge.transport.tunnel import Forwarder, Route, Target

    fwd = Forwarder(lambda: None, lambda c: None, {"dashboard": 18265})
    fwd.route = Route({"dashboard": Target("dashboard", "10.0.0.1", 8265)}, token="s3cret")
    return fwd


def login(nonce: str, host: str = "127.0.0.1:18265") -> bytes:
    return f"GET /raybridge/login/{nonce} HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n\r\n".encode()


def test_the_sign_in_link_works_once_and_sets_a_random_httponly_session_cookie():
    fwd = forwarder()
    first = signed_in(fwd, login(fwd.nonce))
    assert first.startswith(b"HTTP/1.1 302 Found")
    cookie = next(line for line in first.split(b"\r\n") if line.startswith(b"Set-Cookie:"))
    assert cookie.startswith(b"Set-Cookie: raybridge-session=") and b"HttpOnly" in cookie
    assert b"s3cret" not in first  # the Ray token never reaches the browser
    assert b"Max-Age" not in cookie and b"Expires" not in cookie  # ends with the browser session
    again = signed_in(fwd, login(fwd.nonce))
    assert again.startswith(b"HTTP/1.1 403") and b"s3cret" not in again
    fwd.renew_login()
    assert signed_in(fwd, login(fwd.nonce)).startswith(b"HTTP/1.1 302")


def test_the_sign_in_link_expires_and_wants_a_loopback_host(monkeypatch):
    from raybridge.transport import tunnel

    fwd = forwarder()
    for host in ("evil.example:18265", "127.0.0.1.evil.example", "10.0.0.5:18265"):
        assert signed_in(fwd, login(fwd.nonce, host)).startswith(b"HTTP/1.1 403")  # DNS rebinding
    wrong = ("y" if fwd.nonce[0] == "x" else "x") + fwd.nonce[1:]
    assert signed_in(fwd, login(wrong)).startswith(b"HTTP/1.1 403")  # a wrong nonce
    now = tunnel.time.monotonic()
    monkeypatch.setattr(tunnel.time, "monotonic", lambda: now + tunnel.LINK_TTL_S + 1)
    assert signed_in(fwd, login(fwd.nonce)).startswith(b"HTTP/1.1 403")  # too late


def test_other_requests_go_to_the_dashboard():
    fwd = forwarder()
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert not fwd._maybe_login(b)
        assert b.recv(100).startswith(b"GET /api/version")  # left unread for the dashboard


def test_a_sign_in_request_that_arrives_in_pieces_is_read_whole():
    import threading
    import time

    fwd = forwarder()
    request = login(fwd.nonce)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(request[:20])  # the request line cut short: the Host header comes later

        def rest():
            time.sleep(0.1)
            a.sendall(request[20:])

        threading.Thread(target=rest).start()
        assert fwd._maybe_login(b)
        a.settimeout(2)
        assert a.recv(4096).startswith(b"HTTP/1.1 302 Found")


@pytest.mark.parametrize(
    "raw, page",
    [
        (b"/%23/cluster", "/#/cluster"),
        (None, "/"),
        (b"//evil.example", "/"),
        (b"/%0d%0aSet-Cookie:%20x=1", "/"),  # would end the Location header and add one of its own
        (b"/a%09b", "/"),
        (b"/%5c%5cevil", "/"),
    ],
)
def test_where_a_signed_in_browser_goes(raw, page):
    from raybridge.transport.tunnel import next_page

    assert next_page(raw) == page


def session_of(answer: bytes) -> bytes:
    cookie = next(line for line in answer.split(b"\r\n") if line.startswith(b"Set-Cookie:"))
    return cookie.split(b"=", 1)[1].split(b";")[0]


def authorized(fwd, request: bytes) -> tuple[bytes, bytes]:
    """What the tunnel would send to the dashboard first, and what it left unread."""
    a, b = socket.socketpair()
    with a, b:
        a.sendall(request)
        head = b.recv(65536, socket.MSG_PEEK)
        first = fwd.authorize(b, head)
        a.close()
        b.settimeout(1)
        rest = b"".join(iter(lambda: b.recv(4096), b""))
        return first, rest


def test_a_signed_in_browser_gets_the_token_added_by_the_tunnel():
    fwd = forwarder()
    session = session_of(signed_in(fwd, login(fwd.nonce)))
    body = b'{"a": 1}'
    request = (
        b"POST /api/jobs/ HTTP/1.1\r\nHost: 127.0.0.1:18265\r\n"
        b"Cookie: theme=dark; raybridge-session=" + session + b"; x=y\r\n"
        b"Authorization: Bearer forged\r\nConnection: keep-alive\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    first, rest = authorized(fwd, request)
    lines = first.split(b"\r\n")
    assert lines[0] == b"POST /api/jobs/ HTTP/1.1"
    assert b"Authorization: Bearer s3cret" in lines and b"Authorization: Bearer forged" not in lines
    assert b"Cookie: theme=dark; x=y" in lines and session not in first  # the session stays here
    assert b"Connection: close" in lines and b"Connection: keep-alive" not in lines
    assert first.endswith(b"\r\n\r\n") and rest == body  # the body is left for the pump


@pytest.mark.parametrize("cookie", [None, b"raybridge-session=guess", b"ray-authentication-token=s3cret"])
def test_a_request_without_a_valid_session_is_left_as_it_is(cookie):
    fwd = forwarder()
    signed_in(fwd, login(fwd.nonce))  # some session exists, just not this one
    request = b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    request += (b"Cookie: " + cookie + b"\r\n" if cookie else b"") + b"\r\n"
    first, rest = authorized(fwd, request)
    assert first == b"" and rest == request  # unread, unchanged: the dashboard decides (401)


def test_a_websocket_upgrade_keeps_its_connection_header_and_a_new_token_ends_sessions():
    from raybridge.transport.tunnel import Route, Target

    fwd = forwarder()
    session = session_of(signed_in(fwd, login(fwd.nonce)))
    request = (
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Cookie: raybridge-session=" + session + b"\r\n\r\n"
    )
    first, _ = authorized(fwd, request)
    assert b"Connection: Upgrade" in first and b"Connection: close" not in first
    # The cluster restarts with a new token: browsers must sign in again.
    fwd._set_route(Route({"dashboard": Target("dashboard", "10.0.0.1", 8265)}, token="n3w"))
    assert authorized(fwd, request)[0] == b""
