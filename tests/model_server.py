"""A local HTTP server that answers like hosted model APIs, for testing the hosted providers and generators
without a network: an HF inference / TGI endpoint (POST -> [{"generated_text": ...}]) and an
OpenAI-compatible `/chat/completions`. It records every request and can fail the first calls."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeModelServer:
    def __init__(
        self, chat_content: str = "", generated_text: str = "", fail_first: int = 0, fail_status: int = 503
    ) -> None:
        self.chat_content = chat_content
        self.generated_text = generated_text
        self.fail_first = fail_first
        self.requests: list[tuple[str, dict, bytes]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                owner.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                if len(owner.requests) <= owner.fail_first:
                    status, reply = fail_status, {"error": "model is loading"}
                elif self.path.endswith("/chat/completions"):
                    status = 200
                    reply = {"choices": [{"message": {"role": "assistant", "content": owner.chat_content}}]}
                else:
                    status, reply = 200, [{"generated_text": owner.generated_text}]
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def json_bodies(self) -> list[dict]:
        return [json.loads(body) for _, _, body in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
