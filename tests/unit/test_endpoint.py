"""The serving path's own parts, on local sockets: the head's authenticated front, and the endpoint that
follows current.json from one generation to the next (no request lost across a handover)."""

import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from raybridge.agent.serve import Front, ServeRecord
from raybridge.client import endpoint as ep
from raybridge.transport.runner import LocalRunner


def upstream(label: str):
    """A stand-in for Serve's proxy: answers with its label and the headers it got."""

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            body = json.dumps({"label": label, "path": self.path, "headers": dict(self.headers)}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def get(url: str, token: str | None = None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None


def test_the_front_passes_only_requests_with_its_token_and_never_the_token_itself():
    up = upstream("g1")
    front = Front("127.0.0.1", 0, up.server_address, "secret-1")
    port = front.sock.getsockname()[1]
    assert get(f"http://127.0.0.1:{port}/x")[0] == 401
    assert get(f"http://127.0.0.1:{port}/x", "wrong")[0] == 401
    code, body = get(f"http://127.0.0.1:{port}/classify?x=1", "secret-1")
    assert code == 200 and body["path"] == "/classify?x=1"
    assert "Authorization" not in body["headers"] and body["headers"]["Connection"] == "close"
    assert front.requests == 1
    front.close()
    up.shutdown()


def publish(shared, name: str, generation: int, front: Front, token: str) -> None:
    folder = shared / "serve" / name
    folder.mkdir(parents=True, exist_ok=True)
    token_path = shared / f"token-{generation}"
    token_path.write_text(token + "\n")
    address = f"127.0.0.1:{front.sock.getsockname()[1]}"
    record = ServeRecord(name, generation, str(100 + generation), address, str(token_path), 0.0)
    (folder / "current.json").write_text(record.to_json())


def test_the_endpoint_follows_a_handover_and_loses_no_request(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    shared = tmp_path / "shared"
    up1, up2 = upstream("g1"), upstream("g2")
    f1 = Front("127.0.0.1", 0, up1.server_address, "t1")
    publish(shared, "demo", 1, f1, "t1")
    bound = {}
    ready = threading.Event()

    def on_ready(port, path, router):
        bound.update(port=port, path=path, router=router)
        ready.set()

    threading.Thread(
        target=ep.serve_endpoint, args=(LocalRunner(), str(shared), "demo", 0, on_ready), daemon=True
    ).start()
    assert ready.wait(10)
    url = f"http://127.0.0.1:{bound['port']}/classify"
    token = bound["path"].read_text().strip()
    assert oct(bound["path"].stat().st_mode & 0o777) == "0o600"
    assert token not in ("t1", "t2")  # the clients' token is the endpoint's own
    assert get(url)[0] == 401 and get(url, "t1")[0] == 401
    code, body = get(url, token)
    assert code == 200 and body["label"] == "g1" and "Authorization" not in body["headers"]
    # A steady stream of requests while generation 2 takes over and generation 1 goes away.
    results = []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            code, body = get(url, token)
            results.append((code, body["label"] if body else None))

    loader = threading.Thread(target=load)
    loader.start()
    pause = threading.Event()
    pause.wait(1.0)
    f2 = Front("127.0.0.1", 0, up2.server_address, "t2")
    publish(shared, "demo", 2, f2, "t2")
    # The old generation goes at once, before the endpoint's next look at current.json (every 0.5 s):
    # requests still sent its way are refused and must go to the new one.
    f1.close()  # (its proxy finishes what it already has, as Serve's drain does: shut down at the end)
    pause.wait(1.5)
    # The switch is due within a look or two; a busy machine may delay the endpoint's thread.
    deadline = time.monotonic() + 15
    while (not results or results[-1][1] != "g2") and time.monotonic() < deadline:
        pause.wait(0.1)
    stop.set()
    loader.join()
    assert results and all(code == 200 for code, _ in results), [r for r in results if r[0] != 200]
    labels = [label for _, label in results]
    assert labels[-1] == "g2" and "g2" in labels
    assert bound["router"].switches == 1
    f2.close()
    up1.shutdown()
    up2.shutdown()
