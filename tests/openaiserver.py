"""A small OpenAI-compatible server of the tests' own, for what `transformers serve` cannot show: logprobs, 429 with
Retry-After, 500s, malformed JSON, an answer that drips, a server that dies mid-run. Deterministic answers:
a caption names the image's digest and the prompt's length; a judge says yes when its question's length is not a
multiple of 3 (with logprobs for the first token when asked and `logprobs` is on)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def judge_says(question: str) -> str:
    return "yes" if len(question) % 3 else "no"


class FakeOpenAI:
    def __init__(self, model: str = "fake/model", *, logprobs: bool = True) -> None:
        self.model, self.logprobs = model, logprobs
        self.lock = threading.Lock()
        self.chats = 0  # chat requests received
        self.captions = 0  # of which caption requests (an image in the message), answered well or not
        self.busy_first = 0  # the first N caption requests (an image in the message) answer 429 with Retry-After
        self.busy = 0
        self.retry_after = "1"
        self.fail = None  # fn(text) -> status to answer (e.g. 500), or None
        self.malformed = None  # fn(text) -> True: a 200 whose body is not JSON
        self.drip_s = 0.0  # seconds between the bytes of an answer
        self.die_after = None  # chat requests after which the server stops answering (closes its socket)
        self.bodies: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, payload, headers: dict | None = None) -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if owner.drip_s:
                    for i in range(len(data)):
                        self.wfile.write(data[i : i + 1])
                        self.wfile.flush()
                        time.sleep(owner.drip_s)
                else:
                    self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": owner.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with owner.lock:
                    owner.chats += 1
                    n = owner.chats
                    owner.bodies.append(body)
                if owner.die_after is not None and n > owner.die_after:
                    self.close_connection = True
                    self.connection.close()
                    return
                if body.get("model") != owner.model:
                    msg = f"The model `{body.get('model')}` does not exist."
                    return self._send(404, {"error": {"message": msg, "code": "model_not_found"}})
                user = body["messages"][-1]["content"]
                image = None
                if isinstance(user, list):
                    image = next(p["image_url"]["url"] for p in user if p["type"] == "image_url")
                    text = next(p["text"] for p in user if p["type"] == "text")
                else:
                    text = user
                with owner.lock:
                    busy = image is not None and owner.busy < owner.busy_first
                    owner.busy += busy
                    owner.captions += image is not None
                if busy:
                    return self._send(429, {"error": {"message": "busy"}}, {"Retry-After": owner.retry_after})
                if owner.fail and (status := owner.fail(text)):
                    return self._send(status, {"error": {"message": f"server error for this request ({status})"}})
                if owner.malformed and owner.malformed(text):
                    return self._send(200, b'{"choices": [')
                if image is not None:
                    digest = hashlib.sha1(image.encode()).hexdigest()[:8]
                    content = f"a product photo {digest} for a request of {len(text)} characters"
                    logprobs = None
                else:
                    content = judge_says(text)
                    logprobs = None
                    if body.get("logprobs") and owner.logprobs:
                        other = "no" if content == "yes" else "yes"
                        top = [{"token": content, "logprob": -0.1}, {"token": other, "logprob": -2.5}]
                        top += [{"token": f"t{i}", "logprob": -5.0 - i} for i in range(3)]
                        logprobs = {"content": [{"token": content, "logprob": -0.1, "top_logprobs": top}]}
                choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                choice["logprobs"] = logprobs
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{n}",
                        "object": "chat.completion",
                        "model": owner.model,
                        "choices": [choice],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
                    },
                )

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
