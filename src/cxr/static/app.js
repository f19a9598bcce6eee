// The cxr page: send each chosen X-ray to /api/v1/predict and show what comes back. No libraries, nothing from
// the internet; every server string is put in the page as text, never as HTML.
"use strict";

const API = "api/v1";  // relative: the page also works behind a proxy under a path (/cxr/, say)
const PARALLEL = 2; // uploads in flight at once; the server queues the rest anyway
const BUSY_RETRIES = 5; // a 503 (server busy) is waited out this many times, as its Retry-After says
let generation = 0; // "Clear results" starts a new one: files queued or in flight for an older one are dropped
let controller = new AbortController();

const $ = (sel, root = document) => root.querySelector(sel);
const results = $("#results");
const showHeat = $("#show-heat");
let threshold = null;
let maxUploadMb = null; // the service's own limit (GET model), to tell a file over it from a proxy's lower limit

// x with d decimals as Python's f"{x:.{d}f}" writes it: correctly rounded, a tie (0.5625 at 3) to the even digit.
// toFixed takes a tie away from zero ("0.563", where cxr predict says "0.562"); toFixed(100) is the exact value.
function fixed(x, d) {
  const s = x.toFixed(d);
  const [whole, frac] = Math.abs(x).toFixed(100).split(".");
  if (frac[d] !== "5" || !/^0*$/.test(frac.slice(d + 1))) return s;
  const last = Number(d ? frac[d - 1] : whole[whole.length - 1]);
  return last % 2 ? s : `${x < 0 ? "-" : ""}${whole}${d ? "." + frac.slice(0, d) : ""}`;
}

function fmt(p) {
  return fixed(Number(p), 3);
}

// A metric as the report shows it (cxr.predict.score_text): three decimals, more where a value inside 0-1 would read
// as 0 or 1 (the bundled model's AUROC, 0.9996, read "1.000").
function score(x) {
  if (Math.min(x, 1 - x) > 0 && Math.min(x, 1 - x) < 1e-12) x = Math.round(x);  // float rounding of an exact 0 or 1
  for (let d = 3; d <= 6; d++) {
    const text = fixed(x, d);
    if (!(x > 0 && x < 1 && (Number(text) === 0 || Number(text) === 1))) return text;
  }
  return x > 0.5 ? ">0.999999" : "<0.000001";  // never 1.000000 below 1
}

// Decimals to show a threshold with beside a probability (cxr.predict.threshold_decimals): three, or more when
// a probability below the threshold would show as equal to it, or the threshold (inside 0-1) as 0 or 1.
function thresholdDecimals(t, p = null) {
  for (let d = 3; d <= 17; d++) {
    const shown = Number(fixed(t, d));
    const apart = p === null || !(p < t) || Number(fixed(p, d)) < shown;
    if (apart && ((shown !== 0 && shown !== 1) || t === 0 || t === 1)) return d;
  }
  return 17;
}

// A threshold alone (cxr.predict.threshold_text).
function thresholdText(t) {
  return fixed(t, thresholdDecimals(t));
}

// A probability as `cxr predict` shows it (cxr.predict.prob_text): three decimals that never claim certainty;
// beside a threshold shown with `d` decimals, as many more as it takes for the two to compare as they do.
function probText(p, t = null, d = 3) {
  // Judged on the text shown, as in Python: the double 0.9995 lies just above the decimal and had read "1.000".
  if (Number(fmt(p)) >= 1) return ">0.999";
  if (Number(fmt(p)) <= 0) return "<0.001";
  if (t === null) return fmt(p);
  const shownT = Number(fixed(t, d));
  for (let k = 3; k <= d; k++) {
    if ((Number(fixed(p, k)) >= shownT) === (p >= t)) return fixed(p, k);
  }
  return fixed(p, d);
}

async function loadModelInfo() {
  const info = $("[data-testid=model-info]");
  try {
    const r = await fetch(`${API}/model`);
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const m = await r.json();
    threshold = m.threshold;
    maxUploadMb = m.limits && typeof m.limits.max_upload_mb === "number" ? m.limits.max_upload_mb : null;
    const parts = [`model ${m.model_id}`, `${m.arch || "model"}`, `threshold ${thresholdText(m.threshold)}`,
                   `${m.backend} backend`, m.served_by];
    // What the model card says it scored on its validation split (figures measured when it was trained).
    const val = m.metrics && m.metrics.val;
    if (val && typeof val.accuracy === "number" && typeof val.auroc === "number") {
      parts.splice(3, 0, `validation (n ${val.n}): accuracy ${score(val.accuracy)}, AUROC ${score(val.auroc)}`);
    }
    info.textContent = parts.join(" · ");
    // Shown, not in a tooltip: keyboard and touch users never saw it, nor the limitations (children of 1 to 5 years,
    // one hospital) that someone uploading an adult's X-ray needs.
    const use = $("[data-testid=model-use]");
    $(".intended", use).textContent = m.intended_use || "";
    const limits = $(".limits", use);
    limits.replaceChildren(...(Array.isArray(m.limitations) ? m.limitations : []).map((text) => {
      const li = document.createElement("li");
      li.textContent = String(text);
      return li;
    }));
    use.hidden = !(m.intended_use || limits.children.length);
  } catch (e) {
    info.textContent = `Model information unavailable (${e.message}).`;
  }
}

function newCard(file) {
  const node = $("#card").content.firstElementChild.cloneNode(true);
  $(".name", node).textContent = file.name;
  node.dataset.name = file.name;
  // Each card's controls named by its file: a screen reader heard the same "heatmap overlay" on every card.
  $(".toggle input", node).setAttribute("aria-label", `heatmap overlay on ${file.name}`);
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
  // A flat map colours nothing: the picture is the plain X-ray, and no caption should say where evidence lies.
  const flat = heat && card.dataset.flat === "true";
  img.alt = `${card.dataset.name}: ` +
    (heat && !flat ? "the X-ray with the Grad-CAM heatmap laid over it" : "the X-ray as the model saw it");
  $(".scale", card).hidden = !(heat && !flat); // the heatmap's colours, low to high, as the report's pictures show
  // The model's input is square: the X-ray was squashed to it, so a heart or lung is not its true shape.
  $(".caption", card).textContent = (!heat ? "model input"
    : flat ? "Grad-CAM: flat, no region raised the score (see the note)"
    // P between 0.5 and the threshold: the map is of the label, but the output leans the other way (the note)
    : card.dataset.leans ? `Grad-CAM: map of ${card.dataset.target}; the output leans ${card.dataset.leans}`
    : "Grad-CAM: where the evidence for the label lies") + " (square, aspect ratio not kept)";
}

function render(card, res) {
  $(".status", card).textContent = "Done";
  card.dataset.plain = res.image_png_base64 ? `data:image/png;base64,${res.image_png_base64}` : "";
  card.dataset.overlay = res.heatmap ? `data:image/png;base64,${res.heatmap.png_base64}` : "";
  card.dataset.flat = res.heatmap && res.heatmap.flat ? "true" : "false";
  // As cxr.predict.leans_away: the class the map explains against the side of 0.5 the output is on.
  const target = res.heatmap ? res.heatmap.target : "";
  const positive = target === "PNEUMONIA";
  card.dataset.target = target;
  card.dataset.leans = !res.heatmap ? ""
    : positive && res.probability < 0.5 ? "NORMAL"
    : !positive && res.probability > 0.5 ? "PNEUMONIA" : "";
  const verdict = $(".verdict", card);
  verdict.hidden = false;
  const label = $(".label", card);
  label.textContent = res.label;
  label.classList.add(res.label === "PNEUMONIA" ? "pos" : "neg");
  const d = thresholdDecimals(res.threshold, res.probability);
  $("[data-testid=probability]", card).textContent = probText(res.probability, res.threshold, d);
  const bar = $(".bar", card);
  bar.hidden = false;
  $(".fill", bar).style.width = `${(100 * res.probability).toFixed(1)}%`;
  $(".mark", bar).style.left = `${(100 * res.threshold).toFixed(1)}%`;
  $(".threshold", card).textContent =
    `Predicted PNEUMONIA when P(pneumonia) ≥ ${fixed(res.threshold, d)} (the model's threshold).`;
  if (res.input_note) { // a lateral view, say, by its DICOM header: scored all the same, but the result means little
    const caution = $(".caution", card);
    caution.hidden = false;
    caution.textContent = `Caution: ${res.input_note}.`;
  }
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
    // Flat, or the output leaning away from the label the map explains (P between 0.5 and the threshold).
    if (res.heatmap_note) {
      $(".heatnote", card).textContent = res.heatmap.flat ? `Heatmap ${res.heatmap_note}.` : `Heatmap: ${res.heatmap_note}.`;
    }
  } else {
    $(".heatnote", card).textContent = `No heatmap: ${res.heatmap_note || "not available"}.`;
    setPicture(card, false);
  }
}

const sleep = (ms, signal) => new Promise((resolve) => {
  const t = setTimeout(resolve, ms);
  signal.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
});

async function analyse(file, mine) {
  const card = newCard(file);
  const form = new FormData();
  form.append("file", file, file.name);
  const { signal } = controller;
  try {
    for (let attempt = 0; ; attempt++) {
      const r = await fetch(`${API}/predict?include_image=true&heatmap=true`, { method: "POST", body: form, signal });
      let body = null;
      try {
        body = await r.json();
      } catch (_) {
        body = null;
      }
      if (mine !== generation) return; // cleared meanwhile
      if (r.status === 503 && attempt < BUSY_RETRIES) {
        // The server is busy, not the file at fault: wait as long as it asks, then send the file again.
        const wait = Math.min(60, Math.max(1, Number(r.headers.get("Retry-After")) || 1));
        $(".status", card).textContent = `Server busy, trying again in ${wait} s…`;
        await sleep(1000 * wait, signal);
        if (mine !== generation) return;
        $(".status", card).textContent = "Analysing…";
        continue;
      }
      if (!r.ok) {
        showError(card, failureText(r.status, body, file));
        return;
      }
      if (!body || typeof body.probability !== "number") {
        // A 200 whose answer was cut off (or is not the service's): said so, not a script's internals
        showError(card, "The answer from the server was cut off or unreadable: try again.");
        return;
      }
      render(card, body);
      return;
    }
  } catch (e) {
    if (mine !== generation) return;
    showError(card, `Could not reach the server (${e.message}).`);
  }
}

// What a failed upload means. The service answers in JSON with a detail; anything else came from a proxy in front
// of it (nginx's own 413 for a body over its client_max_body_size, a 502 or 504 when the service does not answer),
// and is not the file's fault.
function failureText(status, body, file) {
  if (status === 503) {
    // Busy after every retry: the server's state, not the file's fault (nor a proxy's, when the service said why)
    // the service's own "busy: ..." is what this says already; another reason (out of memory) is added
    const why = body && typeof body.detail === "string" && !body.detail.startsWith("busy") ? ` (${body.detail})` : "";
    return `The server is busy${why}: try this file again later.`;
  }
  if (body && typeof body.detail === "string") return `The server could not use this file (${status}): ${body.detail}`;
  const mb = (file.size / 1e6).toFixed(1);
  if (status === 413 && maxUploadMb !== null && file.size > maxUploadMb * 1e6) {
    // Over the service's own limit too: the file is too large, whichever refused it first (a proxy with a higher
    // limit than the service's had been blamed for it).
    return `The file (${mb} MB) is too large: the service takes files of at most ${maxUploadMb} MB.`;
  }
  if (status === 413) {
    return `The upload (${mb} MB) was refused as too large (413) by a proxy in front of the service: its body ` +
      "size limit (nginx: client_max_body_size) is below the service's; ask the administrator.";
  }
  if (status === 502 || status === 504) {
    return `The service did not answer (HTTP ${status} from a proxy in front of it): try again later, or ask the ` +
      "administrator.";
  }
  return `The server could not use this file (HTTP ${status}).`;
}

async function analyseAll(files) {
  const mine = generation;
  const queue = Array.from(files);
  const worker = async () => {
    while (queue.length && mine === generation) await analyse(queue.shift(), mine);
  };
  await Promise.all(Array.from({ length: Math.min(PARALLEL, queue.length) }, worker));
}

// A dropped folder arrives as an entry without bytes: read the files inside it (and its sub-folders) instead.
async function droppedFiles(entries) {
  const files = [];
  const walk = async (entry) => {
    if (entry.isFile) {
      files.push(await new Promise((resolve, reject) => entry.file(resolve, reject)));
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) { // readEntries gives at most about 100 entries per call
        const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
        if (!batch.length) break;
        for (const child of batch) if (!child.name.startsWith(".")) await walk(child);
      }
    }
  };
  for (const entry of entries) await walk(entry);
  return files;
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
drop.addEventListener("drop", async (ev) => {
  ev.preventDefault();
  const dt = ev.dataTransfer;
  if (!dt) return;
  // Both taken before the handler awaits anything: the browser empties the lists afterwards. A folder has an entry
  // (and no bytes); a file made by a script has bytes and no entry.
  const entries = Array.from(dt.items || [], (item) => item.webkitGetAsEntry && item.webkitGetAsEntry());
  const plain = Array.from(dt.files);
  const files = entries.length && entries.every(Boolean) ? await droppedFiles(entries) : plain;
  if (files.length) analyseAll(files);
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
$("#clear").addEventListener("click", () => {
  generation += 1; // queued files of earlier choices are not sent; answers still on their way are not shown
  controller.abort();
  controller = new AbortController();
  results.replaceChildren();
});

loadModelInfo();
