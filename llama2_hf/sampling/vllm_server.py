"""The vLLM engine server that `llama2_hf.vllm_engine.VLLMEngine` starts in vLLM's own environment.

vLLM pins other library versions than this package (e.g. `transformers<5.20`), so the engine runs in its own
virtual environment and this file is executed there as a script: it imports only the standard library and vllm
(never `llama2_hf`). It serves, on 127.0.0.1 only:

    GET  /health        -> {"ok": true}
    POST /generate      {"prompts": [[ids]], "n", "temperature", "top_p", "max_tokens", "stop_token_ids", "seeds"}
                        -> {"outputs": [[[ids] x n] per prompt], "finish_reasons": [[str] x n]}
    POST /load_weights  {"path": folder of *.safetensors}  -> weights reloaded in place, prefix cache reset
    POST /shutdown

Prompts are token ids (Meta's chat format is built by the caller's tokenizer), so vLLM's tokenizer is never used.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace


def build_engine(args):
    from vllm import LLM

    return LLM(model=args.model, skip_tokenizer_init=True, dtype=args.dtype, enforce_eager=args.enforce_eager,
               seed=args.seed, max_model_len=args.max_model_len, tensor_parallel_size=args.tensor_parallel_size,
               enable_prefix_caching=True)


def generate(llm, request: dict) -> dict:
    from vllm import SamplingParams

    prompts = request["prompts"]
    seeds = request.get("seeds") or [None] * len(prompts)
    params = [SamplingParams(n=int(request.get("n", 1)), temperature=float(request["temperature"]),
                             top_p=float(request.get("top_p", 1.0)), max_tokens=int(request["max_tokens"]),
                             stop_token_ids=list(request.get("stop_token_ids") or []), seed=seed, detokenize=False)
              for seed in seeds]
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return {"outputs": [[list(o.token_ids) for o in r.outputs] for r in results],
            "finish_reasons": [[o.finish_reason for o in r.outputs] for r in results]}


def load_weights(llm, request: dict) -> dict:
    path = request["path"]
    if not os.path.isdir(path):
        raise ValueError(f"no such folder: {path}")
    llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
    llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
    return {"ok": True}


def serve(args) -> None:
    llm = build_engine(args)
    lock = threading.Lock()  # one engine call at a time

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            if self.path == "/health":
                self._reply(200, {"ok": True})
            else:
                self._reply(404, {"error": f"unknown path {self.path}"})

        def do_POST(self):  # noqa: N802
            length = int(self.headers.get("Content-Length", 0))
            try:
                request = json.loads(self.rfile.read(length) or b"{}")
                if self.path == "/shutdown":
                    self._reply(200, {"ok": True})
                    threading.Thread(target=server.shutdown, daemon=True).start()
                    return
                handler = {"/generate": generate, "/load_weights": load_weights}.get(self.path)
                if handler is None:
                    self._reply(404, {"error": f"unknown path {self.path}"})
                    return
                with lock:
                    body = handler(llm, request)
                self._reply(200, body)
            except Exception as e:  # noqa: BLE001 - reported to the client, which raises it
                self._reply(500, {"error": f"{type(e).__name__}: {e}"})

        def log_message(self, format, *args):  # noqa: A002 - silence per-request lines
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"llama2_hf vllm server ready on port {args.port}", flush=True)
    server.serve_forever()


SETTINGS = {"model": None, "port": None, "dtype": "float32", "seed": 0, "max_model_len": None,
            "tensor_parallel_size": 1, "enforce_eager": False}


def main(argv=None) -> int:
    """`python vllm_server.py '<JSON settings>'`: the keys of SETTINGS (model and port required). One JSON argument
    written by `VLLMEngine.start`, so this script needs no parser of its own."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(f"usage: {Path(__file__).name} '<JSON settings: {sorted(SETTINGS)}>'", file=sys.stderr)
        return 2
    given = json.loads(argv[0])
    unknown = set(given) - set(SETTINGS)
    missing = {k for k in ("model", "port") if given.get(k) is None}
    if unknown or missing:
        print(f"unknown settings {sorted(unknown)}, missing {sorted(missing)}", file=sys.stderr)
        return 2
    serve(SimpleNamespace(**{**SETTINGS, **given}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
