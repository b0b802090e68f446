// sotserve web page: streams one chat answer over SSE and draws the planner's events
// (skeleton, points growing side by side, in-order merged answer, timings, usage).
// Plain browser JavaScript, no dependencies. Model output is only ever put in the page
// through textContent / text nodes, never through innerHTML.
// A server started with --api-key answers /v1/* with 401 until the page sends its key:
// the page then asks for it once and keeps it in sessionStorage, for this tab only.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const el = {
    form: $("ask-form"),
    question: $("question"),
    mode: $("mode"),
    maxTokens: $("max-tokens"),
    send: $("send"),
    stop: $("stop"),
    model: $("model"),
    error: $("error"),
    currentQuestion: $("current-question"),
    status: $("status"),
    elapsed: $("elapsed"),
    skeletonPanel: $("skeleton-panel"),
    skeleton: $("skeleton"),
    pointsPanel: $("points-panel"),
    points: $("points"),
    pointsCount: $("points-count"),
    answer: $("answer"),
    routeMode: $("route-mode"),
    routeReason: $("route-reason"),
    fallback: $("fallback"),
    timing: {
      route: $("timing-route"),
      skeleton: $("timing-skeleton"),
      first: $("timing-first"),
      total: $("timing-total"),
    },
    usage: {
      prompt: $("usage-prompt"),
      completion: $("usage-completion"),
      cached: $("usage-cached"),
      requests: $("usage-requests"),
    },
    history: $("history"),
    historyEmpty: $("history-empty"),
    pointTemplate: $("point-template"),
    keyDialog: $("key-dialog"),
    keyForm: $("key-form"),
    keyInput: $("key-input"),
    keyError: $("key-error"),
    keyCancel: $("key-cancel"),
  };

  const HISTORY_MAX = 20;
  let run = null; // the answer being produced, or null
  let modelShown = false; // the model badge shows the served model
  let modelLoading = false;

  // ---- small helpers -------------------------------------------------------------

  /** Put `text` into `node`, turning `**bold**` into <strong>, safely (text nodes only). */
  function renderRich(node, text) {
    const frag = document.createDocumentFragment();
    const re = /\*\*([^*\n][^*]*?)\*\*/g;
    let last = 0;
    let m;
    while ((m = re.exec(text)) !== null) {
      if (m.index > last) frag.appendChild(document.createTextNode(text.slice(last, m.index)));
      const strong = document.createElement("strong");
      strong.textContent = m[1];
      frag.appendChild(strong);
      last = re.lastIndex;
    }
    if (last < text.length) frag.appendChild(document.createTextNode(text.slice(last)));
    node.replaceChildren(frag);
  }

  const seconds = (v) => (typeof v === "number" && isFinite(v) ? `${v.toFixed(2)} s` : "—");
  const count = (v) => (typeof v === "number" && isFinite(v) ? v.toLocaleString("en-US") : "—");

  function setStatus(state, text) {
    el.status.dataset.state = state;
    el.status.textContent = text || state;
  }

  function showError(message) {
    el.error.replaceChildren();
    const title = document.createElement("strong");
    title.textContent = "Error: ";
    const body = document.createElement("span");
    body.className = "error-message";
    body.textContent = message;
    el.error.append(title, body);
    el.error.hidden = false;
  }

  function clearError() {
    el.error.hidden = true;
    el.error.replaceChildren();
  }

  function setRunning(running) {
    el.send.disabled = running;
    el.stop.disabled = !running;
    document.body.classList.toggle("running", running);
  }

  /** The message of an OpenAI-style error body, or a fallback text. */
  function errorMessage(body, fallback) {
    if (body && typeof body === "object" && body.error) {
      const e = body.error;
      if (typeof e === "string") return e;
      if (e && typeof e.message === "string") return e.message;
    }
    return fallback;
  }

  // ---- API key ------------------------------------------------------------------

  // sessionStorage, not localStorage: the key survives a reload but not the tab, and
  // other tabs never see it. Where storage is unavailable (privacy modes) the key just
  // lives as long as the page.
  const KEY_ITEM = "sotserve.apiKey";
  let apiKey = readStoredKey();
  let keyPrompt = null; // the open dialog's promise, shared by every request waiting on it

  function readStoredKey() {
    try {
      return sessionStorage.getItem(KEY_ITEM) || "";
    } catch {
      return "";
    }
  }

  function storeKey(key) {
    apiKey = key;
    try {
      if (key) sessionStorage.setItem(KEY_ITEM, key);
      else sessionStorage.removeItem(KEY_ITEM);
    } catch {
      /* kept in memory only */
    }
  }

  /** Ask for the key in the dialog; resolves to the key, or null if the user cancels.
   * Requests that fail together (the model list and a question) share one dialog. */
  function askForKey(error) {
    if (!keyPrompt) keyPrompt = openKeyDialog(error).finally(() => (keyPrompt = null));
    return keyPrompt;
  }

  function openKeyDialog(error) {
    return new Promise((resolve) => {
      const d = el.keyDialog;
      const returnFocus = document.activeElement;
      const setError = (msg) => {
        el.keyError.textContent = msg;
        el.keyError.hidden = !msg;
        el.keyInput.setAttribute("aria-invalid", msg ? "true" : "false");
      };
      const finish = (key) => {
        el.keyForm.removeEventListener("submit", onSubmit);
        el.keyCancel.removeEventListener("click", onCancel);
        d.removeEventListener("cancel", onCancel);
        el.keyInput.value = ""; // the key stays out of the DOM once used
        setError("");
        if (d.open) d.close();
        if (returnFocus && typeof returnFocus.focus === "function") returnFocus.focus();
        resolve(key);
      };
      const onSubmit = (e) => {
        e.preventDefault();
        const key = el.keyInput.value.trim();
        // fetch() refuses header values beyond Latin-1 and the server compares UTF-8
        // bytes, so only printable ASCII can ever match: say so rather than fail later
        if (!key) setError("Type the server's API key.");
        else if (!/^[\x20-\x7e]+$/.test(key)) setError("An API key is printable ASCII text.");
        else return finish(key);
        el.keyInput.focus();
      };
      const onCancel = (e) => {
        e.preventDefault(); // Escape: close through finish(), which also cleans up
        finish(null);
      };
      el.keyForm.addEventListener("submit", onSubmit);
      el.keyCancel.addEventListener("click", onCancel);
      d.addEventListener("cancel", onCancel);
      el.keyInput.value = "";
      setError(error);
      d.showModal();
      el.keyInput.focus();
    });
  }

  /**
   * fetch() for /v1/*: sends the key if the tab has one and JSON's Content-Type on
   * bodies (the server refuses other types, its CSRF defence). On 401 it asks for the
   * key and sends the same request again, until it gets through or the user cancels;
   * then the 401 is returned for the caller to report. `onRetry` runs before a retry.
   */
  async function apiFetch(url, init = {}, onRetry = null) {
    for (;;) {
      const sent = apiKey;
      const headers = new Headers(init.headers || {});
      if (init.body != null) headers.set("Content-Type", "application/json");
      if (sent) headers.set("Authorization", `Bearer ${sent}`);
      const resp = await fetch(url, { ...init, headers });
      if (resp.status !== 401) return resp;
      // another request got a new key while this one was on its way: just use it
      if (apiKey && apiKey !== sent) continue;
      let error = "";
      if (sent) {
        // the key was refused (mistyped, or the server restarted with another one)
        const body = await resp.clone().json().catch(() => null);
        if (apiKey && apiKey !== sent) continue;
        error = errorMessage(body, "incorrect API key");
        storeKey("");
      }
      const key = await askForKey(error);
      if (key === null) return resp;
      if (key !== apiKey) storeKey(key);
      if (init.signal && init.signal.aborted) throw new DOMException("stopped", "AbortError");
      if (onRetry) onRetry();
      if (!modelShown) loadModel(); // the model list failed for want of this key
    }
  }

  // ---- one answer ----------------------------------------------------------------

  function newRun(question, mode) {
    return {
      question,
      requestedMode: mode,
      controller: new AbortController(),
      started: performance.now(),
      ticker: null,
      answer: "",
      skeleton: "",
      cards: new Map(), // index -> {card, text, done, deps}
      done: null,
      mode: null,
      ended: false,
    };
  }

  function resetView(r) {
    clearError();
    el.currentQuestion.textContent = r.question;
    el.skeleton.textContent = "";
    el.skeletonPanel.hidden = true;
    el.points.replaceChildren();
    el.pointsPanel.hidden = true;
    el.pointsCount.textContent = "";
    el.answer.replaceChildren();
    el.answer.classList.remove("done");
    el.routeMode.textContent = "—";
    el.routeMode.dataset.mode = "";
    el.routeReason.textContent = r.requestedMode === "auto" ? "routing…" : "—";
    el.fallback.hidden = true;
    el.fallback.textContent = "";
    for (const k of Object.keys(el.timing)) el.timing[k].textContent = "—";
    for (const k of Object.keys(el.usage)) el.usage[k].textContent = "—";
    el.elapsed.textContent = "";
  }

  function showRoute(mode, route, fallback) {
    if (mode) {
      run.mode = mode;
      el.routeMode.textContent = mode;
      el.routeMode.dataset.mode = mode;
    }
    if (route) {
      el.routeReason.textContent = `${route.reason} (${route.source}: ${route.mode})`;
    } else if (run.requestedMode !== "auto") {
      el.routeReason.textContent = "chosen by you";
    }
    if (fallback) {
      el.fallback.textContent = `Fell back to sequential decoding: ${fallback}`;
      el.fallback.hidden = false;
    }
  }

  function ensureCard(point) {
    let entry = run.cards.get(point.index);
    if (!entry) {
      const card = el.pointTemplate.content.firstElementChild.cloneNode(true);
      card.dataset.index = String(point.index);
      card.dataset.testid = "point";
      card.querySelector(".point-num").textContent = String(point.index);
      entry = { card, text: "", done: false, deps: [] };
      run.cards.set(point.index, entry);
      // keep the grid in skeleton order even if events arrive out of order
      const after = [...el.points.children].find((c) => Number(c.dataset.index) > point.index);
      el.points.insertBefore(card, after || null);
      el.pointsPanel.hidden = false;
    }
    if (typeof point.title === "string") {
      entry.card.querySelector(".point-title").textContent = point.title;
    }
    if (Array.isArray(point.depends_on)) entry.deps = point.depends_on.slice();
    return entry;
  }

  /** Refresh every card's dependency line, state label and the done count. */
  function refreshCards() {
    let done = 0;
    for (const [, e] of run.cards) {
      const deps = e.card.querySelector(".point-deps");
      if (e.deps.length) {
        deps.textContent = `depends on ${e.deps.join(", ")}`;
        deps.hidden = false;
      } else {
        deps.hidden = true;
      }
      const state = e.card.querySelector(".point-state");
      e.card.classList.toggle("done", e.done);
      e.card.classList.toggle("streaming", !e.done && e.text.length > 0);
      e.card.classList.toggle("waiting", !e.done && e.text.length === 0);
      if (e.done) {
        done += 1;
        state.textContent = "done";
      } else if (e.text.length > 0) {
        state.textContent = "writing…";
      } else {
        const open = e.deps.filter((d) => !(run.cards.get(d) || {}).done);
        state.textContent = open.length ? `waiting for ${open.join(", ")}` : "waiting";
      }
    }
    el.pointsCount.textContent = run.cards.size ? `${done}/${run.cards.size} done` : "";
  }

  function handleEvent(ev) {
    switch (ev.type) {
      case "skeleton_delta":
        run.skeleton += ev.text;
        el.skeleton.textContent = run.skeleton;
        el.skeletonPanel.hidden = false;
        // with pipelining, points start while the skeleton is still being written
        if (run.cards.size) setStatus("points", "expanding points");
        else setStatus("skeleton", "writing skeleton");
        break;
      case "point_start":
        ensureCard(ev.point);
        refreshCards();
        setStatus("points", "expanding points");
        break;
      case "plan_ready":
        showRoute(ev.mode, ev.route, ev.fallback);
        if (ev.mode === "sequential") {
          // too few points: the planner answers with plain decoding instead
          run.cards.clear();
          el.points.replaceChildren();
          el.pointsPanel.hidden = true;
          setStatus("answering", "answering");
        } else {
          for (const p of ev.points || []) ensureCard(p);
          refreshCards();
          setStatus("points", "expanding points");
        }
        break;
      case "point_delta": {
        const e = ensureCard({ index: ev.index });
        e.text += ev.text;
        renderRich(e.card.querySelector(".point-text"), e.text.trimStart());
        refreshCards();
        setStatus("points", "expanding points");
        break;
      }
      case "point_done": {
        const e = ensureCard({ index: ev.index });
        e.text = ev.text;
        e.done = true;
        renderRich(e.card.querySelector(".point-text"), e.text.trim());
        const bits = [`${count(ev.completion_tokens)} tokens`];
        if (ev.finish_reason) bits.push(ev.finish_reason);
        if (typeof ev.cached_tokens === "number") bits.push(`${count(ev.cached_tokens)} cached`);
        const meta = e.card.querySelector(".point-meta");
        meta.textContent = bits.join(" · ");
        meta.title = `prompt ${ev.prompt_tokens} tokens`;
        e.card.dataset.completionTokens = String(ev.completion_tokens);
        e.card.dataset.finishReason = ev.finish_reason || "";
        refreshCards();
        break;
      }
      case "done":
        run.done = ev;
        showRoute(ev.mode, ev.route, ev.fallback);
        if (typeof ev.answer === "string") {
          run.answer = ev.answer;
          renderRich(el.answer, run.answer);
        }
        showTimings(ev.timings);
        showUsage(ev.usage);
        break;
      case "error":
        throw new StreamError(ev.message || "the server reported an error");
      default:
        break; // an event this page does not know: ignore it
    }
  }

  function showTimings(t) {
    if (!t) return;
    el.timing.route.textContent = seconds(t.route_s);
    el.timing.skeleton.textContent = seconds(t.skeleton_s);
    el.timing.first.textContent = seconds(t.first_answer_token_s);
    el.timing.total.textContent = seconds(t.total_s);
  }

  function showUsage(u) {
    if (!u) return;
    el.usage.prompt.textContent = count(u.prompt_tokens);
    el.usage.completion.textContent = count(u.completion_tokens);
    el.usage.cached.textContent = count(u.cached_tokens);
    el.usage.requests.textContent = count(u.requests);
  }

  class StreamError extends Error {}

  /** One `data:` payload of the SSE stream. Returns true at `[DONE]`. */
  function handleData(data) {
    if (data === "[DONE]") return true;
    let obj;
    try {
      obj = JSON.parse(data);
    } catch {
      throw new StreamError(`unreadable data from the server: ${data.slice(0, 200)}`);
    }
    if (obj && obj.error) throw new StreamError(errorMessage(obj, "the server reported an error"));
    const choice = obj && Array.isArray(obj.choices) ? obj.choices[0] : null;
    const content = choice && choice.delta ? choice.delta.content : null;
    if (typeof content === "string" && content.length) {
      if (!run.answer) el.answer.replaceChildren();
      run.answer += content;
      renderRich(el.answer, run.answer);
      if (!run.cards.size) setStatus("answering", "answering");
    }
    const events = obj && obj.sot && Array.isArray(obj.sot.events) ? obj.sot.events : [];
    for (const ev of events) handleEvent(ev);
    if (obj && obj.usage && !run.done) {
      el.usage.prompt.textContent = count(obj.usage.prompt_tokens);
      el.usage.completion.textContent = count(obj.usage.completion_tokens);
    }
    return false;
  }

  /** Read an SSE body incrementally; chunks may split lines anywhere. */
  async function readStream(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let data = [];
    const dispatch = () => {
      if (!data.length) return false;
      const payload = data.join("\n");
      data = [];
      return handleData(payload);
    };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
        let nl;
        while ((nl = buffer.search(/\r\n|\r|\n/)) >= 0) {
          const line = buffer.slice(0, nl);
          buffer = buffer.slice(buffer[nl] === "\r" && buffer[nl + 1] === "\n" ? nl + 2 : nl + 1);
          if (line === "") {
            if (dispatch()) return true;
          } else if (line.startsWith("data:")) {
            data.push(line.slice(line[5] === " " ? 6 : 5));
          } // comments (":...") and other fields are ignored
        }
        if (done) {
          if (buffer.startsWith("data:")) data.push(buffer.slice(buffer[5] === " " ? 6 : 5));
          return dispatch();
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  async function send() {
    if (run) return; // one answer at a time
    const question = el.question.value;
    if (!question.trim()) {
      showError("Type a question first.");
      el.question.focus();
      return;
    }
    const mode = el.mode.value || "auto";
    const body = {
      messages: [{ role: "user", content: question }],
      stream: true,
      stream_options: { include_usage: true },
      sot: { mode },
    };
    const mt = el.maxTokens.value.trim();
    if (mt !== "") body.max_tokens = Number(mt);

    run = newRun(question, mode);
    const r = run;
    resetView(r);
    setRunning(true);
    setStatus("sending", "sending");
    r.ticker = setInterval(() => {
      el.elapsed.textContent = `${((performance.now() - r.started) / 1000).toFixed(1)} s`;
    }, 100);

    let outcome = "error";
    try {
      const init = {
        method: "POST",
        headers: { Accept: "text/event-stream" },
        body: JSON.stringify(body),
        signal: r.controller.signal,
      };
      // the time spent typing a key is not the answer's: restart the clock
      const resp = await apiFetch("/v1/chat/completions", init, () => {
        r.started = performance.now();
      });
      if (!resp.ok) {
        let parsed = null;
        let text = "";
        try {
          text = await resp.text();
          parsed = JSON.parse(text);
        } catch {
          /* not JSON: use the status line */
        }
        const msg = errorMessage(parsed, text.trim() || resp.statusText || "request failed");
        throw new StreamError(`HTTP ${resp.status}: ${msg}`);
      }
      if (!resp.body) throw new StreamError("this browser cannot read streamed responses");
      await readStream(resp.body);
      if (!r.done) throw new StreamError("the stream ended before the answer was finished");
      outcome = "done";
      setStatus("done", "done");
      el.answer.classList.add("done");
    } catch (err) {
      if (err && err.name === "AbortError") {
        outcome = "stopped";
        setStatus("stopped", "stopped");
      } else {
        const msg = err instanceof StreamError ? err.message : `could not reach the server (${err})`;
        showError(msg);
        setStatus("error", "error");
      }
    } finally {
      clearInterval(r.ticker);
      const total = r.done && r.done.timings ? r.done.timings.total_s : null;
      const wall = (performance.now() - r.started) / 1000;
      el.elapsed.textContent = `${(typeof total === "number" ? total : wall).toFixed(1)} s`;
      if (el.routeReason.textContent === "routing…") el.routeReason.textContent = "—";
      if (!r.answer) {
        const none = document.createElement("span");
        none.className = "placeholder";
        none.textContent = outcome === "error" ? "No answer." : "(empty answer)";
        el.answer.replaceChildren(none);
      }
      if (outcome !== "error" || r.answer) addHistory(r, outcome);
      run = null;
      setRunning(false);
    }
  }

  function stop() {
    if (run) run.controller.abort();
  }

  // ---- history -------------------------------------------------------------------

  function addHistory(r, outcome) {
    const li = document.createElement("li");
    li.className = "history-item";
    li.dataset.outcome = outcome;
    const details = document.createElement("details");
    const summary = document.createElement("summary");
    const q = document.createElement("span");
    q.className = "history-q";
    q.textContent = r.question;
    const meta = document.createElement("span");
    meta.className = "history-meta";
    const total = r.done && r.done.timings ? seconds(r.done.timings.total_s) : outcome;
    meta.textContent = `${r.mode || r.requestedMode} · ${total}`;
    summary.append(q, meta);
    const ans = document.createElement("div");
    ans.className = "history-answer";
    renderRich(ans, r.answer || "(no answer)");
    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.className = "btn btn-link";
    reuse.textContent = "Ask again";
    reuse.addEventListener("click", () => {
      el.question.value = r.question;
      el.mode.value = r.requestedMode;
      el.question.focus();
    });
    details.append(summary, ans, reuse);
    li.appendChild(details);
    el.history.prepend(li);
    while (el.history.children.length > HISTORY_MAX) el.history.lastElementChild.remove();
    el.historyEmpty.hidden = true;
  }

  // ---- wiring --------------------------------------------------------------------

  el.form.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  el.question.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  el.stop.addEventListener("click", stop);
  document.addEventListener("keydown", (e) => {
    // Escape in the key dialog cancels the dialog only; the request then reports 401
    if (e.key === "Escape" && run && !el.keyDialog.open) stop();
  });

  function loadModel() {
    if (modelLoading) return;
    modelLoading = true;
    const fail = (text) => {
      el.model.textContent = text;
      el.model.classList.add("bad");
    };
    apiFetch("/v1/models")
      .then(async (r) => {
        if (r.status === 401) return fail("API key needed"); // the dialog was cancelled
        const j = r.ok ? await r.json() : null;
        const m = j && Array.isArray(j.data) ? j.data[0] : null;
        if (!m) return fail("server unreachable");
        el.model.textContent = m.max_model_len ? `${m.id} · ${m.max_model_len} ctx` : m.id;
        el.model.classList.remove("bad");
        el.model.classList.add("ok");
        modelShown = true;
      })
      .catch(() => fail("server unreachable"))
      .finally(() => (modelLoading = false));
  }

  loadModel();

  setRunning(false);
  el.question.focus();
})();
