import socket

import pytest

from raybridge.tunnel import PortInUse, check_free


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
