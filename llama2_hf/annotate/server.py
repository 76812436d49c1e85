"""`llama2-hf annotate`: a local web page where people compare two responses (paper §3.2.1).

A `ThreadingHTTPServer` from the standard library serves the page (`page.py`) and a two-call JSON API:
  - `GET /api/next?annotator=NAME` -> `{"pair": {...} | null, "progress": {...}}` (null: every pair is answered);
  - `POST /api/answer` with `{"annotator", "id", "choice": "a"|"b", "rating", "safety_a", "safety_b"}` ->
    200 `{"recorded": "preferences"|"excluded", "progress"}` once the answer is on disk; 400 for an invalid answer,
    409 for a pair that already has an answer.
Storage, the answer schema and the protocol choices are described in `storage.py`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from ..runner import UsageError, run_command
from .page import PAGE
from .storage import AnswerStore, DuplicateAnswer, InvalidAnswer, load_pairs

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 16  # an answer is a few hundred bytes; refuse anything that is plainly not one


@dataclass
class AnnotateArguments:
    """Arguments of `llama2-hf annotate`."""

    pairs_file: str = field(metadata={"help": "JSONL of pairs to compare: id, prompt (text or messages), response_a, "
                                              "response_b, optional is_safety_prompt and version"})
    output_file: str = field(metadata={"help": "JSONL the answers are appended to (preference rows the reward "
                                               "trainer reads); answers already in it are not asked again"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (127.0.0.1: this machine only; "
                                                             "0.0.0.0 lets other machines of the network in)"})
    port: int = field(default=8000, metadata={"help": "port to listen on (0: any free port, logged at start)"})
    version: int | None = field(default=None, metadata={
        "help": "RLHF version (1, 2, ...) written on answers whose pair has no 'version' of its own"})

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be 0 to 65535, got {self.port}")
        if Path(self.pairs_file).resolve() == Path(self.output_file).resolve():
            raise UsageError("--output_file must differ from --pairs_file (answers are appended to it)")


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        logger.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8")

    def do_GET(self):  # noqa: N802 - http.server's naming
        url = urlsplit(self.path)
        store = self.server.store
        if url.path == "/":
            self._send(HTTPStatus.OK, PAGE.encode("utf-8"), "text/html; charset=utf-8")
        elif url.path == "/api/next":
            annotator = parse_qs(url.query).get("annotator", [""])[0].strip()
            if not annotator:
                self._json(HTTPStatus.BAD_REQUEST, {"error": "give an annotator name"})
                return
            pair = store.next_pair(annotator, time.monotonic())
            self._json(HTTPStatus.OK, {"pair": pair and pair.to_page(), "progress": store.progress(annotator)})
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {url.path!r}"})

    def do_POST(self):  # noqa: N802
        if urlsplit(self.path).path != "/api/answer":
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path!r}"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY_BYTES:
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"expected a JSON answer of at most {MAX_BODY_BYTES} bytes"})
            return
        try:
            answer = json.loads(self.rfile.read(length))
            if not isinstance(answer, dict):
                raise InvalidAnswer("expected a JSON object")
            kind = self.server.store.record(
                str(answer.get("id")), answer.get("annotator") or "", answer.get("choice"), answer.get("rating"),
                answer.get("safety_a"), answer.get("safety_b"))
        except DuplicateAnswer as e:
            self._json(HTTPStatus.CONFLICT, {"error": str(e)})
        except (InvalidAnswer, json.JSONDecodeError) as e:
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"answer not recorded: {e}"})
        else:
            annotator = answer["annotator"].strip()
            self._json(HTTPStatus.OK, {"recorded": kind, "progress": self.server.store.progress(annotator)})


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a browser's kept-alive connection must not block shutdown

    store: AnswerStore  # set by `make_server` once the address is bound

    def __init__(self, address):
        super().__init__(address, _Handler)


def make_server(pairs_file: str, output_file: str, host: str = "127.0.0.1", port: int = 8000,
                version: int | None = None) -> ThreadingHTTPServer:
    """Validate the pairs, bind the address, read back earlier answers; the server is not serving yet. A bad file
    raises `InvalidDataFile` (naming file, line and field), a bad argument or a taken port `UsageError`, before any
    file is created."""
    AnnotateArguments(pairs_file, output_file, host, port, version)  # the same checks as the command line
    pairs = load_pairs(pairs_file)
    try:
        server = _Server((host, port))
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port") from None
    try:
        server.store = AnswerStore(pairs, output_file, version=version)
    except BaseException:
        server.server_close()
        raise
    return server


def serve(pairs_file: str, output_file: str, host: str = "127.0.0.1", port: int = 8000,
          version: int | None = None) -> None:
    """Serve the annotation page until interrupted (Ctrl-C). Every answer is on disk before the page hears back."""
    server = make_server(pairs_file, output_file, host, port, version)
    bound_host, bound_port = server.server_address[:2]
    logger.info("annotation page at http://%s:%d/ (%d pairs left; Ctrl-C stops, nothing is lost)", bound_host,
                bound_port, server.store.left_count)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("stopped")
    finally:
        server.server_close()
        server.store.close()


def main(argv: list[str] | None = None) -> int:
    """`llama2-hf annotate --pairs_file pairs.jsonl --output_file prefs.jsonl [--port 8000] [--host 127.0.0.1]`.
    A bad pairs or answers file prints one line naming the file, line and field, and exits with code 2."""
    from trl import TrlParser

    parser = TrlParser((AnnotateArguments,), prog="llama2-hf annotate", description=__doc__.split("\n")[0])
    return run_command("annotate", sys.argv[1:] if argv is None else argv,
                       lambda args: serve(**asdict(parser.parse_args_and_config(args)[0])))
