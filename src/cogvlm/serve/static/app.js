// The chat page: one image per conversation (CogVLM's rule), answers streamed from
// POST /v1/chat/completions, grounding boxes from the last chunk drawn over the image.
"use strict";

const $ = (id) => document.getElementById(id);
const PALETTE = ["#e6194b", "#3cb44b", "#0082c8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#008080"];
// `conversation` counts clears, so an answer that ends after a clear is not recorded.
const state = { image: null, messages: [], model: null, controller: null, conversation: 0 };

function headers() {
  const key = $("api-key").value.trim();
  localStorage.setItem("cogvlm-api-key", key);
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
    state.model = body.data[0].id;
    $("model").textContent = "model: " + state.model;
  } catch (e) {
    $("model").textContent = "cannot list models: " + e.message;
    $("settings").open = true;
  }
}

function addTurn(role, text) {
  const div = document.createElement("div");
  div.className = "turn " + role;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function clearConversation() {
  if (state.controller) state.controller.abort();
  state.conversation += 1;
  state.messages = [];
  $("log").replaceChildren();
  $("boxes").replaceChildren();
}

function setImage(file) {
  if (!file || !file.type.startsWith("image/")) return;
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result;
    $("picture").src = state.image;
    $("stage").hidden = false;
    $("drop-hint").hidden = true;
    clearConversation();
  };
  reader.readAsDataURL(file);
}

function drawBoxes(boxes) {
  const layer = $("boxes");
  layer.replaceChildren();
  const colours = new Map();
  for (const b of boxes) {
    if (!colours.has(b.label)) colours.set(b.label, PALETTE[colours.size % PALETTE.length]);
    const [x0, y0, x1, y1] = b.box;
    const div = document.createElement("div");
    div.className = "box";
    div.style.cssText = `left:${x0 * 100}%;top:${y0 * 100}%;width:${(x1 - x0) * 100}%;` +
      `height:${(y1 - y0) * 100}%;--c:${colours.get(b.label)}`;
    div.title = b.label;
    if (b.label) {
      const tag = document.createElement("span");
      tag.textContent = b.label;
      div.appendChild(tag);
    }
    layer.appendChild(div);
  }
}

// Yields the parsed JSON of each `data:` event until `data: [DONE]`.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function request(question) {
  const content = [{ type: "text", text: question }];
  if (state.image && state.messages.length === 0) content.push({ type: "image_url", image_url: { url: state.image } });
  const messages = [...state.messages, { role: "user", content }];
  const body = { model: state.model, messages, stream: true, max_tokens: Number($("max-tokens").value) || 256 };
  const temperature = Number($("temperature").value);
  if (temperature > 0) body.temperature = temperature;
  if ($("template").value) body.template_version = $("template").value;
  return { body, messages };
}

async function ask(question) {
  const { body, messages } = request(question);
  const conversation = state.conversation;
  addTurn("user", question);
  const answer = addTurn("assistant", "");
  answer.classList.add("streaming");
  state.controller = new AbortController();
  busy(true);
  let failed = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error(error.error ? error.error.message : response.statusText);
    }
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices.length ? chunk.choices[0].delta : {};
      if (delta.content) answer.textContent += delta.content;
      if (delta.boxes) drawBoxes(delta.boxes);
      $("log").scrollTop = $("log").scrollHeight;
    }
  } catch (e) {
    failed = e.name !== "AbortError";
    if (failed) addTurn("error", e.message);
  } finally {
    // A finished or stopped answer becomes history; a failed one is left out.
    if (answer.textContent && !failed && conversation === state.conversation) {
      state.messages = [...messages, { role: "assistant", content: answer.textContent }];
    } else if (!answer.textContent) {
      answer.remove();
    }
    answer.classList.remove("streaming");
    state.controller = null;
    busy(false);
  }
}

function busy(on) {
  $("send").disabled = on;
  $("stop").hidden = !on;
}

$("api-key").value = localStorage.getItem("cogvlm-api-key") || "";
$("api-key").addEventListener("change", loadModel);
$("file").addEventListener("change", (e) => setImage(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  setImage(e.dataTransfer.files[0]);
});
$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const question = $("question").value.trim();
  if (!question || state.controller) return;
  $("question").value = "";
  ask(question);
});
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", clearConversation);
loadModel();
