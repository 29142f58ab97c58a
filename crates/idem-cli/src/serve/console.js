// The idem dead-letter console. Every text from a message goes into the page with
// textContent (never innerHTML), so a body holding markup is shown, not run.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const state = { queue: null, message: null, writes: false };

  function cell(row, text) {
    const td = document.createElement("td");
    td.textContent = text === undefined || text === null ? "-" : String(text);
    row.appendChild(td);
    return td;
  }

  function clear(id) {
    const body = $(id).querySelector("tbody");
    while (body.firstChild) body.removeChild(body.firstChild);
    return body;
  }

  function status(text) { $("status").textContent = text; }

  async function api(path, options) {
    const r = await fetch(path, options);
    const data = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(data.error || ("HTTP " + r.status));
    return data;
  }

  const q = (name) => "/api/queues/" + encodeURIComponent(name);

  async function loadQueues() {
    const data = await api("/api/queues");
    state.writes = data.writes;
    $("mode").textContent = data.writes ? "writes allowed (token needed)" : "read-only";
    const body = clear("queues");
    for (const item of data.queues) {
      const row = document.createElement("tr");
      cell(row, item.queue);
      cell(row, item.dlq || item.error);
      cell(row, item.depth);
      row.addEventListener("click", () => selectQueue(item.queue));
      body.appendChild(row);
    }
    const wanted = new URLSearchParams(location.search).get("queue");
    const first = data.queues.find((x) => x.queue === wanted) || data.queues[0];
    if (first) await selectQueue(first.queue);
  }

  async function selectQueue(name) {
    state.queue = name;
    $("current-queue").textContent = "of " + name;
    const stats = await api(q(name) + "/groups");
    const body = clear("groups");
    for (const g of stats.groups) {
      const row = document.createElement("tr");
      cell(row, g.id);
      cell(row, g.count);
      cell(row, g.error_kind);
      cell(row, g.last_seen);
      cell(row, g.error);
      const act = cell(row, "");
      const button = document.createElement("button");
      button.textContent = "Replay group";
      button.disabled = !state.writes;
      button.addEventListener("click", (e) => { e.stopPropagation(); move("replay", { group: g.id }, g.count + " message(s) of group " + g.id); });
      act.appendChild(button);
      row.addEventListener("click", () => loadMessages({ group: g.id }));
      body.appendChild(row);
    }
    await loadMessages({});
  }

  async function loadMessages(filter) {
    const params = new URLSearchParams({ limit: "50" });
    if (filter.group) params.set("group", filter.group);
    const list = await api(q(state.queue) + "/messages?" + params);
    const body = clear("messages");
    for (const m of list) {
      const row = document.createElement("tr");
      cell(row, m.entry.position);
      cell(row, m.entry.message_id);
      cell(row, m.entry.error);
      row.addEventListener("click", () => showMessage(m, row));
      body.appendChild(row);
    }
    if (list.length) showMessage(list[0], body.firstChild);
  }

  function showMessage(m, row) {
    state.message = m;
    for (const r of document.querySelectorAll("#messages tr.selected")) r.classList.remove("selected");
    if (row) row.classList.add("selected");
    $("message-id").textContent = m.entry.message_id || "(no message id)";
    const body = clear("headers");
    for (const [k, v] of Object.entries(m.headers)) {
      const tr = document.createElement("tr");
      cell(tr, k);
      cell(tr, v);
      body.appendChild(tr);
    }
    let text = m.body.text;
    if (m.body.truncated) text += "\n… [truncated: " + m.body.bytes + " bytes in all]";
    $("body").textContent = text;
    $("body").dataset.format = m.body.format;
    $("replay").disabled = !state.writes;
    $("purge").disabled = !state.writes;
  }

  async function move(action, selection, what) {
    if (!window.confirm(action + " " + what + "?")) return;
    try {
      const report = await api(q(state.queue) + "/" + action, {
        method: "POST",
        headers: { "Content-Type": "application/json", "Authorization": "Bearer " + $("token").value },
        body: JSON.stringify(selection),
      });
      status(action + ": " + report.done + " of " + report.matched + " done, " + report.failed + " failed");
      await loadQueues();
    } catch (e) {
      status(action + " refused: " + e.message);
    }
  }

  $("replay").addEventListener("click", () => {
    const id = state.message && state.message.entry.message_id;
    if (id) move("replay", { ids: [id] }, "message " + id);
  });
  $("purge").addEventListener("click", () => {
    const id = state.message && state.message.entry.message_id;
    if (id) move("purge", { ids: [id] }, "message " + id);
  });

  loadQueues().catch((e) => status("cannot load: " + e.message));
})();
