// needle dashboard: labels (中文 first, English beside it), thresholds and number formats. No dependencies.
"use strict";
(function () {
  const LABELS = {
    // the rates of DOMAIN.md ("The rates every supervisor is judged by")
    response_rate: ["响应率", "Response rate"],
    resolution_rate: ["解决率", "Resolution rate"],
    satisfaction_rate: ["满意率", "Satisfaction rate"],
    on_time_close_rate: ["按期结案率", "On-time closure"],
    rework_rate: ["返工率", "Rework rate"],
    return_rate: ["退单率", "Return rate"],
    extension_rate: ["延期率", "Extension rate"],
    on_time_resolve_rate: ["按期办结率", "On-time resolution"],
    supervision_on_time_rate: ["督办按期率", "Supervised on time"],
    urged: ["催办", "urged"],
    supervised: ["督办件数", "supervised"],
    avg_dispatch: ["平均派遣用时", "Report → dispatch"],
    coverage_rate: ["入户率", "Household coverage"],
    // the counts behind them
    reported: ["上报", "reported"],
    issues_dispatched: ["已派遣事项", "issues dispatched"],
    issues_resolved: ["已解决事项", "issues resolved"],
    closed: ["结案", "closed"],
    closed_on_time: ["按期结案", "closed on time"],
    resolved_on_site: ["就地解决", "resolved on site"],
    verifications: ["核查", "verifications"],
    reopened: ["返工", "reopened"],
    escalated: ["升级", "escalated"],
    feedback: ["回访", "feedback"],
    feedback_satisfied: ["满意", "satisfied"],
    tasks_dispatched: ["派遣任务", "tasks dispatched"],
    tasks_acknowledged: ["签收", "acknowledged"],
    tasks_ack_on_time: ["按时签收", "acked on time"],
    tasks_resolved: ["办结任务", "tasks resolved"],
    tasks_resolved_on_time: ["按期办结", "resolved on time"],
    tasks_returned: ["退单", "returned"],
    tasks_extended: ["延期", "extended"],
    sla_breached: ["超时", "SLA breaches"],
    overdue: ["超期", "overdue"],
    // household visits (组团式服务)
    households: ["户数", "households"], visited: ["已走访户", "households visited"], visits: ["走访", "visits"],
    issues_raised: ["走访发现问题", "issues raised on visits"], issues_resolved_v: ["已解决", "resolved"],
    below_target: ["入户率未达标网格", "Grids below the coverage target"], target: ["目标", "target"],
    none_below: ["全部网格达标", "Every grid on target"], grid_col: ["网格", "Grid"],
    dispatched_n: ["派遣", "dispatched"],
    // levels and clocks
    city: ["市", "city"], district: ["区/县", "district"], street: ["街道/镇", "street"],
    community: ["社区/村", "community"], grid: ["网格", "grid"],
    acknowledge: ["响应时限", "acknowledge"], resolve: ["办结时限", "resolve"],
    // table heads and messages
    area: ["区域", "Area"], department: ["部门", "Department"], issue: ["事项", "Issue"],
    holder: ["责任单位", "Held by"], clock: ["时限", "Clock"], level: ["层级", "Level"],
    due: ["应完成", "Due"], overdue_by: ["已超期", "Overdue by"],
    none_overdue: ["暂无超期事项", "Nothing overdue"], no_children: ["没有下级区域", "No areas below"],
    no_depts: ["暂无部门任务", "No department has tasks"],
    category: ["类别", "Category"], kind: ["部门类别", "Kind"], role: ["角色", "Role"],
    role_lead: ["主办（转兜底）", "lead (to the command centre)"], role_co: ["协办（未派）", "co (not dispatched)"],
    unserved_areas: ["无承接部门的区域", "Areas nothing serves"],
    live: ["实时", "live"], connecting: ["连接中", "connecting"], offline: ["已断开，重连中", "reconnecting"],
    updated: ["更新于", "updated"], seq: ["事件序号", "stream seq"],
    period: ["统计区间", "period"], days: ["天", "days"],
    token_bad: ["令牌无效或已过期，请重新输入", "Token invalid or expired; enter a new one"],
    scope_bad: ["该区域不在您的督办范围内", "This area is outside your scope"],
    load_failed: ["数据加载失败，稍后自动重试", "Loading failed; retrying shortly"],
  };

  // rates where higher is better, with [green from, amber from]; the others are better low: [green to, amber to]
  const TARGETS = {
    response_rate: { up: true, good: 0.9, warn: 0.75 },
    resolution_rate: { up: true, good: 0.9, warn: 0.75 },
    satisfaction_rate: { up: true, good: 0.9, warn: 0.8 },
    on_time_close_rate: { up: true, good: 0.9, warn: 0.75 },
    on_time_resolve_rate: { up: true, good: 0.9, warn: 0.75 },
    rework_rate: { up: false, good: 0.05, warn: 0.15 },
    return_rate: { up: false, good: 0.05, warn: 0.15 },
    extension_rate: { up: false, good: 0.1, warn: 0.2 },
    supervision_on_time_rate: { up: true, good: 0.9, warn: 0.75 },
    avg_dispatch: { up: false, good: 600, warn: 3600 },  // seconds
    coverage_rate: { up: true, good: 0.9, warn: 0.75 },  // good: the rulebook's coverage target (setCoverageTarget)
  };

  function setCoverageTarget(target) {
    if (typeof target === "number") TARGETS.coverage_rate = { up: true, good: target, warn: Math.max(0, target - 0.15) };
  }

  let lang = "zh";

  function label(key) {
    const pair = LABELS[key] || [key, key];
    return lang === "zh" ? pair[0] : pair[1];
  }

  // a bilingual label node: <span class="zh">中文</span><span class="en">English</span>; CSS shows per mode
  function bi(key) {
    const pair = LABELS[key] || [key, key];
    const frag = document.createDocumentFragment();
    for (const [cls, text] of [["zh", pair[0]], ["en", pair[1]]]) {
      const s = document.createElement("span");
      s.className = cls;
      s.textContent = text;
      frag.appendChild(s);
    }
    return frag;
  }

  function grade(key, value) {
    const t = TARGETS[key];
    if (!t || value === null || value === undefined) return "none";
    if (t.up) return value >= t.good ? "good" : value >= t.warn ? "warn" : "bad";
    return value <= t.good ? "good" : value <= t.warn ? "warn" : "bad";
  }

  function pct(v) {
    if (v === null || v === undefined) return "—";
    const p = v * 100;
    return (Number.isInteger(p) ? p.toFixed(0) : p.toFixed(1)) + "%";
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    if (seconds > 0 && seconds < 1) return lang === "zh" ? "不足1秒" : "< 1s";
    let s = Math.max(0, Math.floor(seconds));
    const d = Math.floor(s / 86400); s -= d * 86400;
    const h = Math.floor(s / 3600); s -= h * 3600;
    const m = Math.floor(s / 60); s -= m * 60;
    const zh = lang === "zh";
    const parts = [];
    if (d) parts.push(d + (zh ? "天" : "d"));
    if (h) parts.push(h + (zh ? "小时" : "h"));
    if (m && !d) parts.push(m + (zh ? "分" : "m"));
    if (!d && !h) parts.push(s + (zh ? "秒" : "s"));
    return parts.join(zh ? "" : " ");
  }

  function dateTime(iso, tz) {
    if (!iso) return "—";
    const opts = { month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", hour12: false };
    try {
      return new Date(iso).toLocaleString(lang === "zh" ? "zh-CN" : "en-GB", { ...opts, timeZone: tz });
    } catch (_) {
      return new Date(iso).toLocaleString(undefined, opts);
    }
  }

  window.NeedleI18n = {
    LABELS, TARGETS, label, bi, grade, pct, duration, dateTime, setCoverageTarget,
    get lang() { return lang; },
    set lang(v) { lang = v === "en" ? "en" : "zh"; },
  };
})();
