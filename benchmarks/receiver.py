"""A CloudEvents HTTP receiver for the benchmarks, run as its own process (its own GIL).

    python benchmarks/receiver.py --port 9900                      # count events, answer 202 fast
    python benchmarks/receiver.py --port 9900 --ids-file ids.txt   # also decode and record ids

Without `--ids-file` it only counts (a binary-mode POST is one event, a batch is a JSON array), so
it costs as little CPU as it can. With it, every message is decoded with infer-logger's own codec
(`from_http_many`) and each event is appended as `<id> <request|response|explanation>` to the
file, flushed before the 202 goes out (so a restart of the receiver loses nothing it acknowledged).
`GET /count` answers {"posts": n, "events": n, "rejected": n}.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Any

import orjson
import uvicorn

_KIND = {
    "org.kubeflow.serving.inference.request": "request",
    "org.kubeflow.serving.inference.response": "response",
    "org.kubeflow.serving.inference.explanation": "explanation",
}


class Receiver:
    def __init__(self, ids_file: str | None) -> None:
        self.posts = 0
        self.events = 0
        self.rejected = 0
        self._ids = open(ids_file, "a", encoding="utf-8") if ids_file else None  # noqa: SIM115
        if self._ids is not None:
            from infer_logger.cloudevents.http import from_http_many
            from infer_logger.errors import InvalidEventError

            self._decode = from_http_many
            self._invalid = InvalidEventError

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self._ids is not None:
                        self._ids.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if scope["method"] == "GET":
            out = orjson.dumps({"posts": self.posts, "events": self.events, "rejected": self.rejected})
            await _respond(send, 200, out)
            return
        self.posts += 1
        if self._ids is None:
            content_type = b""
            for k, v in scope["headers"]:
                if k == b"content-type":
                    content_type = v
            if content_type.startswith(b"application/cloudevents-batch"):
                self.events += len(orjson.loads(body))
            else:
                self.events += 1
            await _respond(send, 202, b"")
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            events = self._decode(headers, body)
        except self._invalid as exc:
            self.rejected += 1
            await _respond(send, 400, orjson.dumps({"error": str(exc)}))
            return
        self._ids.write("".join(f"{e.id} {_KIND.get(e.type, e.type)}\n" for e in events))
        self._ids.flush()
        self.events += len(events)
        await _respond(send, 202, b"")


async def _respond(send: Any, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode()),
                            (b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ids-file", help="Decode every event and append `<id> <kind>` lines here.")
    args = parser.parse_args(argv)
    if args.host != "127.0.0.1":
        sys.exit("the benchmark receiver listens on 127.0.0.1 only")
    uvicorn.run(
        Receiver(args.ids_file),
        host=args.host,
        port=args.port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        log_level="warning",
        access_log=False,
        lifespan="on",
    )


if __name__ == "__main__":
    main()
