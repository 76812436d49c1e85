"""The annotation page of the preference protocol (paper §3.2.1): `llama2-hf annotate`.

`serve(pairs_file, output_file, host, port)` serves a local page where annotators compare two responses; each answer
is appended at once to `output_file` as a preference row the reward trainer reads. See `storage.py` for the file
formats and the protocol's choices (one answer per pair, excluded unsafe-preferred pairs), `server.py` for the API.
"""

from .server import AnnotateArguments, main, make_server, serve
from .storage import AnswerStore, DuplicateAnswer, InvalidAnswer, Pair, answer_row, excluded_path, load_pairs

__all__ = ["AnnotateArguments", "AnswerStore", "DuplicateAnswer", "InvalidAnswer", "Pair", "answer_row",
           "excluded_path", "load_pairs", "main", "make_server", "serve"]
