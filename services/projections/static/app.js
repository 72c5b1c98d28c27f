// needle dashboard: token, area navigation, data loading and the live stream (/dashboard/stream).
"use strict";
(function () {
  const I = window.NeedleI18n;
  const R = window.NeedleRender;
  const TOKEN_KEY = "needle.dashboard.token";
  const LANG_KEY = "needle.dashboard.lang";
  const DEBOUNCE_MS = 300;
  const SAFETY_REFRESH_MS = 60000;  // overdue grows with time alone; the stream covers every write

  const state = { token: null, area: null, org: null, stats: null, overdue: [], overdueAt: 0, series: [], coverage: null,
    seq: 0, source: null, loading: false, again: false, timer: null, retry: 1000 };

  // ---- token: #token=... (then removed from the address bar) or the login box; kept per tab -----------
  function takeToken() {
    const hash = new URLSearchParams(location.hash.slice(1));
    if (hash.get("token")) {
      sessionStorage.setItem(TOKEN_KEY, hash.get("token"));
      history.replaceState(history.state, "", location.pathname + location.search);
    }
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function scopeArea(token) {
    try {
      const b64 = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const claims = JSON.parse(new TextDecoder().decode(Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))));
      return claims.scope && claims.scope.startsWith("area:") ? claims.scope.slice(5) : null;
    } catch (_) {
      return null;
    }
  }

  function showLogin(msgKey) {
    stopStream();
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    document.getElementById("main").hidden = true;
    document.getElementById("logout").hidden = true;
    document.getElementById("login").hidden = false;
    const msg = document.getElementById("login-msg");
    msg.replaceChildren(msgKey ? I.bi(msgKey) : "");
    setLive("offline");
  }

  // ---- data ----------------------------------------------------------------------------------------------
  class HttpError extends Error {
    constructor(status, body) { super(`HTTP ${status}`); this.status = status; this.body = body; }
  }

  async function api(path, params) {
    const q = new URLSearchParams(Object.entries(params || {}).filter(([, v]) => v));
    const r = await fetch(path + (q.toString() ? "?" + q : ""), {
      headers: { Authorization: "Bearer " + state.token, Accept: "application/json" }, cache: "no-store" });
    if (!r.ok) throw new HttpError(r.status, await r.text());
    return r.json();
  }

  async function loadAll(withOrg) {
    if (state.loading) { state.again = true; return; }
    state.loading = true;
    try {
      const area = state.area;
      const [org, stats, overdue, series, coverage, issues] = await Promise.all([
        withOrg || !state.org ? api("/dashboard/org", { area }) : Promise.resolve(state.org),
        api("/v1/stats", { area }), api("/v1/overdue", { area }), api("/v1/stats/series", { area }),
        api("/v1/visits/coverage", { area }), api("/v1/issues", { area, limit: 300 })]);
      if (area !== state.area) { state.again = true; return; }  // navigated meanwhile
      Object.assign(state, { org, stats, issues: issues.items, overdue: overdue.items, overdueAt: Date.now(), series: series.days, coverage,
        seq: Math.max(state.seq, stats.sequence || 0) });
      render();
      document.getElementById("main").hidden = false;
      document.getElementById("logout").hidden = false;
      document.getElementById("login").hidden = true;
      document.body.dataset.seq = String(state.seq);
      document.body.dataset.loaded = String(Number(document.body.dataset.loaded || 0) + 1);
    } catch (e) {
      if (e.status === 401) return showLogin("token_bad");
      if (e.status === 403) return showLogin("scope_bad");
      console.warn("dashboard load failed", e);
      status("load_failed");
      setTimeout(() => schedule(), 5000);
    } finally {
      state.loading = false;
      if (state.again) { state.again = false; schedule(0); }
    }
  }

  function schedule(delay) {
    clearTimeout(state.timer);
    state.timer = setTimeout(() => loadAll(false), delay === undefined ? DEBOUNCE_MS : delay);
  }

  function render() {
    if (!state.org || !state.stats) return;
    const showAll = document.getElementById("dept-all").checked;
    R.renderHeader(state.org, state.stats, navigate);
    I.setCoverageTarget(state.coverage && state.coverage.target);
    R.renderKpis(state.stats, state.overdue.length, state.coverage);
    R.renderAreas(state.org, state.stats, state.overdue, navigate, state.coverage);
    R.renderCoverage(state.org, state.coverage, navigate);
    R.renderOverdue(state.org, state.overdue, state.overdueAt);
    R.renderDepartments(state.org, state.stats, state.overdue, showAll);
    R.renderGaps(state.org);
    if (window.NeedleMap) {  // the grid map: a marker opens the issue in the command centre's page (same tab)
      const box = document.getElementById("map");
      window.NeedleMap.draw(box, { org: state.org, issues: state.issues || [], label: "网格地图 grid map",
        href: (i) => `/app/?issue=${encodeURIComponent(i.id)}` });
      document.getElementById("map-panel").hidden = box.hidden;
    }
    R.renderCharts(state.org, state.series);
    document.title = `${state.org.area.name} · 督办看板 · needle`;
    status();
  }

  function status(msgKey) {
    const line = document.getElementById("status-line");
    const time = new Date().toLocaleTimeString(I.lang === "zh" ? "zh-CN" : "en-GB", { hour12: false });
    line.replaceChildren(...(msgKey ? [I.bi(msgKey), " · "] : []), I.bi("updated"), ` ${time} · `, I.bi("seq"),
      ` ${state.seq}`);
  }

  // ---- live stream ---------------------------------------------------------------------------------------
  function setLive(s) {
    const live = document.getElementById("live");
    live.dataset.state = s;
    const key = s === "live" ? "live" : s === "connecting" ? "connecting" : "offline";
    live.replaceChildren(document.createElement("i"), ...Array.from(I.bi(key).childNodes).map((n) => {
      const b = document.createElement("b"); b.className = n.className; b.textContent = n.textContent; return b;
    }));
  }

  function stopStream() {
    if (state.source) { state.source.close(); state.source = null; }
  }

  function startStream() {
    stopStream();
    if (!state.token) return;
    setLive("connecting");
    const q = new URLSearchParams({ access_token: state.token });
    if (state.area) q.set("area", state.area);
    const src = new EventSource("/dashboard/stream?" + q);
    state.source = src;
    src.addEventListener("hello", (ev) => {
      state.retry = 1000;
      setLive("live");
      const seq = JSON.parse(ev.data).seq;
      if (seq > state.seq) schedule(0);  // missed something while (re)connecting
    });
    src.addEventListener("changed", (ev) => {
      const seq = JSON.parse(ev.data).seq;
      state.seq = Math.max(state.seq, seq);
      schedule();
    });
    src.addEventListener("expired", () => showLogin("token_bad"));
    src.onerror = () => {
      if (state.source !== src) return;
      setLive("offline");
      if (src.readyState === EventSource.CLOSED) {  // refused (401/403/5xx): back off and try again
        stopStream();
        setTimeout(() => { if (state.token && !state.source) { schedule(0); startStream(); } }, state.retry);
        state.retry = Math.min(state.retry * 2, 30000);
      }
    };
  }

  // ---- navigation and controls ---------------------------------------------------------------------------
  function navigate(area) {
    if (area === state.area) return;
    state.area = area;
    history.pushState({ area }, "", "?area=" + encodeURIComponent(area));
    state.org = null;
    loadAll(true);
    startStream();
  }

  function setLang(lang) {
    I.lang = lang;
    localStorage.setItem(LANG_KEY, I.lang);
    document.body.classList.toggle("lang-zh", I.lang === "zh");
    document.body.classList.toggle("lang-en", I.lang === "en");
    document.documentElement.lang = I.lang === "zh" ? "zh-CN" : "en";
    document.getElementById("lang-toggle").textContent = I.lang === "zh" ? "EN" : "中文";
    R.forget();
    render();
  }

  function start() {
    setLang(localStorage.getItem(LANG_KEY) || "zh");
    state.token = takeToken();
    state.area = new URLSearchParams(location.search).get("area") || (state.token && scopeArea(state.token));
    document.getElementById("lang-toggle").addEventListener("click", () => setLang(I.lang === "zh" ? "en" : "zh"));
    document.getElementById("logout").addEventListener("click", () => showLogin());
    document.getElementById("dept-all").addEventListener("change", render);
    document.getElementById("login-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const t = document.getElementById("login-token").value.trim();
      if (!t) return;
      sessionStorage.setItem(TOKEN_KEY, t);
      state.token = t;
      state.area = new URLSearchParams(location.search).get("area") || scopeArea(t);
      document.getElementById("login-token").value = "";
      loadAll(true);
      startStream();
    });
    window.addEventListener("popstate", () => {
      state.area = new URLSearchParams(location.search).get("area") || scopeArea(state.token || "");
      state.org = null;
      loadAll(true);
      startStream();
    });
    setInterval(R.tickOverdue, 1000);
    setInterval(() => { if (state.token) schedule(0); }, SAFETY_REFRESH_MS);
    if (!state.token) return showLogin();
    loadAll(true);
    startStream();
  }

  start();
})();
