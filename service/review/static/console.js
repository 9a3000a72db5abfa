// filmgate review console: keyboard triage over the server-rendered grid. Every change goes through the JSON API
// with the session's CSRF token; the server decides who may do what.
"use strict";
(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const role = document.querySelector('meta[name="role"]').content;
  const detectors = JSON.parse(document.getElementById("detectors").textContent);
  const grid = document.getElementById("grid");
  const status = document.getElementById("status");
  const dialog = document.getElementById("detail");
  const detailBody = document.getElementById("detail-body");
  const tiles = () => Array.from(grid.querySelectorAll(".tile"));
  let openId = null;
  let activeDetector = null;

  function say(text) { status.textContent = text; }
  function focused() { return document.activeElement && document.activeElement.classList.contains("tile") ? document.activeElement : null; }
  function targets() {
    const sel = tiles().filter(t => t.classList.contains("selected"));
    if (sel.length) return sel;
    if (openId !== null) return tiles().filter(t => t.dataset.id === String(openId));
    const f = focused();
    return f ? [f] : [];
  }
  function columns() {
    const t = tiles();
    if (!t.length) return 1;
    const top = t[0].offsetTop;
    let n = 0;
    while (n < t.length && t[n].offsetTop === top) n++;
    return Math.max(1, n);
  }
  function move(step) {
    const t = tiles();
    if (!t.length) return;
    const f = focused();
    let i = f ? t.indexOf(f) + step : 0;
    i = Math.max(0, Math.min(t.length - 1, i));
    t[i].focus();
    t[i].scrollIntoView({ block: "nearest" });
  }
  async function api(method, url, body) {
    const opts = { method, credentials: "same-origin", headers: { "X-CSRF-Token": csrf } };
    if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
    const rsp = await fetch(url, opts);
    let data = null;
    try { data = await rsp.json(); } catch (e) { data = null; }
    if (!rsp.ok) throw new Error((data && data.error) || ("HTTP " + rsp.status));
    return data;
  }
  function mark(tile, item) {
    tile.dataset.review = item.review_state;
    tile.classList.remove("state-none", "state-pending", "state-released", "state-confirmed", "selected");
    tile.classList.add("state-" + item.review_state);
    tile.querySelector(".review").textContent = item.review_state === "none" ? "" : item.review_state;
  }
  async function act(action) {
    if (role !== "reviewer") { say("Only reviewers can " + action + "."); return; }
    const list = targets();
    if (!list.length) { say("Nothing in focus or selected."); return; }
    const last = list[list.length - 1];
    let done = 0;
    const errors = [];
    for (const tile of list) {
      try {
        mark(tile, await api("POST", "/api/instances/" + tile.dataset.id + "/" + action));
        done++;
      } catch (e) { errors.push("#" + tile.dataset.id + ": " + e.message); }
    }
    say((action === "release" ? "Released " : "Confirmed ") + done + " of " + list.length + (errors.length ? ". " + errors.join("; ") : "."));
    if (openId !== null) { await openDetail(openId); return; }
    last.focus();
    move(1);
  }
  async function relabelTargets(n) {
    // digits in the grid: label number n of the detector chosen in the toolbar, for the selection or the focused film
    if (role !== "reviewer") { say("Only reviewers can relabel."); return; }
    const det = document.getElementById("bulk-detector").value;
    const labels = detectors[det] || [];
    if (n >= labels.length) { say(det + " has no label " + (n + 1) + "."); return; }
    const list = targets();
    if (!list.length) { say("Nothing in focus or selected."); return; }
    let done = 0;
    const errors = [];
    for (const tile of list) {
      const body = {}; body[det] = labels[n];
      try { await api("POST", "/api/instances/" + tile.dataset.id + "/labels", body); done++; }
      catch (e) { errors.push("#" + tile.dataset.id + ": " + e.message); }
    }
    say("Relabelled " + done + " of " + list.length + ": " + det + " = " + labels[n] + (errors.length ? ". " + errors.join("; ") : "."));
  }
  function cell(text) { const td = document.createElement("td"); td.textContent = text == null ? "" : String(text); return td; }
  function row(cells) { const tr = document.createElement("tr"); cells.forEach(c => tr.appendChild(cell(c))); return tr; }
  function table(head, rows) {
    const t = document.createElement("table");
    const h = document.createElement("tr");
    head.forEach(x => { const th = document.createElement("th"); th.textContent = x; h.appendChild(th); });
    t.appendChild(h);
    rows.forEach(r => t.appendChild(row(r)));
    return t;
  }
  function section(title, node) {
    const h = document.createElement("h3"); h.textContent = title;
    detailBody.appendChild(h); detailBody.appendChild(node);
  }
  async function openDetail(id) {
    let d;
    try { d = await api("GET", "/api/instances/" + id); } catch (e) { say(e.message); return; }
    openId = id;
    detailBody.textContent = "";
    const img = document.createElement("img"); img.src = d.thumbnail; img.alt = "film " + id;
    detailBody.appendChild(img);
    const h = document.createElement("h2");
    h.textContent = "#" + d.id + " " + (d.outcome || d.state) + (d.shadow && d.outcome === "quarantine" ? " (would; shadow mode)" : "") +
      (d.reasons.length ? ": " + d.reasons.join(", ") : "") + " \u2014 review: " + d.review_state + (d.reviewed_by ? " by " + d.reviewed_by : "");
    detailBody.appendChild(h);
    section("Detectors", table(["detector", "score", "threshold", "class", "flagged", "version"],
      (d.findings || []).map(f => [f.detector, f.score, f.threshold == null ? "" : Number(f.threshold.toPrecision(4)), f.predicted || "",
        f.flagged ? "yes" : "", f.version])));
    const facts = [["SOP Instance UID", d.sop_instance_uid], ["Study Instance UID", d.study_instance_uid],
      ["Sender", d.calling_ae + (d.peer_address ? " @ " + d.peer_address : "")], ["Received", d.received_at], ["Decided", d.decided_at]];
    Object.entries(d.header || {}).forEach(([k, v]) => facts.push([k, v]));
    if (d.patient) { facts.push(["Patient name", d.patient.name]); facts.push(["Patient ID", d.patient.id]); }
    const notes = d.notes || {};  // the decision's notes by reason; a list from other sources (a sweep)
    if (Array.isArray(notes)) notes.forEach(n => facts.push(["Note", typeof n === "string" ? n : JSON.stringify(n)]));
    else Object.entries(notes).forEach(([k, v]) => facts.push(["Note (" + k + ")", v]));
    if (d.error) facts.push(["Error", d.error]);
    section("Facts", table(["", ""], facts));
    section("Deliveries", table(["destination", "state", "at", "error"], (d.deliveries || []).map(x => [x.destination, x.state, x.at, x.error])));
    const form = document.createElement("div");
    // digits relabel the detector behind the film's first reason (else the first that flagged it)
    const first = (d.findings || []).find(f => d.reasons.length && f.reason === d.reasons[0]);
    const flagged = (d.findings || []).filter(f => f.flagged).map(f => f.detector);
    activeDetector = (first && first.detector) || flagged[0] || Object.keys(detectors)[0] || null;
    Object.entries(detectors).forEach(([det, labels]) => {
      const label = document.createElement("label");
      label.textContent = det + " ";
      const sel = document.createElement("select");
      sel.dataset.detector = det;
      sel.appendChild(new Option("\u2014", ""));
      labels.forEach((l, i) => sel.appendChild(new Option((i + 1) + " " + l, l)));
      if (d.labels && d.labels[det]) sel.value = d.labels[det].label;
      sel.addEventListener("focus", () => { activeDetector = det; });
      label.appendChild(sel);
      form.appendChild(label);
      form.appendChild(document.createTextNode(" "));
    });
    const save = document.createElement("button"); save.textContent = "Save labels"; save.id = "save-labels";
    save.addEventListener("click", () => saveLabels());
    form.appendChild(save);
    section("True class (relabel" + (activeDetector ? "; digits set " + activeDetector : "") + ")", form);
    const keep = activeDetector;
    if (!dialog.open) dialog.showModal();  // focuses the first control, which would make its detector active
    activeDetector = keep;
    const sel = detailBody.querySelector('select[data-detector="' + keep + '"]');
    if (sel) sel.focus();
  }
  async function saveLabels(only) {
    if (role !== "reviewer") { say("Only reviewers can relabel."); return; }
    const labels = {};
    detailBody.querySelectorAll("select[data-detector]").forEach(s => { if (s.value && (!only || s.dataset.detector === only)) labels[s.dataset.detector] = s.value; });
    if (!Object.keys(labels).length) { say("Choose a label first."); return; }
    try { await api("POST", "/api/instances/" + openId + "/labels", labels); say("Labels saved: " + JSON.stringify(labels)); }
    catch (e) { say(e.message); }
  }
  function closeDetail() {
    if (dialog.open) dialog.close();
    const id = openId; openId = null;
    const t = tiles().find(x => x.dataset.id === String(id));
    if (t) t.focus();
  }
  function page(rel) { const a = document.getElementById(rel === "next" ? "next-page" : "prev-page"); if (a) location.href = a.href; }

  document.getElementById("detail-close").addEventListener("click", closeDetail);
  dialog.addEventListener("close", () => { if (openId !== null) closeDetail(); });
  grid.addEventListener("dblclick", e => { const t = e.target.closest(".tile"); if (t) openDetail(t.dataset.id); });
  grid.addEventListener("click", e => { const t = e.target.closest(".tile"); if (t) { t.focus(); if (e.shiftKey || e.ctrlKey || e.metaKey) t.classList.toggle("selected"); } });

  document.addEventListener("keydown", e => {
    if (e.altKey || e.ctrlKey || e.metaKey) return;
    const tag = (e.target.tagName || "").toLowerCase();
    if ((tag === "input" || tag === "select" || tag === "textarea") && !dialog.open) return;
    if (dialog.open) {
      if (e.key === "Escape") { e.preventDefault(); closeDetail(); return; }
      if (/^[1-9]$/.test(e.key) && activeDetector) {
        const sel = detailBody.querySelector('select[data-detector="' + activeDetector + '"]');
        const labels = detectors[activeDetector] || [];
        const n = Number(e.key) - 1;
        if (sel && n < labels.length) { e.preventDefault(); sel.value = labels[n]; saveLabels(activeDetector); }
        return;
      }
      if (e.key === "r") { e.preventDefault(); act("release"); return; }
      if (e.key === "c") { e.preventDefault(); act("confirm"); return; }
      return;
    }
    const cols = columns();
    switch (e.key) {
      case "ArrowRight": case "l": move(1); break;
      case "ArrowLeft": case "h": move(-1); break;
      case "ArrowDown": case "j": move(cols); break;
      case "ArrowUp": case "k": move(-cols); break;
      case "x": case " ": { const f = focused(); if (f) f.classList.toggle("selected"); break; }
      case "a": { const t = tiles(); const all = t.every(x => x.classList.contains("selected")); t.forEach(x => x.classList.toggle("selected", !all)); break; }
      case "r": act("release"); break;
      case "c": act("confirm"); break;
      case "Enter": case "o": { const f = focused(); if (f) openDetail(f.dataset.id); break; }
      case "1": case "2": case "3": case "4": case "5": case "6": case "7": case "8": case "9":
        relabelTargets(Number(e.key) - 1); break;
      case "n": page("next"); break;
      case "p": page("prev"); break;
      default: return;
    }
    e.preventDefault();
  });
  const first = tiles()[0];
  if (first) first.focus();
})();
