// The cxr page: send each chosen X-ray to /api/v1/predict and show what comes back. No libraries, nothing from
// the internet; every server string is put in the page as text, never as HTML.
"use strict";

const API = "/api/v1";
const PARALLEL = 2; // uploads in flight at once; the server queues the rest anyway

const $ = (sel, root = document) => root.querySelector(sel);
const results = $("#results");
const showHeat = $("#show-heat");
let threshold = null;

function fmt(p) {
  return Number(p).toFixed(3);
}

async function loadModelInfo() {
  const info = $("[data-testid=model-info]");
  try {
    const r = await fetch(`${API}/model`);
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const m = await r.json();
    threshold = m.threshold;
    const parts = [`model ${m.model_id}`, `${m.arch || "model"}`, `threshold ${fmt(m.threshold)}`,
                   `${m.backend} backend`, m.served_by];
    info.textContent = parts.join(" · ");
    if (m.intended_use) info.title = `Intended use: ${m.intended_use}`;
  } catch (e) {
    info.textContent = `Model information unavailable (${e.message}).`;
  }
}

function newCard(file) {
  const node = $("#card").content.firstElementChild.cloneNode(true);
  $(".name", node).textContent = file.name;
  results.append(node);
  return node;
}

function showError(card, message) {
  $(".status", card).textContent = "Not analysed";
  const err = $(".error", card);
  err.textContent = message;
  err.hidden = false;
  card.classList.add("failed");
}

function setPicture(card, heat) {
  const img = $(".picture", card);
  const src = heat ? card.dataset.overlay : card.dataset.plain;
  if (src) img.src = src;
  img.alt = heat ? "the X-ray with the Grad-CAM heatmap laid over it" : "the X-ray as the model saw it";
  $(".caption", card).textContent = heat ? "Grad-CAM: where the evidence for the label lies" : "model input";
}

function render(card, res) {
  $(".status", card).textContent = "Done";
  card.dataset.plain = res.image_png_base64 ? `data:image/png;base64,${res.image_png_base64}` : "";
  card.dataset.overlay = res.heatmap ? `data:image/png;base64,${res.heatmap.png_base64}` : "";
  const verdict = $(".verdict", card);
  verdict.hidden = false;
  const label = $(".label", card);
  label.textContent = res.label;
  label.classList.add(res.label === "PNEUMONIA" ? "pos" : "neg");
  $("[data-testid=probability]", card).textContent = fmt(res.probability);
  const bar = $(".bar", card);
  bar.hidden = false;
  $(".fill", bar).style.width = `${(100 * res.probability).toFixed(1)}%`;
  $(".mark", bar).style.left = `${(100 * res.threshold).toFixed(1)}%`;
  $(".threshold", card).textContent =
    `Predicted PNEUMONIA when P(pneumonia) ≥ ${fmt(res.threshold)} (the model's threshold).`;
  $(".meta", card).textContent =
    `model ${res.model.id} (${res.model.backend}), cxr ${res.model.version}, ${res.format.toUpperCase()}, ` +
    `${Math.round(res.timing_ms.total)} ms`;
  const toggle = $(".toggle", card);
  const box = $("input", toggle);
  if (res.heatmap) {
    toggle.hidden = false;
    box.checked = showHeat.checked;
    box.addEventListener("change", () => setPicture(card, box.checked));
    setPicture(card, box.checked);
  } else {
    $(".heatnote", card).textContent = `No heatmap: ${res.heatmap_note || "not available"}.`;
    setPicture(card, false);
  }
}

async function analyse(file) {
  const card = newCard(file);
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const r = await fetch(`${API}/predict?include_image=true&heatmap=true`, { method: "POST", body: form });
    let body = null;
    try {
      body = await r.json();
    } catch (_) {
      body = null;
    }
    if (!r.ok) {
      const detail = body && typeof body.detail === "string" ? body.detail : `HTTP ${r.status}`;
      showError(card, `The server could not use this file (${r.status}): ${detail}`);
      return;
    }
    render(card, body);
  } catch (e) {
    showError(card, `Could not reach the server (${e.message}).`);
  }
}

async function analyseAll(files) {
  const queue = Array.from(files);
  const worker = async () => {
    while (queue.length) await analyse(queue.shift());
  };
  await Promise.all(Array.from({ length: Math.min(PARALLEL, queue.length) }, worker));
}

$("#files").addEventListener("change", (ev) => {
  analyseAll(ev.target.files);
  ev.target.value = ""; // so choosing the same file again analyses it again
});

const drop = $("#drop");
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (ev) => {
    ev.preventDefault();
    drop.classList.add("over");
  });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (ev) => {
  ev.preventDefault();
  if (ev.dataTransfer && ev.dataTransfer.files.length) analyseAll(ev.dataTransfer.files);
});
// A file dropped beside the zone would otherwise make the browser navigate away to it.
window.addEventListener("dragover", (ev) => ev.preventDefault());
window.addEventListener("drop", (ev) => ev.preventDefault());

showHeat.addEventListener("change", () => {
  for (const card of results.querySelectorAll(".card")) {
    const box = $("[data-testid=heatmap-toggle]", card);
    if (!$(".toggle", card).hidden) {
      box.checked = showHeat.checked;
      setPicture(card, box.checked);
    }
  }
});
$("#clear").addEventListener("click", () => results.replaceChildren());

loadModelInfo();
