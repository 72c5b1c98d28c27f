// needle dashboard: DOM rendering of one snapshot (org names, stats, overdue, series). Never uses innerHTML
// with data: titles and names come from users and the org file, so every text goes through textContent.
"use strict";
(function () {
  const I = window.NeedleI18n;
  const RATE_KEYS = ["response_rate", "resolution_rate", "satisfaction_rate", "on_time_close_rate",
    "rework_rate", "return_rate", "extension_rate"];
  const DEPT_RATE_KEYS = ["response_rate", "resolution_rate", "on_time_resolve_rate", "return_rate", "extension_rate",
    "supervision_on_time_rate"];
  const COUNT_KEYS = ["reported", "issues_dispatched", "issues_resolved", "closed", "escalated", "sla_breached"];
  const previous = new Map();  // element id -> last text, to flash what changed

  function el(tag, attrs, ...kids) {
    const n = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") n.className = v;
      else if (k === "text") n.textContent = v;
      else if (k.startsWith("on")) n.addEventListener(k.slice(2), v);
      else n.setAttribute(k, v === true ? "" : String(v));
    }
    for (const kid of kids.flat()) {
      if (kid === null || kid === undefined || kid === false) continue;
      n.appendChild(typeof kid === "string" || typeof kid === "number" ? document.createTextNode(String(kid)) : kid);
    }
    return n;
  }

  function tracked(id, tag, cls, text) {
    const node = el(tag, { class: cls, text });
    const before = previous.get(id);
    if (before !== undefined && before !== text) node.classList.add("flash");
    previous.set(id, text);
    return node;
  }

  function replace(id, ...kids) {
    const host = document.getElementById(id);
    host.replaceChildren(...kids);
    return host;
  }

  function areaName(org, id) {
    const a = org.areas[id];
    return a ? a.name : id;
  }

  function deptName(org, id) {
    const d = id && org.departments[id];
    return d ? d.name : (id || "—");
  }

  // the department's kind, by the org's display name (kinds: {sanitation: 环卫}) when it gives one
  function kindTag(org, id) {
    const d = id && org.departments[id];
    if (!d || !d.kind) return null;
    return el("span", { class: "muted small kind" }, ` ${(org.kinds && org.kinds[d.kind]) || d.kind}`);
  }

  function rateCell(id, key, rate) {
    const r = rate || { value: null, numerator: 0, denominator: 0 };
    return el("td", { class: "rate " + I.grade(key, r.value), title: `${I.label(key)}: ${r.numerator}/${r.denominator}` },
      tracked(id, "span", "v", I.pct(r.value)), el("span", { class: "nd", text: `${r.numerator}/${r.denominator}` }));
  }

  function dispatchCell(id, body) {
    const v = body.avg_dispatch_seconds;
    return el("td", { class: "rate " + I.grade("avg_dispatch", v) }, tracked(id, "span", "v", I.duration(v)),
      el("span", { class: "nd", text: `n=${(body.counts || {}).issues_dispatched || 0}` }));
  }

  function renderHeader(org, stats, onArea) {
    const crumbs = org.path.map((a, i) => {
      const last = i === org.path.length - 1;
      return el(last ? "span" : "a", last ? { class: "crumb here" } :
        { class: "crumb", href: "?area=" + encodeURIComponent(a.id), onclick: (e) => { e.preventDefault(); onArea(a.id); } },
      a.name);
    });
    replace("crumbs", ...crumbs.flatMap((c, i) => (i ? [el("span", { class: "sep", text: "›" }), c] : [c])));
    replace("area-title", org.area.name + " ", el("span", { class: "lvl" }, I.bi(org.area.level)));
    replace("period", el("span", {}, I.bi("period")), ` ${stats.from} – ${stats.to}`);
  }

  function coverageOf(coverage, id) {
    if (!coverage) return null;
    return coverage.areas.find((a) => a.id === id) || coverage.grids.find((g) => g.grid === id) || null;
  }

  function coverageCell(id, c) {
    const r = c ? { value: c.rate, numerator: c.visited, denominator: c.households } : null;
    return rateCell(id, "coverage_rate", r);
  }

  function renderKpis(stats, overdueCount, coverage) {
    const o = stats.overall;
    const counts = COUNT_KEYS.map((k) => el("div", { class: "count", id: "count-" + k },
      tracked("count-" + k, "div", "count-value", String((o.counts || {})[k] || 0)), el("div", { class: "count-label" }, I.bi(k))));
    counts.push(el("div", { class: "count " + (overdueCount ? "bad" : ""), id: "count-overdue" },
      tracked("count-overdue", "div", "count-value", String(overdueCount)), el("div", { class: "count-label" }, I.bi("overdue"))));
    if (coverage) {
      counts.push(el("div", { class: "count", id: "count-visits" },
        tracked("count-visits", "div", "count-value", String(coverage.total.visits)), el("div", { class: "count-label" }, I.bi("visits"))));
    }
    replace("counts", ...counts);
    const cards = RATE_KEYS.map((k) => {
      const r = o.rates[k];
      const g = I.grade(k, r.value);
      const [num, den] = r.counts;
      const bar = el("div", { class: "kpi-bar" }, el("i"));
      bar.firstChild.style.width = r.value === null ? "0" : Math.min(100, r.value * 100) + "%";
      return el("div", { class: "kpi " + g, id: "kpi-" + k, "data-value": r.value === null ? "" : r.value },
        el("div", { class: "kpi-label" }, I.bi(k)),
        tracked("kpi-" + k, "div", "kpi-value", I.pct(r.value)),
        el("div", { class: "kpi-counts" }, el("b", { text: r.numerator }), " ", I.bi(num), " / ",
          el("b", { text: r.denominator }), " ", I.bi(den)), bar);
    });
    const avg = o.avg_dispatch_seconds;
    cards.push(el("div", { class: "kpi " + I.grade("avg_dispatch", avg), id: "kpi-avg_dispatch" },
      el("div", { class: "kpi-label" }, I.bi("avg_dispatch")),
      tracked("kpi-avg_dispatch", "div", "kpi-value", I.duration(avg)),
      el("div", { class: "kpi-counts" }, el("b", { text: (o.counts || {}).issues_dispatched || 0 }), " ",
        I.bi("issues_dispatched"))));
    if (coverage) {  // 入户率 beside the other rates: distinct households visited in the period / households
      const t = coverage.total;
      const bar = el("div", { class: "kpi-bar" }, el("i"));
      bar.firstChild.style.width = t.rate === null ? "0" : Math.min(100, t.rate * 100) + "%";
      cards.push(el("div", { class: "kpi " + I.grade("coverage_rate", t.rate), id: "kpi-coverage_rate",
        "data-value": t.rate === null ? "" : t.rate },
      el("div", { class: "kpi-label" }, I.bi("coverage_rate")),
      tracked("kpi-coverage_rate", "div", "kpi-value", I.pct(t.rate)),
      el("div", { class: "kpi-counts" }, el("b", { text: t.visited }), " ", I.bi("visited"), " / ",
        el("b", { text: t.households }), " ", I.bi("households"), " · ", I.bi("target"), " ", I.pct(coverage.target)), bar));
    }
    replace("kpis", ...cards);
  }

  function renderCoverage(org, coverage, onArea) {
    if (!coverage) return;
    const below = coverage.below_target;
    replace("below-count", String(below.length));
    replace("coverage-period", el("span", {}, I.bi("period")), ` ${String(coverage.from).slice(0, 10)} – ${String(coverage.to).slice(0, 10)} · `,
      I.bi("target"), ` ${I.pct(coverage.target)}`);
    if (!below.length) {
      replace("below-table", el("tbody", {}, el("tr", {}, el("td", { class: "empty ok" }, I.bi("none_below")))));
      return;
    }
    const head = el("tr", {}, el("th", {}, I.bi("grid_col")), el("th", { class: "num" }, I.bi("households")),
      el("th", { class: "num" }, I.bi("visited")), el("th", { class: "num" }, I.bi("coverage_rate")),
      el("th", { class: "num" }, I.bi("visits")), el("th", { class: "num" }, I.bi("issues_raised")));
    const rows = below.map((b) => {
      const g = coverage.grids.find((x) => x.grid === b.grid) || b;
      const link = el("a", { class: "drill", href: "?area=" + encodeURIComponent(b.grid),
        onclick: (e) => { e.preventDefault(); onArea(b.grid); } }, g.name || b.grid);
      return el("tr", { "data-grid": b.grid },
        el("td", {}, link, el("div", { class: "muted small" }, areaName(org, g.parent))),
        el("td", { class: "num" }, String(g.households)), el("td", { class: "num" }, String(g.visited)),
        coverageCell(`b-${b.grid}-cov`, g), el("td", { class: "num" }, String(g.visits)),
        el("td", { class: "num" }, `${g.issues_raised} (${g.issues_resolved} ✓)`));
    });
    replace("below-table", el("thead", {}, head), el("tbody", {}, rows));
  }

  function overdueByChild(org, items) {
    const out = {};
    const children = new Set(org.children.map((c) => c.id));
    for (const it of items) {
      let cur = it.grid;
      while (cur && !children.has(cur)) cur = org.areas[cur] ? org.areas[cur].parent : null;
      if (cur) out[cur] = (out[cur] || 0) + 1;
    }
    return out;
  }

  function renderAreas(org, stats, items, onArea, coverage) {
    const head = el("tr", {}, el("th", {}, I.bi("area")), el("th", { class: "num" }, I.bi("reported")),
      el("th", { class: "num" }, I.bi("overdue")), ...RATE_KEYS.map((k) => el("th", { class: "num" }, I.bi(k))),
      el("th", { class: "num" }, I.bi("avg_dispatch")),
      ...(coverage ? [el("th", { class: "num" }, I.bi("coverage_rate"))] : []));
    if (!org.children.length) {
      replace("areas-table", el("tbody", {}, el("tr", {}, el("td", { class: "empty" }, I.bi("no_children")))));
      return;
    }
    const od = overdueByChild(org, items);
    const rows = org.children.map((c) => {
      const body = stats.areas[c.id] || { counts: {}, rates: {} };
      const link = el("a", { class: "drill", href: "?area=" + encodeURIComponent(c.id),
        onclick: (e) => { e.preventDefault(); onArea(c.id); } }, c.name);
      const n = od[c.id] || 0;
      return el("tr", { "data-area": c.id },
        el("td", {}, link, " ", el("span", { class: "lvl" }, I.bi(c.level))),
        el("td", { class: "num" }, tracked(`a-${c.id}-rep`, "span", "v", String(body.counts.reported || 0))),
        el("td", { class: "num " + (n ? "bad-text" : "") }, String(n)),
        ...RATE_KEYS.map((k) => rateCell(`a-${c.id}-${k}`, k, body.rates[k])),
        dispatchCell(`a-${c.id}-avg`, body),
        ...(coverage ? [coverageCell(`a-${c.id}-cov`, coverageOf(coverage, c.id))] : []));
    });
    replace("areas-table", el("thead", {}, head), el("tbody", {}, rows));
  }

  function renderOverdue(org, items, fetchedAt) {
    replace("overdue-count", String(items.length));
    const head = el("tr", {}, ...["issue", "holder", "clock", "due", "overdue_by"].map(
      (k) => el("th", { class: k === "overdue_by" ? "num" : "" }, I.bi(k))));
    if (!items.length) {
      replace("overdue-table", el("tbody", {}, el("tr", {}, el("td", { class: "empty ok" }, I.bi("none_overdue")))));
      return;
    }
    const rows = items.map((it) => {
      const since = el("span", { class: "ticker", "data-base": it.overdue_seconds, "data-at": fetchedAt },
        I.duration(it.overdue_seconds));
      return el("tr", { class: it.overdue_seconds > 86400 ? "sev-bad" : "sev-warn", "data-issue": it.id },
        el("td", {}, el("div", { class: "title", text: it.title }),
          el("div", { class: "muted small" }, `${org.categories[it.category] || it.category} · ${areaName(org, it.grid)} · `,
            I.bi(it.level || "grid"))),
        el("td", {}, deptName(org, it.holder || it.lead_department)),
        el("td", {}, el("span", { class: "pill " + it.clock }, I.bi(it.clock))),
        el("td", { class: "small" }, I.dateTime(it.next_due, org.timezone)),
        el("td", { class: "num strong" }, since));
    });
    replace("overdue-table", el("thead", {}, head), el("tbody", {}, rows));
  }

  function tickOverdue() {
    const now = Date.now();
    for (const n of document.querySelectorAll("#overdue-table .ticker")) {
      const s = Number(n.dataset.base) + (now - Number(n.dataset.at)) / 1000;
      n.textContent = I.duration(s);
    }
  }

  function renderDepartments(org, stats, items, showAll) {
    const holding = {};
    for (const it of items) if (it.holder) holding[it.holder] = (holding[it.holder] || 0) + 1;
    const rows = Object.entries(stats.departments)
      .filter(([id, b]) => showAll || (b.counts.tasks_dispatched || 0) > 0 || holding[id])
      .sort((a, b) => (b[1].counts.tasks_dispatched || 0) - (a[1].counts.tasks_dispatched || 0)
        || deptName(org, a[0]).localeCompare(deptName(org, b[0]), "zh"))
      .map(([id, b]) => el("tr", { "data-dept": id },
        el("td", {}, deptName(org, id), kindTag(org, id)),
        el("td", { class: "num" }, tracked(`d-${id}-n`, "span", "v", String(b.counts.tasks_dispatched || 0))),
        ...DEPT_RATE_KEYS.map((k) => rateCell(`d-${id}-${k}`, k, b.rates[k])),
        el("td", { class: "num" }, String(b.counts.sla_breached || 0)),
        el("td", { class: "num" }, tracked(`d-${id}-urged`, "span", "v", String(b.counts.urged || 0))),
        el("td", { class: "num" }, tracked(`d-${id}-supervised`, "span", "v", String(b.counts.supervised || 0))),
        el("td", { class: "num " + (holding[id] ? "bad-text" : "") }, String(holding[id] || 0))));
    const head = el("tr", {}, el("th", {}, I.bi("department")), el("th", { class: "num" }, I.bi("tasks_dispatched")),
      ...DEPT_RATE_KEYS.map((k) => el("th", { class: "num" }, I.bi(k))),
      el("th", { class: "num" }, I.bi("sla_breached")), el("th", { class: "num" }, I.bi("urged")),
      el("th", { class: "num" }, I.bi("supervised")), el("th", { class: "num" }, I.bi("overdue")));
    const body = rows.length ? rows : [el("tr", {}, el("td", { class: "empty", colspan: 12 }, I.bi("no_depts")))];
    replace("dept-table", el("thead", {}, head), el("tbody", {}, body));
  }

  // ---- configuration gaps: kinds the rulebook names that nothing serves under the area -------------------
  function renderGaps(org) {
    const gaps = org.gaps || [];
    document.getElementById("gaps-panel").hidden = gaps.length === 0;
    document.getElementById("gaps-count").textContent = gaps.length ? String(gaps.length) : "";
    const areaName = (id) => (org.areas[id] ? org.areas[id].name : id);
    const head = el("tr", {}, el("th", {}, I.bi("category")), el("th", {}, I.bi("level")), el("th", {}, I.bi("kind")),
      el("th", {}, I.bi("role")), el("th", {}, I.bi("unserved_areas")));
    const rows = gaps.map((g) => el("tr", { "data-gap": `${g.category}.${g.level}.${g.kind}` },
      el("td", {}, org.categories[g.category] || g.category),
      el("td", {}, I.bi(g.level)),
      el("td", {}, g.kind_name === g.kind ? g.kind : `${g.kind_name} (${g.kind})`),
      el("td", {}, I.bi(g.role === "lead" ? "role_lead" : "role_co")),
      el("td", {}, g.areas.map(areaName).join("、"))));
    replace("gaps-table", el("thead", {}, head), el("tbody", {}, rows));
  }

  // ---- charts (Chart.js 4, vendored) ------------------------------------------------------------------
  const charts = {};
  const COLORS = ["#1565c0", "#2e7d32", "#ef6c00", "#8e24aa", "#c62828"];

  function dayRange(days, tz) {
    const today = new Date().toLocaleDateString("en-CA", { timeZone: tz || undefined });
    const first = new Date(today + "T00:00:00Z");
    first.setUTCDate(first.getUTCDate() - 13);  // two weeks at least; back to the oldest day the API sent
    const start = days.length && days[0].day < first.toISOString().slice(0, 10) ? new Date(days[0].day + "T00:00:00Z") : first;
    const out = [];
    for (const d = start; d.toISOString().slice(0, 10) <= today; d.setUTCDate(d.getUTCDate() + 1)) {
      out.push(d.toISOString().slice(0, 10));
    }
    return out;
  }

  function chartLabel(key) {
    const pair = I.LABELS[key];
    return I.lang === "zh" ? `${pair[0]} ${pair[1]}` : pair[1];
  }

  function renderCharts(org, days) {
    if (!window.Chart) return;
    const byDay = Object.fromEntries(days.map((d) => [d.day, d]));
    const range = dayRange(days, org.timezone);
    const labels = range.map((d) => d.slice(5));
    const rateKeys = ["response_rate", "resolution_rate", "on_time_close_rate", "satisfaction_rate"];
    const rateSets = rateKeys.map((k, i) => ({
      label: chartLabel(k), borderColor: COLORS[i], backgroundColor: COLORS[i], spanGaps: true, tension: 0.25,
      pointRadius: 3, clip: false, data: range.map((d) => {
        const v = byDay[d] && byDay[d].rates[k].value;
        return v === null || v === undefined ? null : Math.round(v * 1000) / 10;
      }),
    }));
    const countKeys = ["reported", "closed", "escalated"];
    const countSets = countKeys.map((k, i) => ({
      label: chartLabel(k), backgroundColor: [COLORS[0], COLORS[1], COLORS[4]][i],
      data: range.map((d) => (byDay[d] ? byDay[d].counts[k] || 0 : 0)),
    }));
    const common = { responsive: true, maintainAspectRatio: false, animation: false, layout: { padding: { top: 6 } },
      plugins: { legend: { position: "bottom", labels: { boxWidth: 12, font: { size: 11 } } } } };
    draw("chart-rates", "line", labels, rateSets, { ...common,
      scales: { x: { offset: true }, y: { min: 0, max: 100, ticks: { callback: (v) => v + "%" } } } });
    draw("chart-counts", "bar", labels, countSets, { ...common,
      scales: { y: { beginAtZero: true, ticks: { precision: 0 } } } });
  }

  function draw(id, type, labels, datasets, options) {
    const c = charts[id];
    if (c) {
      c.data.labels = labels;
      c.data.datasets = datasets;
      c.update("none");
      return;
    }
    charts[id] = new window.Chart(document.getElementById(id), { type, data: { labels, datasets }, options });
  }

  // after a language switch every label text changes: forget them so nothing flashes as "changed"
  function forget() { previous.clear(); }

  window.NeedleRender = { el, forget, renderHeader, renderKpis, renderAreas, renderCoverage, renderOverdue,
    renderDepartments, renderCharts, renderGaps, tickOverdue };
})();
