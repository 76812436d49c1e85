"""The annotation page: one HTML document with its style and vanilla JavaScript inline (no build step, nothing
fetched from outside, so it works on a machine without internet). It talks to the server's `/api/next` and
`/api/answer` (see `server.py`); texts from the pairs file are inserted with `textContent`, never as HTML."""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Preference annotation</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 1em; color: #222; }
  header { display: flex; gap: 1em; align-items: center; flex-wrap: wrap; border-bottom: 1px solid #ccc; }
  #progress { margin-left: auto; font-weight: bold; }
  .turn { margin: .3em 0; padding: .5em; border-radius: 4px; white-space: pre-wrap; }
  .turn .role { font-size: .8em; text-transform: uppercase; color: #666; display: block; }
  .user { background: #eef3fb; } .assistant { background: #f3f3f3; } .system { background: #fdf6e3; }
  #responses { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; margin: 1em 0; }
  .response { border: 2px solid #ccc; border-radius: 6px; padding: .7em; }
  .response.chosen { border-color: #2a7d2a; background: #f2fbf2; }
  .response .text { white-space: pre-wrap; min-height: 4em; }
  button { font-size: 1em; padding: .3em .7em; margin: .15em; cursor: pointer; }
  button.on { background: #2a7d2a; color: white; }
  button.unsafe.on { background: #b02a2a; }
  #ratings button.on { background: #1d5fa8; }
  kbd { border: 1px solid #aaa; border-radius: 3px; padding: 0 .3em; font-size: .85em; background: #fafafa; }
  button.on kbd { background: transparent; color: inherit; border-color: currentColor; }
  #message { min-height: 1.5em; margin: .5em 0; }
  #message.error { color: #b02a2a; } #message.ok { color: #2a7d2a; }
  #warning { color: #8a5a00; }
  #safety-tag { color: #b02a2a; font-weight: bold; }
  .hidden { display: none; }
</style>
</head>
<body>
<header>
  <h2>Which response is better?</h2>
  <label>Annotator <input id="annotator" maxlength="64" autocomplete="username"></label>
  <button id="start">Start</button>
  <span id="progress"></span>
</header>

<main id="work" class="hidden">
  <p><small>Pair <span id="pair-id"></span></small> <span id="safety-tag" class="hidden">safety prompt:
    label each response safe or unsafe</span></p>
  <section id="prompt"></section>
  <section id="responses">
    <div class="response" id="box-a">
      <h3>Response A</h3>
      <div class="text" id="response-a"></div>
      <p><button id="choose-a">A is better <kbd>A</kbd></button></p>
      <p>Safety: <button id="safe-a" class="safe">safe <kbd>Q</kbd></button>
        <button id="unsafe-a" class="unsafe">unsafe <kbd>W</kbd></button></p>
    </div>
    <div class="response" id="box-b">
      <h3>Response B</h3>
      <div class="text" id="response-b"></div>
      <p><button id="choose-b">B is better <kbd>B</kbd></button></p>
      <p>Safety: <button id="safe-b" class="safe">safe <kbd>O</kbd></button>
        <button id="unsafe-b" class="unsafe">unsafe <kbd>P</kbd></button></p>
    </div>
  </section>
  <section id="ratings">How much better?
    <button id="rating-significantly_better" data-rating="significantly_better">
      significantly better <kbd>1</kbd></button>
    <button id="rating-better" data-rating="better">better <kbd>2</kbd></button>
    <button id="rating-slightly_better" data-rating="slightly_better">slightly better <kbd>3</kbd></button>
    <button id="rating-negligibly_better" data-rating="negligibly_better">
      negligibly better / unsure <kbd>4</kbd></button>
  </section>
  <p id="warning" class="hidden">The response you prefer is labelled unsafe and the other safe: the answer will be
    kept in the file of excluded answers, not used to train the reward models (the paper leaves such pairs out).</p>
  <p><button id="submit">Submit <kbd>Enter</kbd></button></p>
</main>
<p id="message"></p>
<p id="done" class="hidden">Every pair is answered. Thank you!</p>

<section id="help">
  <h3>How to annotate</h3>
  <p>Read the prompt (or the dialogue so far) and both responses. Pick the better one, say how much better it is,
    and label each response safe or unsafe (required on safety prompts, optional elsewhere: both or neither).
    Each answer is saved the moment you submit it; you can close the page at any time and continue later with
    the same name. Each pair is answered once, by whoever answers it first.</p>
  <h3>Keyboard shortcuts</h3>
  <ul>
    <li><kbd>A</kbd> or <kbd>&larr;</kbd>: response A is better;
      <kbd>B</kbd> or <kbd>&rarr;</kbd>: response B is better</li>
    <li><kbd>1</kbd> significantly better, <kbd>2</kbd> better, <kbd>3</kbd> slightly better,
      <kbd>4</kbd> negligibly better / unsure</li>
    <li><kbd>Q</kbd> / <kbd>W</kbd>: response A safe / unsafe; <kbd>O</kbd> / <kbd>P</kbd>: response B safe / unsafe
      (press again to clear)</li>
    <li><kbd>Enter</kbd>: submit</li>
  </ul>
</section>

<script>
"use strict";
const $ = (id) => document.getElementById(id);
const state = { annotator: null, pair: null, choice: null, rating: null, safety: { a: null, b: null } };

function message(text, kind) {
  $("message").textContent = text;
  $("message").className = kind || "";
}

function showProgress(p) {
  $("progress").textContent = `${p.answered} of ${p.total} answered (you: ${p.by_you}), ${p.left} left`;
}

function renderPrompt(messages) {
  const box = $("prompt");
  box.replaceChildren();
  for (const m of messages) {
    const div = document.createElement("div");
    div.className = `turn ${m.role}`;
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = m.role;
    div.append(role, document.createTextNode(m.content));
    box.append(div);
  }
}

function refresh() {
  for (const side of ["a", "b"]) {
    $(`choose-${side}`).classList.toggle("on", state.choice === side);
    $(`box-${side}`).classList.toggle("chosen", state.choice === side);
    $(`safe-${side}`).classList.toggle("on", state.safety[side] === "safe");
    $(`unsafe-${side}`).classList.toggle("on", state.safety[side] === "unsafe");
  }
  for (const b of document.querySelectorAll("#ratings button")) {
    b.classList.toggle("on", b.dataset.rating === state.rating);
  }
  const other = state.choice === "a" ? "b" : "a";
  const excluded = state.choice !== null && state.safety[state.choice] === "unsafe" && state.safety[other] === "safe";
  $("warning").classList.toggle("hidden", !excluded);
}

function show(pair) {
  state.pair = pair;
  state.choice = null;
  state.rating = null;
  state.safety = { a: null, b: null };
  $("work").classList.toggle("hidden", pair === null);
  $("done").classList.toggle("hidden", pair !== null);
  if (pair !== null) {
    $("pair-id").textContent = pair.id;
    $("safety-tag").classList.toggle("hidden", !pair.is_safety_prompt);
    renderPrompt(pair.prompt);
    $("response-a").textContent = pair.response_a;
    $("response-b").textContent = pair.response_b;
  }
  refresh();
}

async function call(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, init);
  let data = {};
  try { data = await response.json(); } catch (e) { data = { error: `server answered ${response.status}` }; }
  return { status: response.status, data };
}

async function loadNext() {
  const { status, data } = await call(`/api/next?annotator=${encodeURIComponent(state.annotator)}`);
  if (status !== 200) { message(data.error, "error"); return; }
  showProgress(data.progress);
  show(data.pair);
}

async function start() {
  const name = $("annotator").value.trim();
  if (!name) { message("Type your name first.", "error"); $("annotator").focus(); return; }
  state.annotator = name;
  localStorage.setItem("annotator", name);
  $("annotator").blur();
  message("");
  await loadNext();
}

let submitting = false;
async function submit() {
  if (!state.pair || submitting) return;
  if (state.choice === null) { message("Pick the better response (A or B).", "error"); return; }
  if (state.rating === null) { message("Say how much better it is (1 to 4).", "error"); return; }
  if ((state.safety.a === null) !== (state.safety.b === null)) {
    message("Label the safety of both responses, or of neither.", "error"); return;
  }
  if (state.pair.is_safety_prompt && state.safety.a === null) {
    message("This is a safety prompt: label each response safe or unsafe.", "error"); return;
  }
  submitting = true;
  try {
    const { status, data } = await call("/api/answer", {
      annotator: state.annotator, id: state.pair.id, choice: state.choice, rating: state.rating,
      safety_a: state.safety.a, safety_b: state.safety.b });
    if (status === 200) {
      message(data.recorded === "excluded" ? `Pair ${state.pair.id} recorded as excluded.`
                                           : `Pair ${state.pair.id} recorded.`, "ok");
      await loadNext();
    } else if (status === 409) {
      message(`${data.error}; here is the next pair.`, "error");
      await loadNext();
    } else {
      message(data.error, "error");
    }
  } catch (e) {
    message(`Not recorded, the server did not answer (${e}). Submit again.`, "error");
  } finally {
    submitting = false;
  }
}

function choose(side) { state.choice = side; refresh(); }
function rate(rating) { state.rating = rating; refresh(); }
function label(side, value) { state.safety[side] = state.safety[side] === value ? null : value; refresh(); }

$("start").addEventListener("click", start);
$("annotator").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); start(); } });
$("choose-a").addEventListener("click", () => choose("a"));
$("choose-b").addEventListener("click", () => choose("b"));
$("safe-a").addEventListener("click", () => label("a", "safe"));
$("unsafe-a").addEventListener("click", () => label("a", "unsafe"));
$("safe-b").addEventListener("click", () => label("b", "safe"));
$("unsafe-b").addEventListener("click", () => label("b", "unsafe"));
for (const b of document.querySelectorAll("#ratings button")) b.addEventListener("click", () => rate(b.dataset.rating));
$("submit").addEventListener("click", submit);

const KEYS = {
  a: () => choose("a"), arrowleft: () => choose("a"), b: () => choose("b"), arrowright: () => choose("b"),
  "1": () => rate("significantly_better"), "2": () => rate("better"), "3": () => rate("slightly_better"),
  "4": () => rate("negligibly_better"),
  q: () => label("a", "safe"), w: () => label("a", "unsafe"),
  o: () => label("b", "safe"), p: () => label("b", "unsafe"),
  enter: submit,
};
document.addEventListener("keydown", (e) => {
  if (!state.pair || e.target === $("annotator") || e.ctrlKey || e.metaKey || e.altKey) return;
  const action = KEYS[e.key.toLowerCase()];
  if (action) { e.preventDefault(); action(); }
});

$("annotator").value = localStorage.getItem("annotator") || "";
</script>
</body>
</html>
"""
