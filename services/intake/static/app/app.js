// needle working pages: sign-in, the role's page, and every action through the public /v1 API.
"use strict";
(function () {
  const TOKEN_KEY = "needle.app.token";
  const PAGES = { grid_worker: "worker", handler: "handler", supervisor: "centre" };
  const ROLE_NAMES = { grid_worker: ["网格员", "grid worker"], handler: ["承办部门", "handler"],
    supervisor: ["指挥中心", "command centre"], integrator: ["系统对接", "integrator"], admin: ["管理员", "admin"] };
  const STATUS = { pending_review: ["待受理", "awaiting triage"], rejected: ["不予受理", "rejected"],
    voided: ["已作废", "voided"], reported: ["已上报", "reported"], routed: ["已分派", "routed"], dispatched: ["待响应", "dispatched"],
    acknowledged: ["处理中", "in progress"], in_progress: ["处理中", "in progress"], resolved: ["待核查", "to verify"],
    verified: ["已核查", "verified"], closed: ["已办结", "closed"], reopened: ["返工", "reopened"],
    returned: ["已退单", "returned"], merged: ["已合并办理", "merged"], suspended: ["缓办中", "suspended"],
    superseded: ["已结束", "superseded"], escalated: ["已上提", "escalated"], cancelled: ["已撤销", "cancelled"] };
  const LIGHTS = { green: ["正常", "on time"], yellow: ["临期", "due soon"], red: ["超期", "overdue"], grey: ["已结束", "done"] };
  const TRIAGE = { accepted: ["已受理", "accepted"], rejected: ["不予受理", "rejected"], voided: ["已作废", "voided"],
    recategorised: ["已改类", "recategorised"] };
  const URGENCY = { normal: ["一般", "normal"], urgent: ["紧急", "urgent"], emergency: ["特急", "emergency"] };
  const SATISFACTION = { satisfied: ["满意", "satisfied"], basically_satisfied: ["基本满意", "basically satisfied"],
    dissatisfied: ["不满意", "dissatisfied"] };
  const COMMENT_KINDS = { comment: ["意见", "comment"], progress: ["阶段性答复", "progress report"],
    info_request: ["请补充材料", "information request"], info_reply: ["补充答复", "information reply"] };
  const st = { org: null, token: null, claims: null, minSeq: 0, categories: null, risks: null, timer: null, source: null,
    view: null, arg: null };

  // ---- small DOM helpers ---------------------------------------------------------------------------------
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "class") el.className = v;
      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const kid of kids.flat(Infinity)) if (kid !== null && kid !== undefined && kid !== false)
      el.append(kid instanceof Node ? kid : String(kid));
    return el;
  }
  const bi = (pair) => [h("span", { class: "zh" }, pair[0]), h("span", { class: "en", lang: "en" }, pair[1])];
  const T = (zh, en) => bi([zh, en]);
  const main = () => document.getElementById("main");
  function show(...nodes) { main().replaceChildren(...nodes.flat(Infinity).filter((n) => n !== null && n !== undefined && n !== false)); }

  function flash(kind, nodes) {
    const f = document.getElementById("flash");
    f.className = "flash " + kind;
    f.replaceChildren(...[nodes].flat(Infinity));
    f.hidden = false;
    if (kind === "ok") setTimeout(() => { f.hidden = true; }, 4000);
  }
  function clearFlash() { document.getElementById("flash").hidden = true; }

  // ---- the token: #token=... once (then stripped from the address bar), or pasted; kept in this tab only --
  function claimsOf(token) {
    try {
      const b64 = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      return JSON.parse(new TextDecoder().decode(Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))));
    } catch (_) { return null; }
  }
  function takeToken() {
    const hash = new URLSearchParams(location.hash.slice(1));
    if (hash.get("token")) {
      sessionStorage.setItem(TOKEN_KEY, hash.get("token"));
      history.replaceState(null, "", location.pathname + location.search);
    }
    // the supervisor dashboard's map opens issues here: the same tab's dashboard sign-in serves
    return sessionStorage.getItem(TOKEN_KEY) || sessionStorage.getItem("needle.dashboard.token");
  }
  function signOut(msg) {
    sessionStorage.removeItem(TOKEN_KEY);
    st.token = null; st.claims = null;
    stopLive();
    signInPage(msg);
  }

  // ---- the API: problem+json in words, Needle-Min-Seq after our own writes, retries for reports --------
  class Problem extends Error {
    constructor(status, body) {
      super((body && (body.detail || body.title)) || `HTTP ${status}`);
      this.status = status; this.body = body || {};
    }
  }
  async function call(method, path, body, extra) {
    const headers = { Authorization: "Bearer " + st.token, Accept: "application/json" };
    if (method === "GET" && st.minSeq) headers["Needle-Min-Seq"] = String(st.minSeq);
    const raw = body instanceof Blob;
    if (body !== undefined) headers["Content-Type"] = raw ? (body.type || "application/octet-stream") : "application/json";
    Object.assign(headers, extra || {});
    const r = await fetch(path, { method, headers, cache: "no-store",
      body: body === undefined ? undefined : (raw ? body : JSON.stringify(body)) });
    const seq = Number(r.headers.get("Needle-Seq") || 0);
    if (method !== "GET" && seq > st.minSeq) st.minSeq = seq;
    const text = await r.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = { detail: text }; }
    if (!r.ok) {
      if (r.status === 401) { signOut(problemWords(new Problem(401, data))); throw new Problem(401, data); }
      throw new Problem(r.status, data);
    }
    return data;
  }
  const get = (path) => call("GET", path);
  // photos: POST /v1/media with the bytes, then the issue's write names them ({id, phase})
  async function uploadAll(files, phase) {
    const out = [];
    for (const f of Array.from(files || [])) out.push({ id: (await call("POST", "/v1/media", f)).id, phase });
    return out;
  }
  // a stored photo: read with the token (an <img> cannot send it), shown from a blob: URL
  function photo(m) {
    const img = h("img", { alt: (m.phase === "after" ? "处理后 after" : m.phase === "before" ? "处理前 before" : "照片 photo"),
      class: "photo" });
    fetch(m.thumb || m.url, { headers: { Authorization: "Bearer " + st.token } })
      .then((r) => (r.ok ? r.blob() : null)).then((b) => { if (b) img.src = URL.createObjectURL(b); }).catch(() => {});
    return img;
  }
  function photos(media) {
    if (!media || !media.length) return null;
    const col = (phase, label) => {
      const ms = media.filter((m) => (phase === "before" ? m.phase !== "after" : m.phase === "after"));
      return ms.length ? h("figure", { class: "phase" }, h("figcaption", {}, bi(label)), h("div", { class: "thumbs" }, ms.map(photo))) : null;
    };
    return h("div", { class: "photos" }, col("before", ["处理前", "before"]), col("after", ["处理后", "after"]));
  }
  const post = (path, body, extra) => call("POST", path, body === undefined ? {} : body, extra);

  function problemWords(err) {
    if (!(err instanceof Problem)) return [T("网络不通，请稍后再试", "The network is down; try again"), " (" + err.message + ")"];
    const b = err.body;
    const zh = { 400: "请求有误", 401: "登录已失效，请重新登录", 403: "无权操作", 404: "未找到", 409: "状态已变化，请刷新",
      412: "内容已被他人修改，请刷新", 422: "填写有误", 429: "操作太频繁，请稍候", 503: "服务暂不可用" }[err.status] || "操作失败";
    const words = [h("strong", {}, zh), " ", h("span", { class: "en", lang: "en" }, b.title || `HTTP ${err.status}`)];
    const field = b.field || (b.errors && b.errors[0] && (b.errors[0].field || (b.errors[0].loc || []).join(".")));
    const detail = b.detail || (b.errors && b.errors[0] && (b.errors[0].message || b.errors[0].msg));
    if (field) words.push(h("div", {}, "字段 field: ", h("code", {}, field)));
    if (detail) words.push(h("div", { class: "detail" }, detail));
    return words;
  }
  // run one write: the button waits, a refusal is shown in words; on success ``after`` (a new view) then the note
  async function act(button, fn, okWords, after) {
    clearFlash();
    if (button) button.disabled = true;
    try {
      const out = await fn();
      if (after) await after(out);  // the new view is drawn before the note shows (no stale form to fill)
      if (okWords) flash("ok", typeof okWords === "function" ? okWords(out) : okWords);
      return out;
    } catch (err) {
      if (!(err instanceof Problem && err.status === 401)) flash("error", problemWords(err));
      return undefined;
    } finally { if (button) button.disabled = false; }
  }

  // ---- time, lights and countdowns -----------------------------------------------------------------------
  function light(due, since, status, warned) {
    if (!due || ["closed", "verified", "resolved", "cancelled", "returned", "superseded"].includes(status)) return "grey";
    const left = Date.parse(due) - Date.now();
    if (left < 0) return "red";
    const span = since ? Date.parse(due) - Date.parse(since) : 0;
    if (warned || (span > 0 && left < span / 4)) return "yellow";
    return "green";
  }
  function lightBadge(l) { return h("span", { class: "light " + l }, h("i", { "aria-hidden": "true" }), bi(LIGHTS[l])); }
  function countdown(due) {
    if (!due) return "—";
    let s = Math.round((Date.parse(due) - Date.now()) / 1000);
    const late = s < 0; s = Math.abs(s);
    const d = Math.floor(s / 86400), hh = Math.floor(s % 86400 / 3600), mm = Math.floor(s % 3600 / 60);
    const txt = (d ? d + "天" : "") + (d || hh ? hh + "时" : "") + mm + "分";
    return late ? "超期 " + txt : "剩 " + txt;
  }
  function when(ts) { return ts ? new Date(ts).toLocaleString("zh-CN", { hour12: false }) : "—"; }
  function statusBadge(s) { return h("span", { class: "status s-" + s }, bi(STATUS[s] || [s, s])); }
  // a task's own words: "resolved" is the department's part done (已办理), not the issue waiting for 核查
  const TASK_STATUS = { resolved: ["已办理", "resolved"] };
  function taskBadge(s) { return h("span", { class: "status s-" + s }, bi(TASK_STATUS[s] || STATUS[s] || [s, s])); }
  function taskDue(t) { return t.status === "dispatched" ? t.acknowledge_due : t.resolve_due; }
  function taskLight(t) {
    return light(taskDue(t), t.status === "dispatched" ? t.dispatched_at : (t.acknowledged_at || t.dispatched_at),
      t.status, (t.warned || []).includes(t.status === "dispatched" ? "acknowledge" : "resolve"));
  }

  // ---- catalog: the rulebook's categories (Chinese names) and risk flags, from the public Open311 list ---
  async function catalog() {
    if (st.categories) return;
    const services = await fetch("/open311/v2/services.json").then((r) => r.json());
    st.categories = services.map((s) => ({ code: s.service_code, name: s.service_name, group: s.group || "" }));
    st.risks = [];
    if (services.length) {
      const def = await fetch(`/open311/v2/services/${encodeURIComponent(services[0].service_code)}.json`)
        .then((r) => r.json());
      const risk = (def.attributes || []).find((a) => a.code === "risk");
      st.risks = risk ? risk.values.map((v) => ({ key: v.key, name: v.name })) : [];
    }
  }
  const categoryName = (code) => ((st.categories || []).find((c) => c.code === code) || { name: code }).name;

  // ---- chrome --------------------------------------------------------------------------------------------
  function chrome(tabs) {
    const role = st.claims.role;
    document.getElementById("who").replaceChildren(...bi(ROLE_NAMES[role] || [role, role]), " · ",
      h("code", {}, (st.claims.scope || "—").replace(/^(area|dept):/, "")));
    const lo = document.getElementById("logout");
    lo.hidden = false;
    lo.onclick = () => signOut([T("已退出", "Signed out")]);
    const nav = document.getElementById("tabs");
    nav.hidden = !tabs.length;
    nav.replaceChildren(...tabs.map(([view, label]) => h("button", { type: "button", class: "tab",
      "aria-current": st.view === view ? "page" : null, onclick: () => go(view) }, bi(label))));
  }
  function go(view, arg) {
    st.view = view; st.arg = arg;
    clearTimeout(st.timer);
    clearFlash();
    const drawn = render().catch((err) => flash("error", problemWords(err)));
    main().focus({ preventScroll: true });
    window.scrollTo(0, 0);
    return drawn;
  }
  async function render() {
    const page = PAGES[st.claims.role];
    if (page === "worker") return worker();
    if (page === "handler") return handler();
    return centre();
  }
  function refreshSoon(ms) { clearTimeout(st.timer); st.timer = setTimeout(() => render().catch(() => {}), ms); }

  // ---- sign-in and the wrong-role page ------------------------------------------------------------------
  function signInPage(msg) {
    document.getElementById("tabs").hidden = true;
    document.getElementById("logout").hidden = true;
    document.getElementById("who").replaceChildren();
    const ta = h("textarea", { id: "token-input", rows: "4", autocomplete: "off", spellcheck: "false",
      placeholder: "needle token issue --role ROLE --scope SCOPE --link" });
    show(h("section", { class: "card narrow" },
      h("h1", {}, T("登录", "Sign in")),
      msg ? h("div", { class: "flash error", role: "alert" }, msg) : null,
      h("p", { class: "muted" }, T("打开 needle token issue … --link 给出的链接，或粘贴令牌。",
        "Open the link that needle token issue … --link prints, or paste a token.")),
      h("form", { onsubmit: (e) => { e.preventDefault(); const v = ta.value.trim(); if (v) { sessionStorage.setItem(TOKEN_KEY, v); start(); } } },
        h("label", { for: "token-input" }, T("令牌", "Token")), ta,
        h("button", { type: "submit", class: "primary" }, T("进入", "Open")))));
  }
  function wrongRolePage(role, wanted) {
    document.getElementById("tabs").hidden = true;
    show(h("section", { class: "card narrow wrong-role", "aria-labelledby": "wr-title" },
      h("h1", { id: "wr-title" }, T("此页面不对您的角色开放", "This page is not for your role")),
      h("p", {}, T("您的令牌角色是", "Your token's role is"), " ", h("strong", {}, bi(ROLE_NAMES[role] || [role, role])),
        wanted ? [" — ", T("此页面面向", "this page serves"), " ", h("strong", {}, bi(ROLE_NAMES[wanted]))] : null, "."),
      h("p", {}, T("工作页面服务于网格员、承办部门和指挥中心（督办）。", "The working pages serve grid workers, handlers and the command centre (supervisors).")),
      PAGES[role] ? h("p", {}, h("a", { href: "/app/", class: "go-mine" }, T("前往我的页面", "Go to my page"))) : null,
      h("p", {}, role === "supervisor" || role === "admin"
        ? h("a", { href: "/dashboard" }, T("督办看板", "Supervisor dashboard")) : null,
      " ", h("a", { href: "/docs" }, T("接口文档", "API docs"))),
      h("button", { type: "button", onclick: () => signOut(null) }, T("换一个令牌", "Use another token"))));
  }

  // ---- comments with the lead, the co-handlers, the grid worker and the command centre (one thread per issue) -
  async function commentsBox(issueId, taskId, kinds) {
    const id = encodeURIComponent(issueId);
    const data = await get(`/v1/issues/${id}/comments`);
    const text = h("textarea", { id: "cm-text", rows: "2", maxlength: "5000" });
    const kind = h("select", { id: "cm-kind" }, kinds.map((k) => h("option", { value: k }, COMMENT_KINDS[k].join(" "))));
    const send = h("button", { type: "button", class: "primary", id: "cm-send" }, T("发送", "Send"));
    send.onclick = () => act(send, () => post(`/v1/issues/${id}/comments`,
      { text: text.value.trim(), kind: kind.value, task_id: taskId || undefined }),
    [T("已发送", "Sent")], () => go(st.view, st.arg));
    const items = data.items || [];
    return h("section", { class: "card", id: "comments" }, h("h2", {}, T("沟通记录", "Comments"), " ",
      h("span", { class: "badge" }, items.length)),
    items.length ? h("ol", { class: "comments" }, items.map((c) => h("li", { class: "comment k-" + c.kind },
      h("div", { class: "comment-meta" }, h("strong", {}, bi(ROLE_NAMES[c.role] || [c.role, c.role])),
        c.department ? [" ", h("code", {}, c.department)] : null, " · ", when(c.at), " · ",
        h("span", { class: "kind" }, bi(COMMENT_KINDS[c.kind] || [c.kind, c.kind]))),
      h("p", { class: "comment-text" }, c.text))))
      : h("p", { class: "muted" }, T("暂无沟通", "No comments yet")),
    h("label", { for: "cm-kind" }, T("类型", "Kind")), kind,
    h("label", { for: "cm-text" }, T("内容", "Text")), text, h("div", { class: "row" }, send));
  }
  // what a task waits for (退单审核, 延期, 缓办) and where it stands, in words
  function taskFlags(t) {
    const f = [];
    if (t.return_requested) f.push(h("span", { class: "flag wait" }, bi(["退单待审核", "return awaiting review"]), "：", t.return_requested));
    if (t.extension_requested) f.push(h("span", { class: "flag wait" }, bi(["延期待审批", "extension awaiting approval"]),
      ` +${Math.round(t.extension_requested / 3600)}h`));
    if (t.suspension_requested) f.push(h("span", { class: "flag wait" }, bi(["缓办待审批", "suspension awaiting approval"]),
      " → ", when(t.suspension_requested), t.suspension_reason ? "：" + t.suspension_reason : ""));
    if (t.suspended) f.push(h("span", { class: "flag paused" }, bi(["缓办中", "suspended"]), " → ", when(t.suspended_until)));
    if (t.supervised_due) f.push(h("span", { class: "flag super" }, bi(["督办", "supervised"]), " ", when(t.supervised_due)));
    if (t.reassigned_to) f.push(h("span", { class: "flag" }, bi(["已改派", "reassigned to"]), " ", h("code", {}, t.reassigned_to)));
    return f.length ? h("div", { class: "flags" }, f) : null;
  }
  // a date (and time) picked in the browser's zone, sent as RFC 3339 with its offset (the API wants a zone)
  function zoned(value) { const d = new Date(value); return isNaN(d) ? value : d.toISOString(); }
  function daysAhead(n) {
    const d = new Date(Date.now() + n * 86400000);
    const p = (x) => String(x).padStart(2, "0");
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T09:00`;
  }

  // ==== grid worker ======================================================================================
  function worker() {
    chrome([["report", ["上报", "Report"]], ["mine", ["我的上报", "My reports"]]]);
    if (st.view === "issue") return workerIssue(st.arg);
    if (st.view === "mine") return myReports();
    return reportForm();
  }
  const grid = () => (st.claims.scope || "").replace(/^area:/, "");

  async function reportForm() {
    await catalog();
    const draft = { key: crypto.randomUUID(), location: null };
    const list = h("datalist", { id: "cat-list" }, st.categories.map((c) => h("option", { value: `${c.name} (${c.code})` })));
    const cat = h("input", { id: "f-cat", list: "cat-list", required: true, autocomplete: "off",
      placeholder: "搜索类别 search: 路面, 噪声 …" });
    const title = h("input", { id: "f-title", required: true, maxlength: "200" });
    const desc = h("textarea", { id: "f-desc", rows: "3", maxlength: "5000" });
    // the resident agrees that the description be published (anonymous Open311 reads; a moderator may withdraw it)
    const descPublic = h("input", { type: "checkbox", id: "f-desc-public" });
    const urgency = h("select", { id: "f-urgency" }, Object.entries(URGENCY).map(([k, v]) => h("option", { value: k }, `${v[0]} ${v[1]}`)));
    const risks = st.risks.map((r) => h("label", { class: "check" },
      h("input", { type: "checkbox", name: "risk", value: r.key }), " ", r.name));
    const where = h("output", { id: "f-where", class: "muted" }, T("未定位", "no location yet"));
    // the grid map of the worker's scope (GET /v1/map): a tap picks the place, the grid found by its boundary
    if (!st.map) st.map = await get("/v1/map").catch(() => ({}));
    const mapBox = h("div", { class: "map pick", id: "pick-map" });
    const located = (how, loc) => {
      draft.location = loc;
      const inside = window.NeedleMap && Object.keys(st.map.boundaries || {}).find((g) =>
        (st.map.areas[g] || {}).level === "grid" && [st.map.boundaries[g]].flatMap((geo) => (geo.type === "Polygon"
          ? [geo.coordinates[0]] : geo.type === "MultiPolygon" ? geo.coordinates.map((x) => x[0]) : []))
          .some((r) => window.NeedleMap.inside(loc.lon, loc.lat, r)));
      where.replaceChildren(...T(...how), ` ${loc.lat}, ${loc.lon}`, " · ",
        inside ? h("span", { class: "in-grid" }, (st.map.areas[inside] || {}).name || inside)
          : h("span", { class: "out-grid" }, ...T("不在本网格内", "outside your grid")));
      drawPick();
    };
    const drawPick = () => window.NeedleMap && window.NeedleMap.draw(mapBox, { org: st.map, issues: [],
      label: "点击地图选择位置 tap the map to pick the place", pin: draft.location,
      onPick: (loc) => located(["地图选点", "picked on the map"], loc) });
    drawPick();
    const gpsBtn = h("button", { type: "button", id: "f-gps", onclick: () => {
      where.replaceChildren(...T("定位中…", "locating…"));
      navigator.geolocation.getCurrentPosition((pos) => {
        located(["已定位", "located"], { lat: +pos.coords.latitude.toFixed(6), lon: +pos.coords.longitude.toFixed(6) });
      }, (e) => where.replaceChildren(...T("无法定位", "no fix"), " (" + e.message + ")"),
      { enableHighAccuracy: true, timeout: 10000 });
    } }, T("用GPS定位", "Use GPS"));
    const pics = h("input", { id: "f-photo", type: "file", accept: "image/*", capture: "environment", multiple: true });
    const preview = h("div", { class: "thumbs" });
    pics.addEventListener("change", () => {
      draft.media = null;
      preview.replaceChildren(...Array.from(pics.files).map((f) => h("img", { src: URL.createObjectURL(f), alt: "照片 photo " + f.name })));
    });
    const submit = h("button", { type: "submit", class: "primary big", id: "f-submit" }, T("提交上报", "Submit report"));
    const form = h("form", { class: "card", novalidate: true, onsubmit: async (e) => {
      e.preventDefault();
      const m = /\(([A-Za-z0-9_-]+)\)\s*$/.exec(cat.value) || [null, (st.categories.find((c) => c.name === cat.value.trim()) || {}).code];
      const body = { grid: grid(), category: m[1] || cat.value.trim(), title: title.value.trim(),
        urgency: urgency.value, risk: Array.from(form.querySelectorAll("input[name=risk]:checked")).map((x) => x.value) };
      if (desc.value.trim()) body.description = desc.value.trim();
      if (descPublic.checked) body.description_public = true;
      if (draft.location) body.location = draft.location;
      await act(submit, async () => {
        if (!draft.media) draft.media = await uploadAll(pics.files, "before");  // once per report, like its key
        if (draft.media.length) body.media = draft.media;
        return reportWithRetry(body, draft.key, submit);
      },
        (out) => [T("已上报", "Reported"), " ", h("code", {}, out.id)], (out) => go("issue", out.id));
    } },
    h("h1", {}, T("上报事件", "Report an issue")),
    h("p", { class: "muted" }, T("网格", "Grid"), " ", h("code", {}, grid())),
    h("label", { for: "f-cat" }, T("类别", "Category")), cat, list,
    h("label", { for: "f-title" }, T("标题", "Title")), title,
    h("label", { for: "f-desc" }, T("描述", "Description")), desc,
    h("label", { class: "check" }, descPublic, " ", T("居民同意向公众公开此项", "the resident agrees to show it publicly")),
    h("div", { class: "row" }, gpsBtn, where),
    mapBox.hidden ? null : h("p", { class: "muted small" }, T("或点击网格地图选点", "or tap the grid map")), mapBox,
    h("label", { for: "f-photo" }, T("现场照片", "Photos")), pics, preview,
    h("label", { for: "f-urgency" }, T("紧急程度", "Urgency")), urgency,
    risks.length ? h("fieldset", {}, h("legend", {}, T("风险标记", "Risk flags")), risks) : null,
    submit);
    show(form);
  }

  // one Idempotency-Key per report: a lost answer is retried with the same key until the server acknowledges
  async function reportWithRetry(body, key, button) {
    for (let attempt = 0; ; attempt++) {
      try {
        return await post("/v1/issues", body, { "Idempotency-Key": key });
      } catch (err) {
        const retryable = !(err instanceof Problem) || err.status >= 500 || err.status === 429;
        if (!retryable || attempt >= 8) throw err;
        button.replaceChildren(...T(`重试中 (${attempt + 1})`, "retrying"));
        await new Promise((r) => setTimeout(r, Math.min(500 * 2 ** attempt, 8000)));
      }
    }
  }

  async function myReports() {
    const data = await get(`/v1/issues?area=${encodeURIComponent(grid())}&reporter=me&limit=100`);
    await catalog();
    const rows = data.items;  // the signed-in person's reports, newest first
    show(h("section", { class: "card" }, h("h1", {}, T("我的上报", "My reports"), " ", h("span", { class: "badge" }, rows.length)),
      h("p", { class: "muted small" }, T("您本人上报的事项", "The reports you made")),
      rows.length ? h("ul", { class: "list" }, rows.map((i) => h("li", {},
        h("button", { type: "button", class: "item", onclick: () => go("issue", i.id) },
          h("span", { class: "item-title" }, i.title),
          h("span", { class: "item-meta" }, statusBadge(i.status), " ",
            lightBadge(light(i.next_due, i.dispatched_at, i.status)), " ", categoryName(i.category), " · ", when(i.reported_at))))))
        : h("p", { class: "muted" }, T("还没有上报", "No reports yet"))));
    refreshSoon(30000);
  }

  function issueHead(i) {
    return [h("h1", {}, i.title), h("p", { id: "issue-status" }, statusBadge(i.status), " ", categoryName(i.category), " · ",
      bi(URGENCY[i.urgency] || [i.urgency, i.urgency])),
    h("dl", { class: "facts" },
      h("dt", {}, T("网格", "Grid")), h("dd", {}, i.grid),
      h("dt", {}, T("上报时间", "Reported")), h("dd", {}, when(i.reported_at)),
      i.location ? [h("dt", {}, T("位置", "Location")), h("dd", {}, `${i.location.lat}, ${i.location.lon}`)] : null,
      i.risk && i.risk.length ? [h("dt", {}, T("风险", "Risk")),
        h("dd", {}, i.risk.map((k) => ((st.risks || []).find((r) => r.key === k) || { name: k }).name).join("；"))] : null,
      i.rule && st.claims.role !== "grid_worker" ? [h("dt", {}, T("分派依据", "Routed by")), h("dd", {}, h("code", {}, i.rule))] : null,
      i.description ? [h("dt", {}, T("描述", "Description")), h("dd", {}, i.description)] : null,
      i.triage ? [h("dt", {}, T("受理", "Triage")), h("dd", {}, bi(TRIAGE[i.triage.decision] || [i.triage.decision, i.triage.decision]), i.triage.reason ? "：" + i.triage.reason : "")] : null),
    photos(i.media)];
  }
  function taskRows(tasks) {
    return h("ul", { class: "list" }, tasks.map((t) => h("li", { class: "task" },
      h("span", { class: "item-title" }, t.department_name || t.kind_name || t.department, " ", h("small", { class: "muted" },
        t.role === "lead" ? "主办 lead" : "协办 co")),
      h("span", { class: "item-meta" }, taskBadge(t.status), " ",
        taskLight(t) === "grey" ? null : [lightBadge(taskLight(t)), " ", countdown(taskDue(t))]),
      taskFlags(t),
      t.note ? h("div", { class: "note" }, T("处理说明", "Work done"), ": ", t.note) : null)));
  }

  async function workerIssue(id) {
    const i = await get(`/v1/issues/${encodeURIComponent(id)}`);
    await catalog();
    const parts = [h("button", { type: "button", class: "back", onclick: () => go("mine") }, "← ", T("我的上报", "My reports")),
      h("section", { class: "card" }, issueHead(i), h("h2", {}, T("承办", "Tasks")), taskRows(i.tasks))];
    if (i.status === "resolved") {
      const note = h("textarea", { id: "v-note", rows: "2" });
      const pass = h("button", { type: "button", class: "primary", id: "v-pass" }, T("核查通过", "Verified: fixed"));
      const fail = h("button", { type: "button", class: "danger", id: "v-fail" }, T("未通过（返工）", "Not fixed (rework)"));
      const verify = (passed, b) => act(b, () => post(`/v1/issues/${id}/verify`, { passed, note: note.value.trim() || undefined }),
        [T("已核查", "Verification recorded")], () => go("issue", id));
      pass.onclick = () => verify(true, pass); fail.onclick = () => verify(false, fail);
      parts.push(h("section", { class: "card" }, h("h2", {}, T("现场核查", "Verify on the spot")),
        h("label", { for: "v-note" }, T("核查说明", "Note")), note, h("div", { class: "row" }, pass, fail)));
    }
    if (i.status === "verified" || (i.status === "closed" && !i.satisfaction)) {
      const sel = h("select", { id: "fb-sat" }, Object.entries(SATISFACTION).map(([k, v]) => h("option", { value: k }, `${v[0]} ${v[1]}`)));
      const b = h("button", { type: "button", class: "primary", id: "fb-send" }, T("记录回访", "Record feedback"));
      b.onclick = () => act(b, () => post(`/v1/issues/${id}/feedback`, { satisfaction: sel.value }),
        [T("回访已记录", "Feedback recorded")], () => go("issue", id));
      parts.push(h("section", { class: "card" }, h("h2", {}, T("群众回访", "Resident's feedback")),
        h("label", { for: "fb-sat" }, T("满意度", "Satisfaction")), sel, b));
    }
    parts.push(await commentsBox(id, null, ["comment", "info_reply"]));
    show(...parts);
  }

  // ==== handler ==========================================================================================
  function handler() {
    chrome([["inbox", ["待办", "Inbox"]], ["done", ["已办", "Done"]]]);
    if (st.view === "task") return handlerTask(st.arg);
    return inbox(st.view === "done");
  }

  async function inbox(done) {
    const statuses = done ? "resolved,returned,closed" : "dispatched,acknowledged,suspended";
    const data = await get(`/v1/tasks?status=${statuses}&limit=200`);
    const items = (data.items || data).slice().sort((a, b) => Date.parse(taskDue(a) || 0) - Date.parse(taskDue(b) || 0));
    const filter = h("select", { id: "in-filter" }, h("option", { value: "" }, "全部 all"),
      ["red", "yellow", "green"].map((l) => h("option", { value: l }, LIGHTS[l].join(" "))));
    const list = h("ul", { class: "list" });
    const draw = () => list.replaceChildren(...items.filter((t) => !filter.value || taskLight(t) === filter.value)
      .map((t) => h("li", {}, h("button", { type: "button", class: "item", onclick: () => go("task", t) },
        h("span", { class: "item-title" }, t.title || t.issue_title || t.issue_id || t.issue),
        h("span", { class: "item-meta" }, lightBadge(taskLight(t)), " ", h("strong", {}, countdown(taskDue(t))), " ",
          taskBadge(t.status), " ", t.role === "lead" ? "主办 lead" : "协办 co")))));
    filter.onchange = draw;
    draw();
    show(h("section", { class: "card" }, h("h1", {}, done ? T("已办", "Done") : T("待办（按期限）", "Inbox (by due time)"),
      " ", h("span", { class: "badge" }, items.length)),
    h("div", { class: "row" }, h("label", { for: "in-filter" }, T("筛选", "Filter")), filter),
    items.length ? list : h("p", { class: "muted" }, T("暂无任务", "Nothing here"))));
    refreshSoon(20000);
  }

  async function handlerTask(t0) {
    const issueId = t0.issue_id || t0.issue;
    const i = await get(`/v1/issues/${encodeURIComponent(issueId)}`);
    await catalog();
    const t = i.tasks.find((x) => x.id === t0.id) || t0;
    const tid = encodeURIComponent(t.id);
    const again = () => go("task", { id: t.id, issue_id: issueId });
    const parts = [h("button", { type: "button", class: "back", onclick: () => go("inbox") }, "← ", T("待办", "Inbox")),
      h("section", { class: "card" }, issueHead(i),
        h("p", {}, lightBadge(taskLight(t)), " ", h("strong", { id: "t-countdown" }, countdown(taskDue(t))), " ",
          taskBadge(t.suspended ? "suspended" : t.status), " ", T("期限", "due"), " ", when(taskDue(t))),
        h("div", { id: "t-flags" }, taskFlags(t)),
        h("h2", {}, T("全部承办", "All tasks")), taskRows(i.tasks))];
    const actions = h("section", { class: "card" }, h("h2", {}, T("办理", "Actions")));
    if (t.status === "dispatched") {
      const b = h("button", { type: "button", class: "primary big", id: "t-ack" }, T("签收响应", "Acknowledge"));
      b.onclick = () => act(b, () => post(`/v1/tasks/${tid}/acknowledge`), [T("已签收", "Acknowledged")], () => again());
      actions.append(b);
    }
    if (t.status === "acknowledged") {
      const note = h("textarea", { id: "t-note", rows: "3", required: true });
      const pic = h("input", { id: "t-photo", type: "file", accept: "image/*", capture: "environment" });
      const b = h("button", { type: "button", class: "primary big", id: "t-resolve" }, T("办结反馈", "Resolve"));
      b.onclick = () => act(b, async () => post(`/v1/tasks/${tid}/resolve`,
        { note: note.value.trim() || undefined, media: await uploadAll(pic.files, "after") }),
        [T("已办结，待网格员核查", "Resolved; the grid worker verifies")], () => again());
      actions.append(h("label", { for: "t-note" }, T("处理说明", "What was done")), note,
        h("label", { for: "t-photo" }, T("处理后照片", "After photo")), pic, b);
    }
    if ((t.status === "dispatched" || t.status === "acknowledged") && !t.return_requested) {
      const reason = h("textarea", { id: "t-reason", rows: "2" });
      const ext = h("select", { id: "t-ext" }, ["PT4H", "P1D", "P2D", "P3D", "P7D"].map((d) => h("option", { value: d }, d)));
      const ret = h("button", { type: "button", class: "danger", id: "t-return" }, T("申请退单", "Return"));
      // with 退单审核 the task waits for the command centre (return_requested); without, it leaves at once
      ret.onclick = () => act(ret, () => post(`/v1/tasks/${tid}/return`, { reason: reason.value.trim() }),
        (out) => (out.return_requested ? [T("退单申请已提交，待指挥中心审核", "Return requested; the command centre reviews it")]
          : [T("已退单", "Returned")]), (out) => (out.return_requested ? again() : go("inbox")));
      const exb = h("button", { type: "button", id: "t-extend" }, T("申请延期", "Ask for more time"));
      exb.onclick = () => act(exb, () => post(`/v1/tasks/${tid}/extension`, { extension: ext.value, reason: reason.value.trim() }),
        [T("延期申请已提交", "Extension requested")], () => again());
      const until = h("input", { id: "t-until", type: "datetime-local", value: daysAhead(14) });
      const sus = h("button", { type: "button", id: "t-suspend" }, T("申请缓办", "Ask to suspend"));
      sus.onclick = () => act(sus, () => post(`/v1/tasks/${tid}/suspend`, { reason: reason.value.trim(), until: zoned(until.value) }),
        [T("缓办申请已提交，待指挥中心审批", "Suspension requested; the command centre decides")], () => again());
      actions.append(h("details", { id: "t-more" }, h("summary", {}, T("退单 / 延期 / 缓办", "Return / extension / suspension")),
        h("label", { for: "t-reason" }, T("理由", "Reason")), reason,
        h("label", { for: "t-ext" }, T("延期时长", "Extension")), ext,
        h("label", { for: "t-until" }, T("缓办至（复核日期）", "Suspend until (review date)")), until,
        h("div", { class: "row" }, exb, sus, ret)));
    }
    if (t.suspended) {
      const b = h("button", { type: "button", id: "t-resume" }, T("恢复办理", "Resume"));
      b.onclick = () => act(b, () => post(`/v1/tasks/${tid}/resume`), [T("已恢复，计时继续", "Resumed; the clocks run again")], () => again());
      actions.append(b);
    }
    if (actions.childElementCount > 1) parts.push(actions);
    parts.push(await commentsBox(issueId, t.id, t.role === "lead" ? ["comment", "progress", "info_request", "info_reply"]
      : ["comment", "info_request", "info_reply"]));
    show(...parts);
  }

  // ==== command centre (supervisor) ======================================================================
  function centre() {
    chrome([["centre", ["总览", "Overview"]], ["issues", ["全部事项", "All issues"]]]);
    startLive();
    if (st.view === "issue") return centreIssue(st.arg);
    if (st.view === "issues") return centreIssues();
    return centreHome();
  }
  const area = () => (st.claims.scope || "").replace(/^area:/, "") || "";

  async function centreHome() {
    const [org, all, queue, overdue, open] = await Promise.all([
      st.org ? st.org : get(`/dashboard/org?area=${encodeURIComponent(area())}`),
      get(`/v1/issues?area=${encodeURIComponent(area())}&limit=300`),
      get(`/v1/issues?area=${encodeURIComponent(area())}&status=pending_review&limit=100`),
      get(`/v1/overdue?area=${encodeURIComponent(area())}`),
      get(`/v1/issues?area=${encodeURIComponent(area())}&status=dispatched,acknowledged,in_progress,reopened&limit=40`)]);
    await catalog();
    // approvals (退单审核, 延期, 缓办): read each open issue's tasks (the API has no list of requests)
    const details = await Promise.all(open.items.map((i) => get(`/v1/issues/${i.id}`).catch(() => null)));
    const pending = [];
    for (const d of details) if (d) for (const t of d.tasks) {
      if (t.return_requested) pending.push([d, t, "return"]);
      if (t.extension_requested) pending.push([d, t, "extension"]);
      if (t.suspension_requested) pending.push([d, t, "suspend"]);
    }
    st.org = org;
    const items = overdue.items || [];
    const mapBox = h("div", { class: "map", id: "map" });
    if (window.NeedleMap) window.NeedleMap.draw(mapBox, { org, issues: all.items, label: "网格地图 grid map",
      href: (i) => `/app/?issue=${encodeURIComponent(i.id)}`, onOpen: (i) => go("issue", i.id) });
    show(
      h("section", { class: "card", hidden: mapBox.hidden }, h("h1", {}, T("网格地图", "Grid map")), mapBox,
        h("p", { class: "muted small legend" }, lightBadge("red"), " ", lightBadge("yellow"), " ", lightBadge("green"), " ",
          lightBadge("grey"), " ", T("底色越深，在办越多；点击标记查看事项", "darker grids hold more open issues; a marker opens its issue"))),
      h("section", { class: "card", id: "queue" }, h("h1", {}, T("待受理", "Triage queue"), " ", h("span", { class: "badge" }, queue.items.length)),
        queue.items.length ? h("ul", { class: "list" }, queue.items.map((i) => h("li", {},
          h("button", { type: "button", class: "item", onclick: () => go("issue", i.id) },
            h("span", { class: "item-title" }, i.title),
            h("span", { class: "item-meta" }, statusBadge(i.status), " ", categoryName(i.category), " · ", i.grid, " · ", when(i.reported_at))))))
          : h("p", { class: "muted" }, T("没有待受理的上报", "No report waits for triage"))),
      h("section", { class: "card", id: "approvals" }, h("h1", {}, T("待审批", "Approvals"), " ", h("span", { class: "badge" }, pending.length)),
        pending.length ? h("ul", { class: "list" }, pending.map(([d, t, what]) => approvalRow(d, t, what, org)))
          : h("p", { class: "muted" }, T("没有待审批的退单、延期或缓办", "No return, extension or suspension waits"))),
      h("section", { class: "card" }, h("h1", {}, T("超期事项", "Overdue"), " ", h("span", { class: "badge" }, items.length)),
        items.length ? h("ul", { class: "list" }, items.map((i) => {
          const b = h("button", { type: "button" }, T("督办催办", "Urge"));
          b.onclick = () => act(b, () => post(`/v1/issues/${i.id}/urge`, { note: "请尽快办理" }), [T("已催办", "Urged")]);
          return h("li", { class: "task" }, h("button", { type: "button", class: "item", onclick: () => go("issue", i.id) },
            h("span", { class: "item-title" }, i.title),
            h("span", { class: "item-meta" }, lightBadge("red"), " ", countdown(i.next_due), " ", statusBadge(i.status),
              " ", i.lead_department || "")), b);
        })) : h("p", { class: "muted" }, T("没有超期", "Nothing overdue"))),
      h("p", {}, h("a", { href: "/dashboard" }, T("督办看板（比率与趋势）", "Supervisor dashboard (rates and trends)"))));
  }

  // one request awaiting the command centre: approve (a return may name the department it goes to: 改派) or refuse
  const REQUESTS = { return: ["退单申请", "return"], extension: ["延期申请", "extension"], suspend: ["缓办申请", "suspension"] };
  function approvalRow(d, t, what, org) {
    const tid = encodeURIComponent(t.id);
    const key = `${t.id}-${what}`;
    const reason = h("input", { id: `ap-reason-${key}`, autocomplete: "off" });
    const detail = what === "return" ? t.return_requested
      : what === "extension" ? `+${Math.round(t.extension_requested / 3600)}h`
        : [when(t.suspension_requested), " "];
    const to = what === "return" ? departmentSelect(`ap-to-${key}`, org, t.department, ["按规则", "by the rules"]) : null;
    const ok = h("button", { type: "button", class: "primary", "data-act": "approve" }, T("批准", "Approve"));
    const no = h("button", { type: "button", class: "danger", "data-act": "reject" }, T("驳回", "Refuse"));
    const path = what === "extension" ? "extension" : what;
    ok.onclick = () => act(ok, () => post(`/v1/tasks/${tid}/${path}/approve`, what === "return"
      ? { reassign_to: to.value || undefined, reason: reason.value.trim() || undefined } : undefined),
    [T("已批准", "Approved")], () => go("centre"));
    no.onclick = () => act(no, () => post(`/v1/tasks/${tid}/${path}/reject`, { reason: reason.value.trim() }),
      [T("已驳回", "Refused")], () => go("centre"));
    return h("li", { class: "approval", "data-task": t.id, "data-request": what },
      h("button", { type: "button", class: "item", onclick: () => go("issue", d.id) }, h("span", { class: "item-title" }, d.title),
        h("span", { class: "item-meta" }, h("strong", {}, bi(REQUESTS[what])), " · ", t.department_name || t.department,
          " · ", detail, what === "suspend" && t.suspension_reason ? ["：", t.suspension_reason] : null)),
      to ? [h("label", { for: `ap-to-${key}` }, T("改派给", "Reassign to")), to] : null,
      h("label", { for: `ap-reason-${key}` }, T("审批意见", "Reason")), reason, h("div", { class: "row" }, ok, no));
  }
  function departmentSelect(idAttr, org, except, none) {
    const depts = Object.entries((org && org.departments) || {}).filter(([k]) => k !== except)
      .sort((a, b) => a[1].name.localeCompare(b[1].name, "zh"));
    return h("select", { id: idAttr }, none ? h("option", { value: "" }, none.join(" ")) : null,
      depts.map(([k, v]) => h("option", { value: k }, `${v.name} (${k})`)));
  }

  // 受理: accept, reject (不予受理), void (作废), recategorise (改类); each refusal is the server's words
  function triageBox(i, after) {
    const id = encodeURIComponent(i.id);
    const reason = h("input", { id: "tr-reason", autocomplete: "off" });
    const cat = h("select", { id: "tr-cat" }, (st.categories || []).map((c) => h("option", { value: c.code, selected: c.code === i.category }, `${c.name} (${c.code})`)));
    const btn = (label, cls, idAttr, fn, ok) => {
      const b = h("button", { type: "button", class: cls, id: idAttr }, T(...label));
      b.onclick = () => act(b, fn, [T(...ok)], after);
      return b;
    };
    return h("section", { class: "card triage" }, h("h2", {}, T("受理", "Triage")),
      h("label", { for: "tr-reason" }, T("理由", "Reason")), reason,
      h("div", { class: "row" },
        btn(["受理", "Accept"], "primary", "tr-accept", () => post(`/v1/issues/${id}/accept`, { reason: reason.value.trim() || undefined }), ["已受理，按规则派单", "Accepted; dispatched by the rules"]),
        btn(["不予受理", "Reject"], "danger", "tr-reject", () => post(`/v1/issues/${id}/reject`, { reason: reason.value.trim() }), ["已不予受理", "Rejected"]),
        btn(["作废", "Void"], "", "tr-void", () => post(`/v1/issues/${id}/void`, { reason: reason.value.trim() }), ["已作废", "Voided"])),
      h("label", { for: "tr-cat" }, T("改为类别", "Recategorise to")), cat,
      h("div", { class: "row" }, btn(["改类", "Recategorise"], "", "tr-recat",
        () => post(`/v1/issues/${id}/recategorise`, { category: cat.value, reason: reason.value.trim() }), ["已改类，重新派单", "Recategorised; routed anew"])));
  }

  async function centreIssues() {
    const sel = h("select", { id: "c-status" }, h("option", { value: "" }, "全部 all"),
      Object.entries(STATUS).map(([k, v]) => h("option", { value: k }, `${v[0]} ${v[1]}`)));
    sel.value = st.arg || "";
    sel.onchange = () => go("issues", sel.value);
    const data = await get(`/v1/issues?area=${encodeURIComponent(area())}&limit=100${sel.value ? "&status=" + sel.value : ""}`);
    await catalog();
    show(h("section", { class: "card" }, h("h1", {}, T("全部事项", "All issues")),
      h("div", { class: "row" }, h("label", { for: "c-status" }, T("状态", "Status")), sel),
      h("ul", { class: "list" }, data.items.map((i) => h("li", {}, h("button", { type: "button", class: "item", onclick: () => go("issue", i.id) },
        h("span", { class: "item-title" }, i.title),
        h("span", { class: "item-meta" }, statusBadge(i.status), " ", lightBadge(light(i.next_due, i.dispatched_at, i.status)), " ",
          categoryName(i.category), " · ", i.grid)))))));
  }

  async function centreIssue(id) {
    const i = await get(`/v1/issues/${encodeURIComponent(id)}`);
    await catalog();
    if (!st.org) st.org = await get(`/dashboard/org?area=${encodeURIComponent(area())}`);
    const open = !["closed", "cancelled", "rejected", "voided", "merged", "pending_review"].includes(i.status);
    const urge = h("button", { type: "button", id: "c-urge" }, T("催办", "Urge"));
    const note = h("input", { id: "c-urge-note", value: "请尽快办理" });
    urge.onclick = () => act(urge, () => post(`/v1/issues/${id}/urge`, { note: note.value.trim() || undefined }), [T("已催办", "Urged")]);
    const untouched = i.status === "pending_review" || (i.status === "reported" && !i.tasks.some((t) => t.status === "acknowledged"));
    show(h("button", { type: "button", class: "back", onclick: () => go("centre") }, "← ", T("总览", "Overview")),
      h("section", { class: "card" }, issueHead(i),
        i.merged_into ? h("p", {}, T("已合并到", "Merged into"), " ", h("a", { href: "#", onclick: (e) => { e.preventDefault(); go("issue", i.merged_into); } },
          h("code", {}, i.merged_into))) : null,
        h("h2", {}, T("承办", "Tasks")), taskRows(i.tasks)),
      untouched ? triageBox(i, () => go("issue", i.id)) : null,
      untouched && i.location ? await similarBox(i) : null,
      open ? h("section", { class: "card" }, h("h2", {}, T("催办", "Urge")),
        h("label", { for: "c-urge-note" }, T("催办意见", "Note")), note, urge) : null,
      open ? i.tasks.filter((t) => ["dispatched", "acknowledged"].includes(t.status)).map((t) => taskControl(i, t)) : null,
      await commentsBox(i.id, null, ["comment", "info_request"]));
  }

  // 改派 (to another department serving the owner area) and 督办 (a due date of its own, with reminders)
  function taskControl(i, t) {
    const tid = encodeURIComponent(t.id), k = t.id;
    const dept = departmentSelect(`rs-dept-${k}`, st.org, t.department, null);
    const why = h("input", { id: `rs-reason-${k}`, autocomplete: "off" });
    const rs = h("button", { type: "button", "data-act": "reassign" }, T("改派", "Reassign"));
    rs.onclick = () => act(rs, () => post(`/v1/tasks/${tid}/reassign`, { department: dept.value, reason: why.value.trim() }),
      [T("已改派", "Reassigned")], () => go("issue", i.id));
    const due = h("input", { id: `sv-due-${k}`, type: "datetime-local", value: daysAhead(3) });
    const every = h("select", { id: `sv-every-${k}` }, [["PT4H", "每4小时 every 4h"], ["P1D", "每天 daily"], ["P2D", "每2天 every 2 days"]]
      .map(([v, l]) => h("option", { value: v, selected: v === "P1D" }, l)));
    const sv = h("button", { type: "button", class: "primary", "data-act": "supervise" }, T("督办", "Supervise"));
    sv.onclick = () => act(sv, () => post(`/v1/tasks/${tid}/supervise`, { due: zoned(due.value), reason: why.value.trim(), remind_every: every.value }),
      [T("已督办", "Under supervision")], () => go("issue", i.id));
    return h("section", { class: "card task-control", "data-task": t.id },
      h("h2", {}, T("改派 / 督办", "Reassign / supervise"), " · ", t.department_name || t.department, " ",
        h("small", { class: "muted" }, t.role === "lead" ? "主办 lead" : "协办 co")),
      h("label", { for: `rs-reason-${k}` }, T("理由", "Reason")), why,
      h("label", { for: `rs-dept-${k}` }, T("改派给", "Reassign to")), dept, h("div", { class: "row" }, rs),
      h("label", { for: `sv-due-${k}` }, T("督办期限", "Supervision due")), due,
      h("label", { for: `sv-every-${k}` }, T("提醒频率", "Remind")), every, h("div", { class: "row" }, sv));
  }

  // 合并办理: the open issues of the same category near this one, on the map with it; merge this one into one
  async function similarBox(i) {
    const id = encodeURIComponent(i.id);
    const sim = await get(`/v1/issues/${id}/similar`);
    const items = sim.items || [];
    const mapBox = h("div", { class: "map", id: "similar-map" });
    if (window.NeedleMap && items.length) {
      const full = await Promise.all(items.map((x) => get(`/v1/issues/${encodeURIComponent(x.id)}`).catch(() => null)));
      const shown = [i, ...full.filter(Boolean)];
      const grids = new Set(shown.map((x) => x.grid));  // zoomed to the grids involved, not the whole area
      const pick = (o) => Object.fromEntries(Object.entries(o || {}).filter(([g]) => grids.has(g)));
      const org = { ...st.org, boundaries: pick(st.org.boundaries), locations: pick(st.org.locations) };
      window.NeedleMap.draw(mapBox, { org, issues: shown, label: "相似事项 similar issues",
        href: (x) => `/app/?issue=${encodeURIComponent(x.id)}`, onOpen: (x) => go("issue", x.id) });
    } else mapBox.hidden = true;
    const reason = h("input", { id: "mg-reason", autocomplete: "off", value: "同一事项，合并办理" });
    return h("section", { class: "card", id: "similar" }, h("h2", {}, T("相似事项（合并办理）", "Similar issues (merge)"), " ",
      h("span", { class: "badge" }, items.length)),
    items.length ? [mapBox, h("label", { for: "mg-reason" }, T("合并理由", "Reason")), reason,
      h("ul", { class: "list" }, items.map((x) => {
        const b = h("button", { type: "button", "data-act": "merge" }, T("并入此件", "Merge into this"));
        b.onclick = () => act(b, () => post(`/v1/issues/${id}/merge`, { into: x.id, reason: reason.value.trim() || undefined }),
          [T("已合并办理", "Merged")], () => go("issue", i.id));
        return h("li", { class: "task" }, h("button", { type: "button", class: "item", onclick: () => go("issue", x.id) },
          h("span", { class: "item-title" }, x.title),
          h("span", { class: "item-meta" }, statusBadge(x.status), " ", x.grid, " · ", Math.round(x.distance_m), " m · ", when(x.reported_at))), b);
      }))]
      : h("p", { class: "muted" }, T("附近没有同类在办事项", "No open issue of this category nearby"), sim.radius_m ? ` (${sim.radius_m} m)` : ""));
  }

  // live nudges (SSE): the page refetches when an issue under the area changes
  function startLive() {
    if (st.source || typeof EventSource === "undefined") return;
    const src = new EventSource(`/dashboard/stream?area=${encodeURIComponent(area())}&access_token=${encodeURIComponent(st.token)}`);
    src.addEventListener("changed", () => { if (st.view !== "issue") refreshSoon(300); });
    src.addEventListener("expired", () => signOut([T("登录已过期", "Your sign-in expired")]));
    src.onerror = () => { /* EventSource reconnects by itself */ };
    st.source = src;
  }
  function stopLive() { if (st.source) { st.source.close(); st.source = null; } }

  // ---- start -----------------------------------------------------------------------------------------------
  function start() {
    st.token = takeToken();
    if (!st.token) return signInPage(null);
    st.claims = claimsOf(st.token);
    if (!st.claims) return signOut([T("令牌无法识别", "That is not a needle token")]);
    const role = st.claims.role;
    const wanted = new URLSearchParams(location.search).get("page");
    const wantedRole = wanted && Object.keys(PAGES).find((r) => PAGES[r] === wanted);
    if (!PAGES[role] || (wantedRole && wantedRole !== role)) {
      chrome([]);
      return wrongRolePage(role, wantedRole);
    }
    const issue = new URLSearchParams(location.search).get("issue");
    if (issue && PAGES[role] !== "handler") return go("issue", issue);
    go({ worker: "report", handler: "inbox", centre: "centre" }[PAGES[role]]);
  }
  start();
})();
