"""/health and /queue as JSON (stdlib http.server, one thread per request). Bound to 127.0.0.1 by default:
put a reverse proxy in front to expose it. No patient data: jobs appear by their hashed UID. Each route is
called with the request's query parameters (``/queue?limit=200``)."""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StatusServer:
    def __init__(self, host: str, port: int, health: Callable[[dict], dict], queue: Callable[[dict], dict]):
        routes = {"/health": health, "/queue": queue}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                route = routes.get(url.path.rstrip("/") or "/")
                if route is None:
                    self._send(404, {"error": f"no such path {self.path}; try /health or /queue"})
                    return
                try:
                    self._send(200, route(dict(urllib.parse.parse_qsl(url.query))))
                except ValueError as e:
                    self._send(400, {"error": str(e)})
                except Exception as e:  # noqa: BLE001 -- an answer, not a dead thread
                    self._send(500, {"error": str(e)})

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body, default=str).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # no request lines on the node's terminal
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="evim3-http", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
