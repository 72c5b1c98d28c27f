// needle dashboard: 考核 — the month's scores and rankings (GET /v1/scores), the trend by month, and the
// monthly 通报 (GET /v1/reports/monthly) opened or downloaded with the tab's token. Follows app.js's loads.
(function () {
  "use strict";
  const TOKEN_KEY = "needle.dashboard.token";
  const monthInput = document.getElementById("scores-month");
  if (!monthInput) return;
  const now = new Date();
  monthInput.value = `${now.getFullYear()}-${String(now.getMonth() + 1).padStart(2, "0")}`;

  function token() { return sessionStorage.getItem(TOKEN_KEY); }
  function area() {
    const q = new URLSearchParams(location.search).get("area");
    if (q) return q;
    try {
      const b64 = token().split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const claims = JSON.parse(new TextDecoder().decode(Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))));
      return claims.scope && claims.scope.startsWith("area:") ? claims.scope.slice(5) : "";
    } catch (_) { return ""; }
  }
  async function get(path, params) {
    const q = new URLSearchParams(Object.entries(params).filter(([, v]) => v));
    const r = await fetch(`${path}?${q}`, { headers: { Authorization: "Bearer " + token() }, cache: "no-store" });
    if (!r.ok) throw new Error(String(r.status));
    return r;
  }
  function cell(tr, text, tag) {
    const c = document.createElement(tag || "td");
    c.textContent = text === null || text === undefined ? "—" : String(text);
    tr.appendChild(c);
  }
  const pct = (v) => (v === null || v === undefined ? "—" : `${(v * 100).toFixed(1)}%`);

  function ranking(table, body, title) {
    table.replaceChildren();
    const head = document.createElement("tr");
    [title, "名次 rank", "得分 score", "响应率", "解决率", "满意率", "扣分 deducted"].forEach((h) => cell(head, h, "th"));
    table.appendChild(head);
    for (const row of body.items) {
      if (row.score === null) continue;
      const tr = document.createElement("tr");
      const r = row.rates;
      [row.name, row.rank, row.score, pct(r.response_rate && r.response_rate.value),
        pct(r.resolution_rate && r.resolution_rate.value), pct(r.satisfaction_rate && r.satisfaction_rate.value),
        row.deducted].forEach((v) => cell(tr, v));
      table.appendChild(tr);
    }
  }

  function trend(table, body) {
    table.replaceChildren();
    const months = body.trend || [];
    const head = document.createElement("tr");
    cell(head, "单位 unit", "th");
    months.forEach((m) => cell(head, m.period, "th"));
    table.appendChild(head);
    for (const row of body.items) {
      if (row.score === null && months.every((m) => m.scores[row.id] === null)) continue;
      const tr = document.createElement("tr");
      cell(tr, row.name);
      months.forEach((m) => cell(tr, m.scores[row.id]));
      table.appendChild(tr);
    }
  }

  let busy = false;
  let last = { key: "", at: 0 };
  async function load(force) {
    const key = `${area()}|${monthInput.value}`;
    if (busy || !token() || (!force && key === last.key && Date.now() - last.at < 30000)) return;
    busy = true;
    last = { key, at: Date.now() };
    try {
      const period = monthInput.value;
      const [depts, areas] = await Promise.all([
        get("/v1/scores", { period, by: "department", area: area(), months: "6" }).then((r) => r.json()),
        get("/v1/scores", { period, by: "area", area: area() }).then((r) => r.json())]);
      document.getElementById("scores-rules").textContent = depts.rules_version;
      ranking(document.getElementById("scores-dept"), depts, "部门 department");
      ranking(document.getElementById("scores-area"), areas, "区域 area");
      trend(document.getElementById("scores-trend"), depts);
      document.body.dataset.scores = String(depts.items.length);
    } catch (e) {
      console.warn("scores not loaded", e);
    } finally {
      busy = false;
    }
  }

  for (const a of document.querySelectorAll("#scores-panel a[data-format]")) {
    a.addEventListener("click", async (ev) => {
      ev.preventDefault();
      const fmt = a.dataset.format;
      const r = await get("/v1/reports/monthly", { period: monthInput.value, area: area(), format: fmt });
      const url = URL.createObjectURL(await r.blob());
      if (fmt === "html") { window.open(url, "_blank", "noopener"); return; }
      const link = document.createElement("a");
      link.href = url;
      link.download = `tongbao-${area()}-${monthInput.value}.${fmt}`;
      link.click();
    });
  }
  monthInput.addEventListener("change", () => load(true));
  new MutationObserver(() => load(false)).observe(document.body, { attributes: true, attributeFilter: ["data-loaded"] });
})();
