"""A local HTTP server that answers like the Gemini API's generateContent, for tests that
drive the real google-genai SDK: scripted answers (text, HTTP errors, delays) in order, or
chosen by a function of the request (`FakeGemini([by_prompt])`, `prompt_of(body)`)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def answer(text: str) -> tuple:
    return (
        "ok",
        200,
        {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP"}]},
    )


def error(code: int, status: str, message: str) -> tuple:
    return ("error", code, {"error": {"code": code, "message": message, "status": status}})


def delay(seconds: float, then: tuple) -> tuple:
    return ("delay", seconds, then)


def prompt_of(body: dict) -> str:
    """The text parts of a generateContent request, joined."""
    return " ".join(p["text"] for c in body.get("contents", []) for p in c.get("parts", []) if "text" in p)


class FakeGemini:
    """`with FakeGemini([answer(...), ...]) as g:` then point the SDK at g.url; g.requests
    records (path, headers, body) per request. When the script runs out the last entry repeats.
    An entry that is a function is called with the request body and returns the step to take."""

    def __init__(self, script: list[tuple]):
        self.script, self.requests = list(script), []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                fake.requests.append((self.path, dict(self.headers), body))
                step = fake.script.pop(0) if len(fake.script) > 1 else fake.script[0]
                if callable(step):
                    step = step(body)
                if step[0] == "delay":
                    time.sleep(step[1])
                    step = step[2]
                payload = json.dumps(step[2]).encode()
                try:
                    self.send_response(step[1])
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
