// chatforge chat page: streams /v1/chat/completions (SSE over fetch), shows intent from /v1/classify,
// time to first token and tokens/s per reply. The conversation lives in sessionStorage (per tab).
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const store = window.sessionStorage;
  const newSession = () => crypto.randomUUID().replace(/-/g, "");
  const state = {
    session: store.getItem("chatforge.session") || newSession(),
    history: JSON.parse(store.getItem("chatforge.history") || "[]"),
    classifier: null,
    controller: null,
    epoch: 0,  // counts "new conversation" clicks: a reply that ends after one joins no conversation
  };
  store.setItem("chatforge.session", state.session);
  $("apikey").value = store.getItem("chatforge.key") || "";
  $("apikey").addEventListener("change", () => {
    store.setItem("chatforge.key", $("apikey").value);
    loadModels();  // a key may be what the first attempt was missing
  });

  function headers() {
    const h = { "Content-Type": "application/json", "X-Session-Id": state.session };
    const key = $("apikey").value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  function save() { store.setItem("chatforge.history", JSON.stringify(state.history)); }

  function bubble(role, text) {
    const div = document.createElement("div");
    div.className = "msg " + role;
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    div.appendChild(body);
    $("log").appendChild(div);
    $("log").scrollTop = $("log").scrollHeight;
    return div;
  }

  function meta(div, text, cls) {
    let m = div.querySelector(".meta");
    if (!m) { m = document.createElement("span"); m.className = "meta"; div.appendChild(m); }
    const part = document.createElement("span");
    part.className = cls || "";
    part.textContent = text;
    m.appendChild(part);
    return part;
  }

  async function errorText(resp) {
    try { const j = await resp.json(); return j.error ? j.error.message : resp.statusText; }
    catch (e) { return resp.statusText; }
  }

  // A server that is still loading its models, draining, restarting or overloaded (429, 5xx, no answer) is asked
  // again, as its Retry-After says, backing off to 30 s; a refused key (401) waits for the user to enter another.
  let modelsRetry = null, modelsTries = 0;
  function retryModels(after) {
    const s = Number(after);
    const delay = Math.min(Math.max(Number.isFinite(s) && s > 0 ? s * 1000 : 1000, 1000 * 2 ** modelsTries), 30000);
    modelsTries += 1;
    modelsRetry = setTimeout(loadModels, delay);
  }

  async function loadModels() {
    clearTimeout(modelsRetry);
    modelsRetry = null;
    let resp;
    try { resp = await fetch("/v1/models", { headers: headers() }); }
    catch (e) { $("status").textContent = "models: the server does not answer; retrying"; retryModels(null); return; }
    if (!resp.ok) {
      $("status").textContent = "models: " + await errorText(resp);
      if (resp.status === 429 || resp.status >= 500) retryModels(resp.headers.get("retry-after"));
      return;
    }
    modelsTries = 0;
    const data = (await resp.json()).data;
    const select = $("model");
    const chosen = select.value;  // a reload (a new API key) keeps the user's choice while it is still served
    const served = data.filter((m) => m.task === "generation" || m.task === "selection");
    const keep = served.some((m) => m.id === chosen);
    select.textContent = "";
    for (const m of served) {
      const o = document.createElement("option");
      o.value = m.id; o.textContent = `${m.id} (v${m.version})`; o.selected = keep ? m.id === chosen : m.is_default;
      select.appendChild(o);
    }
    const clf = data.find((m) => m.task === "classification" && m.is_default);
    state.classifier = clf ? clf.id : null;
    $("status").textContent = state.classifier ? `intent classifier: ${state.classifier}` : "";
  }

  async function classify(text, div) {
    if (!state.classifier) return;
    const resp = await fetch("/v1/classify", { method: "POST", headers: headers(),
      body: JSON.stringify({ text, model: state.classifier }) });
    if (!resp.ok) return;
    const c = await resp.json();
    const b = meta(div, c.out_of_scope ? `out of scope (${c.label} ${c.score.toFixed(2)})`
                                       : `intent ${c.label} ${c.score.toFixed(2)}`,
                   c.out_of_scope ? "badge oos intent" : "badge intent");
    b.dataset.label = c.label;
  }

  function busy(on) {
    $("send").disabled = on;
    $("stop").disabled = !on;
  }

  async function send(text) {
    const userDiv = bubble("user", text);
    // The message joins the conversation (state.history, which every later request sends) only once it has a
    // reply: a refused one (too long, say) kept there made every later request fail the same way. A failed
    // message stays on screen, marked, with the error under it.
    const turn = { role: "user", content: text };
    const epoch = state.epoch;
    classify(text, userDiv);
    const div = bubble("assistant", "");
    div.classList.add("streaming");
    const out = div.querySelector(".text");
    const controller = new AbortController();
    state.controller = controller;
    busy(true);
    const t0 = performance.now();
    let first = null, last = null, tokens = 0, reply = "", finish = null, ext = null, usage = null, failed = false;
    try {
      const resp = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), signal: controller.signal,
        // The latest turns only: the server reads at most 64 earlier turns, and a long conversation
        // kept in this browser must not grow the request past the API's 1,000 messages.
        body: JSON.stringify({ model: $("model").value || undefined, messages: [...state.history, turn].slice(-65),
                               stream: true,
                               max_tokens: Number($("maxtokens").value) || undefined, user: state.session,
                               stream_options: { include_usage: true } }),
      });
      if (!resp.ok) {
        const message = await errorText(resp);
        // 404: the picked model is not served (any more: a restart, a rollout); offer the models that are.
        if (resp.status === 404) loadModels();
        throw new Error(message);
      }
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "", whole = false;
      for (let ended = false; !ended;) {
        const { value, done } = await reader.read();
        ended = done;
        buf += done ? "" : value;
        // SSE lines end with CRLF, LF or CR (a proxy may reframe them): all read as LF. A CR that ends what has
        // come so far waits (unless the stream has ended), as it may be the first half of a CRLF.
        const cut = buf.endsWith("\r") && !done ? buf.length - 1 : buf.length;
        buf = buf.slice(0, cut).replace(/\r\n?/g, "\n") + buf.slice(cut);
        let nl;
        while ((nl = buf.indexOf("\n\n")) >= 0) {
          const event = buf.slice(0, nl);
          buf = buf.slice(nl + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") { whole = true; continue; }
            const chunk = JSON.parse(data);
            if (chunk.error) throw new Error(chunk.error.message);
            if (chunk.usage) usage = chunk.usage;
            for (const ch of chunk.choices || []) {
              const piece = (ch.delta && ch.delta.content) || "";
              if (piece) {
                const now = performance.now();
                if (first === null) first = now;
                last = now;
                tokens += 1;
                reply += piece;
                out.textContent = reply;
                $("log").scrollTop = $("log").scrollHeight;
              }
              if (ch.finish_reason) { finish = ch.finish_reason; ext = chunk.chatforge || null; }
            }
          }
        }
      }
      // Only data: [DONE] ends a reply: a stream that stops before it (a replica killed or drained mid-reply, a
      // proxy's timeout) is no whole reply, and must not join the conversation as if the model had said only that.
      if (!whole) throw new Error("the reply was cut short: the connection closed before its end");
    } catch (e) {
      if (e.name === "AbortError") { meta(div, "stopped", "badge stopped"); finish = "stopped"; }
      else {
        failed = true;
        meta(div, "error: " + e.message, "error");
        userDiv.classList.add("failed");
        meta(userDiv, "failed: left out of the conversation", "badge failed");
      }
    } finally {
      state.controller = null;
      busy(false);
      div.classList.remove("streaming");
    }
    const n = usage ? usage.completion_tokens : tokens;
    // A whole reply no model generated (a selection model's pick, a policy's scripted or retrieved answer) has no
    // tokens to count: say which path gave it instead of "0 tokens".
    const whole = ext && ext.path && ext.path !== "generation";
    if (first !== null && whole) {
      meta(div, `TTFT ${Math.round(first - t0)} ms · ${ext.path} reply`, "timing");
    } else if (first !== null) {
      const rate = n > 1 && last > first ? ((n - 1) * 1000) / (last - first) : null;
      meta(div, `TTFT ${Math.round(first - t0)} ms · ${n} tokens` + (rate ? ` · ${rate.toFixed(1)} tok/s` : ""),
           "timing");
    }
    if (ext && ext.out_of_scope) meta(div, "fallback (out of scope)", "badge oos");
    div.dataset.finish = finish || "";
    // A reply, whole or stopped by the user, keeps the turn; a stopped one without text keeps the message alone.
    if (!failed && epoch === state.epoch) {
      state.history.push(turn);
      if (reply) state.history.push({ role: "assistant", content: reply });
      save();
    }
  }

  $("form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); $("form").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("clear").addEventListener("click", () => {
    if (state.controller) state.controller.abort();  // a reply under way belongs to the conversation left behind
    // A new conversation is a new session: the store files its turns apart from the last one's.
    state.session = newSession(); store.setItem("chatforge.session", state.session);
    state.history = []; state.epoch += 1; save(); $("log").textContent = "";
  });
  for (const m of state.history) bubble(m.role, m.content);
  loadModels();
})();
