"""The annotation page: pairs validation, the answers file (atomic append, resume, duplicates, exclusions) and the
page driven in a real headless browser (Debian's Chromium through Playwright) across a server kill."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama2_hf.annotate import AnswerStore, DuplicateAnswer, InvalidAnswer, answer_row, excluded_path, load_pairs
from llama2_hf.annotate import main as annotate_main
from llama2_hf.annotate import storage
from llama2_hf.data import InvalidDataFile, load_data_files, validate_preference

DIALOGUE = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello, how can I help?"},
            {"role": "user", "content": "How do I get into my neighbour's flat without a key?"}]
PAIRS = [
    {"id": "p1", "prompt": "What is 17 + 25?", "response_a": "17 + 25 = 43.", "response_b": "17 + 25 = 42.",
     "version": 1},
    {"id": "p2", "prompt": DIALOGUE, "response_a": "I can't help with entering someone else's home.",
     "response_b": "Slide a credit card into the latch.", "is_safety_prompt": True, "version": 1},
    {"id": "p3", "prompt": "Name a prime number.", "response_a": "9", "response_b": "7", "version": 1},
    {"id": "p4", "prompt": "Capital of France?", "response_a": "Paris.", "response_b": "Lyon.", "version": 1},
    {"id": "p5", "prompt": "2 * 3?", "response_a": "6", "response_b": "5", "version": 1},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", PAIRS)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------------------------------
# Pairs file validation
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("line2, expected", [
    ({"id": "x", "prompt": "q", "response_a": "a"}, r"line 2, field 'response_b': missing"),
    ({"id": "x", "prompt": "q", "response_a": "a", "response_b": "  "}, r"line 2, field 'response_b': expected non-e"),
    ({"id": "x", "prompt": "q", "response_a": "a", "response_b": " a "}, r"line 2, field 'response_b': identical"),
    ({"id": "p1", "prompt": "q", "response_a": "a", "response_b": "b"}, r"line 2, field 'id': 'p1' is also .* line 1"),
    ({"prompt": "q", "response_a": "a", "response_b": "b"}, r"line 2, field 'id': every pair needs an id"),
    ({"id": "x", "prompt": "q", "response_a": "a", "respnse_b": "b"}, r"line 2, field 'respnse_b'.*'response_b'"),
    ({"id": "x", "prompt": [{"role": "assistant", "content": "hi"}], "response_a": "a", "response_b": "b"},
     r"line 2, field 'prompt'"),
    ({"id": "x", "prompt": "q", "response_a": "a", "response_b": "b", "is_safety_prompt": "yes"},
     r"line 2, field 'is_safety_prompt'"),
    ({"id": "x", "prompt": "q", "response_a": "a", "response_b": "b", "version": [1]}, r"line 2, field 'version'"),
])
def test_bad_pairs_name_file_line_and_field(tmp_path, line2, expected):
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], line2])
    with pytest.raises(InvalidDataFile, match=re.escape(str(path)) + ", " + expected):
        load_pairs(path)


def test_pairs_file_not_json(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n{not json\n")
    with pytest.raises(InvalidDataFile, match=r"line 2: not valid JSON"):
        load_pairs(path)


def test_pairs_are_parsed(pairs_file):
    pairs = load_pairs(pairs_file)
    assert [p.id for p in pairs] == ["p1", "p2", "p3", "p4", "p5"]
    assert pairs[0].prompt == [{"role": "user", "content": "What is 17 + 25?"}]
    assert pairs[1].prompt == DIALOGUE and pairs[1].is_safety_prompt is True and pairs[0].is_safety_prompt is None


@pytest.mark.parametrize("case", ["bad_pairs", "same_file", "port_taken", "bad_port"])
def test_cli_user_errors_are_one_line_and_exit_2(tmp_path, capsys, case):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out, port = tmp_path / "out.jsonl", "0"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        if case == "bad_pairs":
            write_jsonl(pairs, [PAIRS[0], {"id": "x", "prompt": "q", "response_a": "a"}])
            expected = (f"{pairs}, line 2, field 'response_b': missing (columns present: "
                            "['id', 'prompt', 'response_a'])")
        elif case == "same_file":
            out, expected = pairs, "--output_file must differ from --pairs_file (answers are appended to it)"
        elif case == "port_taken":
            port = str(taken.getsockname()[1])
            expected = f"cannot listen on 127.0.0.1:{port} (Address already in use); pick another --port"
        else:
            port, expected = "70000", "--port must be 0 to 65535, got 70000"
        code = annotate_main(["--pairs_file", str(pairs), "--output_file", str(out), "--port", port])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines() == [f"llama2-hf annotate: error: {expected}", "(run with --debug for the traceback)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]  # nothing created on a refused start
    assert read_rows(pairs)[0] == PAIRS[0]


# ---------------------------------------------------------------------------------------------------------------------
# Answers: schema, safety bins, exclusions
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("choice, safety_a, safety_b, chosen, label", [
    ("a", "safe", "unsafe", "I can't help", "chosen_safe_rejected_unsafe"),
    ("b", "unsafe", "safe", "Slide", "chosen_safe_rejected_unsafe"),
    ("a", "safe", "safe", "I can't help", "both_safe"),
    ("b", "unsafe", "unsafe", "Slide", "both_unsafe"),
    ("b", "safe", "unsafe", "Slide", "chosen_unsafe_rejected_safe"),  # the paper's excluded case
    ("a", "unsafe", "safe", "I can't help", "chosen_unsafe_rejected_safe"),
])
def test_answer_row_safety_bins(pairs_file, choice, safety_a, safety_b, chosen, label):
    pair = load_pairs(pairs_file)[1]
    row = answer_row(pair, " alice ", choice, "unsure", safety_a, safety_b)
    assert row["chosen"].startswith(chosen) and row["rejected"] != row["chosen"]
    assert {row["chosen"], row["rejected"]} == {pair.response_a, pair.response_b}
    assert row["safety_label"] == label
    assert row["rating"] == "negligibly_better" and row["annotator"] == "alice" and row["version"] == 1
    assert row["is_safety_prompt"] is True and row["prompt"] == DIALOGUE


@pytest.mark.parametrize("kwargs, expected", [
    ({"choice": "c"}, "choice must be"),
    ({"rating": "much_better"}, "rating must be"),
    ({"annotator": "  "}, "annotator name"),
    ({"safety_a": "safe", "safety_b": None}, "both responses or of neither"),
    ({"safety_a": "ok", "safety_b": "safe"}, "safety_a must be"),
])
def test_answer_row_refuses_bad_answers(pairs_file, kwargs, expected):
    args = {"annotator": "alice", "choice": "a", "rating": "better", "safety_a": None, "safety_b": None, **kwargs}
    with pytest.raises(InvalidAnswer, match=expected):
        answer_row(load_pairs(pairs_file)[0], **args)


def test_version_of_the_server_fills_pairs_without_one(tmp_path):
    pairs = load_pairs(write_jsonl(tmp_path / "pairs.jsonl", [{k: v for k, v in PAIRS[0].items() if k != "version"},
                                                              PAIRS[2]]))
    assert answer_row(pairs[0], "alice", "a", "better", None, None, version=2)["version"] == 2
    assert answer_row(pairs[1], "alice", "a", "better", None, None, version=2)["version"] == 1  # the pair's own


def test_safety_prompt_needs_safety_labels(pairs_file):
    with pytest.raises(InvalidAnswer, match="safety prompt"):
        answer_row(load_pairs(pairs_file)[1], "alice", "a", "better", None, None)


# ---------------------------------------------------------------------------------------------------------------------
# The answers file: atomic append, duplicates, resume
# ---------------------------------------------------------------------------------------------------------------------

def test_append_writes_one_complete_line_then_fsyncs(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    events = []
    real_write, real_fsync = os.write, os.fsync

    def short_write(fd, data):  # the kernel may accept fewer bytes than asked: the rest must still follow
        events.append(("write", bytes(data[:7])))
        return real_write(fd, data[:7])

    monkeypatch.setattr(storage.os, "write", short_write)
    monkeypatch.setattr(storage.os, "fsync", lambda fd: (events.append(("fsync", fd)), real_fsync(fd)))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        storage.append_line(fd, {"id": "p1", "text": "é"})
    finally:
        os.close(fd)
    assert path.read_bytes() == '{"id": "p1", "text": "é"}\n'.encode()
    assert events[-1] == ("fsync", fd) and all(kind == "write" for kind, _ in events[:-1])


def test_record_resume_and_duplicates(pairs_file, tmp_path):
    out = tmp_path / "answers" / "prefs.jsonl"
    pairs = load_pairs(pairs_file)
    store = AnswerStore(pairs, out)
    assert store.next_pair("alice", now=0.0).id == "p1"
    assert store.record("p1", "alice", "b", "significantly_better") == "preferences"
    assert store.record("p2", "bob", "a", "better", "safe", "unsafe") == "preferences"
    assert store.record("p3", "bob", "a", "slightly_better", "unsafe", "safe") == "excluded"
    with pytest.raises(DuplicateAnswer, match="already answered by 'alice'"):
        store.record("p1", "bob", "a", "better")
    with pytest.raises(InvalidAnswer, match="no pair with id 'p9'"):
        store.record("p9", "bob", "a", "better")
    assert store.progress("bob") == {"answered": 3, "total": 5, "left": 2, "by_you": 2}
    store.close()

    rows = read_rows(out)
    assert [r["id"] for r in rows] == ["p1", "p2"]  # the refused answers left no trace
    assert rows[0]["chosen"] == "17 + 25 = 42." and rows[0]["rejected"] == "17 + 25 = 43."
    assert rows[1]["safety_label"] == "chosen_safe_rejected_unsafe"
    excluded = read_rows(excluded_path(out))
    assert [(r["id"], r["chosen"], r["safety_label"]) for r in excluded] == [
        ("p3", "9", "chosen_unsafe_rejected_safe")]
    data = load_data_files(out, validate_preference)  # what the reward trainer reads
    assert data["rating"] == ["significantly_better", "better"] and data["annotator"] == ["alice", "bob"]

    store = AnswerStore(pairs, out)  # a restart: the three answers count, only p4 and p5 are offered
    try:
        assert store.progress("alice") == {"answered": 3, "total": 5, "left": 2, "by_you": 1}
        assert store.next_pair("carol", now=0.0).id == "p4"
        with pytest.raises(DuplicateAnswer):
            store.record("p3", "carol", "b", "better")
    finally:
        store.close()


def test_annotators_working_together_get_different_pairs(pairs_file, tmp_path):
    store = AnswerStore(load_pairs(pairs_file), tmp_path / "out.jsonl", hold_s=60)
    try:
        assert store.next_pair("alice", now=0.0).id == "p1"
        assert store.next_pair("bob", now=1.0).id == "p2"  # p1 is alice's for 60 s
        assert store.next_pair("alice", now=2.0).id == "p1"  # a reload shows alice the same pair
        assert store.next_pair("carol", now=100.0).id == "p1"  # alice's hold ran out
        store.record("p2", "bob", "a", "better", "safe", "safe")
        assert store.next_pair("bob", now=101.0).id == "p3"
    finally:
        store.close()


def test_torn_last_line_is_trimmed_and_pair_offered_again(pairs_file, tmp_path, caplog):
    out = tmp_path / "out.jsonl"
    pairs = load_pairs(pairs_file)
    store = AnswerStore(pairs, out)
    store.record("p1", "alice", "a", "better")
    store.close()
    complete = out.read_bytes()
    out.write_bytes(complete + b'{"id": "p2", "prompt": [{"ro')  # a write cut short by a crash
    with caplog.at_level(logging.WARNING, logger="llama2_hf.annotate.storage"):
        store = AnswerStore(pairs, out)
    try:
        assert "incomplete last line" in caplog.text
        assert out.read_bytes() == complete
        assert store.next_pair("alice", now=0.0).id == "p2"
    finally:
        store.close()


def test_bad_answers_file_is_refused(pairs_file, tmp_path):
    out = tmp_path / "out.jsonl"
    pairs = load_pairs(pairs_file)
    row = answer_row(pairs[0], "alice", "a", "better", None, None)
    write_jsonl(out, [{**row, "chosen": "17 + 25 = 44."}])
    with pytest.raises(InvalidDataFile, match=r"out.jsonl, line 1, field 'id': .* other responses than line 1"):
        AnswerStore(pairs, out)
    write_jsonl(out, [row, {**row, "annotator": "bob"}])
    with pytest.raises(InvalidDataFile, match=r"line 2, field 'id': pair 'p1' has a second answer"):
        AnswerStore(pairs, out)
    write_jsonl(out, [{**row, "rating": "great"}])
    with pytest.raises(InvalidDataFile, match=r"line 1, field 'rating'"):
        AnswerStore(pairs, out)


def test_second_server_on_the_same_file_is_refused(pairs_file, tmp_path):
    pairs = load_pairs(pairs_file)
    store = AnswerStore(pairs, tmp_path / "out.jsonl")
    try:
        with pytest.raises(InvalidDataFile, match="another annotation server"):
            AnswerStore(pairs, tmp_path / "out.jsonl")
    finally:
        store.close()
    AnswerStore(pairs, tmp_path / "out.jsonl").close()  # the lock goes with the first store


# ---------------------------------------------------------------------------------------------------------------------
# The page in a real browser, across a SIGKILL of the server
# ---------------------------------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def start_server(pairs: Path, out: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """The CLI in a subprocess on a free port; returns it and the page's URL once it listens."""
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "llama2_hf.annotate", "--pairs_file", str(pairs),
                                 "--output_file", str(out), "--port", "0"], stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300  # importing the package takes a while on a loaded machine
    while time.monotonic() < deadline:
        found = re.search(r"annotation page at (http://\S+/)", log.read_text())
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the server did not start:\n{log.read_text()}")


def test_page_in_browser_survives_a_kill(pairs_file, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("Debian's chromium is not installed")
    out = tmp_path / "prefs.jsonl"
    proc, url = start_server(pairs_file, out, tmp_path / "server1.log")
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(url)
            page.fill("#annotator", "alice")
            page.click("#start")
            sync_api.expect(page.locator("#pair-id")).to_have_text("p1")
            sync_api.expect(page.locator("#progress")).to_have_text("0 of 5 answered (you: 0), 5 left")

            # p1 with the mouse: B is better, "better"
            page.click("#choose-b")
            page.click("#rating-better")
            page.click("#submit")
            sync_api.expect(page.locator("#pair-id")).to_have_text("p2")
            sync_api.expect(page.locator("#response-b")).to_have_text(PAIRS[1]["response_b"])
            sync_api.expect(page.locator("#prompt .turn")).to_have_count(4)

            # p2 (a safety prompt) with the keyboard: A, significantly better, A safe, B unsafe
            page.keyboard.press("ArrowLeft")
            page.keyboard.press("1")
            page.keyboard.press("Enter")  # no safety labels yet: refused on the page
            sync_api.expect(page.locator("#message")).to_contain_text("safety prompt")
            page.keyboard.press("q")
            page.keyboard.press("p")
            page.keyboard.press("Enter")
            sync_api.expect(page.locator("#pair-id")).to_have_text("p3")

            # p3 mixed: B by key, strength with the mouse, submit by key
            page.keyboard.press("b")
            page.keyboard.press("Enter")
            sync_api.expect(page.locator("#message")).to_contain_text("how much better")
            page.click("#rating-negligibly_better")
            page.keyboard.press("Enter")
            sync_api.expect(page.locator("#pair-id")).to_have_text("p4")
            sync_api.expect(page.locator("#progress")).to_have_text("3 of 5 answered (you: 3), 2 left")

            proc.send_signal(signal.SIGKILL)  # no chance to flush or clean up
            proc.wait(timeout=30)
            proc, url = start_server(pairs_file, out, tmp_path / "server2.log")
            page.goto(url)
            page.fill("#annotator", "bob")
            page.keyboard.press("Enter")
            sync_api.expect(page.locator("#pair-id")).to_have_text("p4")
            sync_api.expect(page.locator("#progress")).to_have_text("3 of 5 answered (you: 0), 2 left")
            browser.close()
    finally:
        proc.kill()
        proc.wait(timeout=30)

    rows = load_data_files(out, validate_preference).to_list()
    assert len(rows) == 3
    assert [(r["id"], r["chosen"], r["rating"], r["safety_label"], r["annotator"]) for r in rows] == [
        ("p1", "17 + 25 = 42.", "better", None, "alice"),
        ("p2", PAIRS[1]["response_a"], "significantly_better", "chosen_safe_rejected_unsafe", "alice"),
        ("p3", "7", "negligibly_better", None, "alice"),
    ]
    assert [r["rejected"] for r in rows] == ["17 + 25 = 43.", PAIRS[1]["response_b"], "9"]
    assert rows[1]["prompt"] == DIALOGUE and rows[1]["is_safety_prompt"] is True
    assert all(r["version"] == 1 and r["annotated_at"].endswith("+00:00") for r in rows)
    assert excluded_path(out).read_text() == ""
