// kvformer's chat page: a conversation over the server's own /v1/chat/completions stream,
// and a panel with the engine's state from /status. Plain JavaScript, no dependencies.
//
// Everything the model or the user writes reaches the page through textContent and
// createElement only (never innerHTML), so markup in a message is shown as text.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  messages: [],      // the conversation sent to the server: {role, content}
  apiKey: null,      // kept in this tab's memory only
  controller: null,  // the AbortController of the answer being streamed
  model: null,
  // the model's own sampling settings, else llama.cpp's (0.8, 40, 0.95, 0.05, 1.1), from
  // /status; the API itself keeps OpenAI's defaults
  sampling: null,
};

// ------------------------------------------------------------------------------ requests
function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (state.apiKey) h["Authorization"] = "Bearer " + state.apiKey;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

// ------------------------------------------------------------------------------ Markdown
// A small subset, enough for chat answers: fenced code blocks, headings, lists, paragraphs,
// **bold**, *italic*, `code`. Built as DOM nodes from text.
function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function inline(parent, text) {
  const pattern = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(\*[^*\n]+\*)|(_[^_\n]+_)/g;
  let last = 0;
  for (const m of text.matchAll(pattern)) {
    if (m.index > last) parent.append(document.createTextNode(text.slice(last, m.index)));
    const s = m[0];
    if (m[1]) parent.append(el("code", null, s.slice(1, -1)));
    else if (m[2]) parent.append(el("strong", null, s.slice(2, -2)));
    else parent.append(el("em", null, s.slice(1, -1)));
    last = m.index + s.length;
  }
  if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
}

function renderMarkdown(text) {
  const out = document.createDocumentFragment();
  const lines = text.split("\n");
  let para = [], list = null;
  const flushPara = () => {
    if (para.length) {
      const p = el("p");
      para.forEach((line, i) => {
        if (i) p.append(el("br"));
        inline(p, line);
      });
      out.append(p);
      para = [];
    }
  };
  const flushList = () => { if (list) { out.append(list); list = null; } };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*(```|~~~)\s*([\w+#.-]*)\s*$/);
    if (fence) {
      flushPara(); flushList();
      const code = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) code.push(lines[i]);
      const pre = el("pre");
      const c = el("code", null, code.join("\n"));
      if (fence[2]) c.dataset.lang = fence[2];
      pre.append(c);
      out.append(pre);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    const bullet = line.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
    if (heading) {
      flushPara(); flushList();
      const h = el("h" + Math.min(6, heading[1].length + 2));
      inline(h, heading[2]);
      out.append(h);
    } else if (bullet) {
      flushPara();
      const ordered = /\d/.test(bullet[1]);
      if (!list || (list.tagName === "OL") !== ordered) {
        flushList();
        list = el(ordered ? "ol" : "ul");
      }
      const li = el("li");
      inline(li, bullet[2]);
      list.append(li);
    } else if (!line.trim()) {
      flushPara(); flushList();
    } else {
      flushList();
      para.push(line);
    }
  }
  flushPara(); flushList();
  return out;
}

// ------------------------------------------------------------------------------ the view
function addMessage(role, text) {
  const box = el("div", "msg " + role);
  const body = el("div", "body");
  box.append(body);
  if (role === "user") body.textContent = text;
  else body.append(renderMarkdown(text));
  $("messages").append(box);
  box.scrollIntoView({block: "end"});
  return box;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function fmt(x, digits) { return Number.isFinite(x) ? x.toFixed(digits) : "–"; }

// ------------------------------------------------------------------------------ chatting
async function send(text) {
  if (state.controller) return;
  state.messages.push({role: "user", content: text});
  addMessage("user", text);
  const box = addMessage("assistant", "");
  const body = box.querySelector(".body");
  const system = $("system").value.trim();
  const request = {
    model: state.model || undefined,  // the server's own, once /status has named it
    messages: (system ? [{role: "system", content: system}] : []).concat(state.messages),
    stream: true,
    stream_options: {include_usage: true},
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Math.max(1, Math.floor(Number($("max-tokens").value) || 1)),
  };
  if (state.sampling) {
    request.top_k = state.sampling.top_k;
    request.min_p = state.sampling.min_p;
    request.repetition_penalty = state.sampling.repeat_penalty;
  }
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  let answer = "", usage = null, finish = null, cut = false, error = null;
  const t0 = performance.now();
  let tFirst = null, tLast = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(true), body: JSON.stringify(request),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    reading: for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") break reading;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
          if (chunk.usage) usage = chunk.usage;
          for (const choice of chunk.choices || []) {
            const piece = choice.delta && choice.delta.content;
            if (piece) {
              if (tFirst === null) tFirst = performance.now();
              tLast = performance.now();
              answer += piece;
              body.replaceChildren(renderMarkdown(answer));
              box.scrollIntoView({block: "end"});
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") cut = true;
    else error = e.message || String(e);
  } finally {
    state.controller = null;
    setBusy(false);
  }
  if (answer || cut) state.messages.push({role: "assistant", content: answer});
  else state.messages.pop();  // nothing came back: the question can be asked again
  if (error) {
    box.classList.add("error");
    body.replaceChildren(renderMarkdown(answer), el("p", null, "Error: " + error));
  }
  if (cut) body.append(el("p", "cut", "[stopped]"));
  const stats = [];
  if (usage) stats.push(`${usage.prompt_tokens} prompt tokens`,
                        `${usage.completion_tokens} completion tokens`);
  if (tFirst !== null) stats.push(`first token ${fmt((tFirst - t0) / 1000, 2)} s`);
  if (usage && tFirst !== null && tLast > tFirst && usage.completion_tokens > 1)
    stats.push(`${fmt((usage.completion_tokens - 1) / ((tLast - tFirst) / 1000), 1)} tokens/s`);
  if (finish === "length") stats.push("cut at max tokens");
  if (stats.length) box.append(el("div", "stats", stats.join(" · ")));
  refreshStatus();
}

function stop() {
  if (state.controller) state.controller.abort();
}

function newConversation() {
  stop();
  state.messages = [];
  $("messages").replaceChildren();
  $("prompt").focus();
}

// ------------------------------------------------------------------------------ the engine
async function refreshStatus() {
  let response;
  try {
    response = await fetch("/status", {headers: headers(false)});
  } catch (e) {
    $("status-error").textContent = "the server does not answer";
    return;
  }
  if (response.status === 401) {
    $("key-box").hidden = false;
    if (state.apiKey) $("key-error").textContent = await errorText(response);
    return;
  }
  if (!response.ok) {
    $("status-error").textContent = await errorText(response);
    return;
  }
  $("key-box").hidden = true;
  $("key-error").textContent = "";
  $("status-error").textContent = "";
  const s = await response.json();
  state.model = s.model;
  if (!state.sampling && s.sampling) {  // once: after that the sliders are the user's
    state.sampling = s.sampling;
    for (const [id, key] of [["temperature", "temperature"], ["top-p", "top_p"]]) {
      $(id).value = s.sampling[key];
      $(id + "-value").textContent = $(id).value;
    }
    if (s.max_tokens) {
      $("max-tokens").max = s.max_tokens;
      $("max-tokens").value = Math.min(Number($("max-tokens").value), s.max_tokens);
    }
  }
  $("model-name").textContent = s.model;
  const a = s.architecture;
  $("st-attention").textContent = a.attention === "GQA"
    ? `GQA, ${a.n_head}:${a.n_kv_head} (groups of ${a.group_size})`
    : `${a.attention}, ${a.n_head}:${a.n_kv_head}`;
  $("st-attention").title = `${a.n_head} query heads, ${a.n_kv_head} KV heads, ` +
    `${a.n_layer} layers, head size ${a.head_dim}, context ${a.max_seq_len}`;
  $("st-kv-bytes").textContent = `${s.kv_bytes_per_token.toLocaleString()} B` +
    (s.kv_dtype ? ` (${s.kv_dtype})` : "");
  $("st-active").textContent = s.active_sequences;
  $("st-queued").textContent = s.queued;
  const b = s.kv_blocks;
  $("st-blocks").textContent = `${b.used} used, ${b.free} free`;
  $("st-cached").textContent = b.cached === undefined ? "–" : b.cached;
  $("blocks-used").style.width = `${(100 * b.used / Math.max(1, b.total)).toFixed(1)}%`;
}

// ------------------------------------------------------------------------------ wiring
function init() {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value;
    if (!text.trim() || state.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newConversation);
  $("key-save").addEventListener("click", () => {
    state.apiKey = $("api-key").value.trim() || null;
    refreshStatus();
  });
  for (const id of ["temperature", "top-p"]) {
    $(id).addEventListener("input", () => { $(id + "-value").textContent = $(id).value; });
  }
  refreshStatus();
  setInterval(refreshStatus, 1000);
}

document.addEventListener("DOMContentLoaded", init);
