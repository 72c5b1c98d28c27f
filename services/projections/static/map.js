// needle grid map: the org's boundaries (GeoJSON from /dashboard/org) drawn as SVG, no tile server.
// Issues are markers coloured by their light (red overdue, amber due soon, green on time, grey done), ringed
// by status; each grid is shaded by its open issues and labelled with the count. A marker is a link: click
// (or Enter) opens the issue. Shared by the supervisor dashboard and the command centre (/app/).
"use strict";
(function () {
  const NS = "http://www.w3.org/2000/svg";
  const W = 600, H = 420, PAD = 12;
  const COLOURS = { red: "#b3261e", yellow: "#b26a00", green: "#1b7a35", grey: "#6b7785" };

  function el(tag, attrs, ...kids) {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) e.setAttribute(k, String(v));
    for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
    return e;
  }
  function rings(geom) {
    if (!geom) return [];
    if (geom.type === "Polygon") return [geom.coordinates[0]];
    if (geom.type === "MultiPolygon") return geom.coordinates.map((p) => p[0]);
    return [];
  }
  function light(i) {
    if (["closed", "rejected", "voided", "cancelled"].includes(i.status) || !i.next_due) return "grey";
    const left = Date.parse(i.next_due) - Date.now();
    if (left < 0) return "red";
    const span = i.dispatched_at ? Date.parse(i.next_due) - Date.parse(i.dispatched_at) : 0;
    return span > 0 && left < span / 4 ? "yellow" : "green";
  }

  // draw(container, {org, issues, onOpen, label}): org has boundaries, locations, areas (names and levels)
  function draw(container, opts) {
    const org = opts.org || {};
    const bounds = org.boundaries || {}, locs = org.locations || {}, areas = org.areas || {};
    const grids = Object.keys(bounds).filter((id) => !areas[id] || areas[id].level === "grid");
    const pts = [];
    for (const id of grids) for (const r of rings(bounds[id])) for (const c of r) pts.push(c);
    const issues = opts.issues || [];
    for (const i of issues) if (i.location) pts.push([i.location.lon, i.location.lat]);
    if (!pts.length) { container.replaceChildren(); container.hidden = true; return; }
    container.hidden = false;
    let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
    for (const [x, y] of pts) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
    const k = Math.cos(((y0 + y1) / 2) * Math.PI / 180);  // equirectangular: a degree of longitude is shorter
    const sx = (W - 2 * PAD) / Math.max((x1 - x0) * k, 1e-9), sy = (H - 2 * PAD) / Math.max(y1 - y0, 1e-9);
    const s = Math.min(sx, sy);
    const ox = (W - (x1 - x0) * k * s) / 2, oy = (H - (y1 - y0) * s) / 2;
    const P = (lon, lat) => [ox + (lon - x0) * k * s, H - oy - (lat - y0) * s];

    const open = {};
    for (const i of issues) if (!["closed", "rejected", "voided"].includes(i.status)) open[i.grid] = (open[i.grid] || 0) + 1;
    const most = Math.max(1, ...Object.values(open));
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: "needle-map",
      "aria-label": opts.label || "网格地图 grid map" });
    const centre = {};
    for (const id of grids) {
      const n = open[id] || 0;
      const g = el("g", { class: "grid-area", "data-grid": id });
      let cx = 0, cy = 0, m = 0;
      for (const r of rings(bounds[id])) {
        const xy = r.map(([lon, lat]) => P(lon, lat));
        for (const [x, y] of xy.slice(0, -1)) { cx += x; cy += y; m++; }
        g.append(el("polygon", { points: xy.map((p) => p.map((v) => v.toFixed(1)).join(",")).join(" "),
          fill: n ? `rgba(179,38,30,${(0.12 + 0.5 * n / most).toFixed(2)})` : "rgba(19,96,154,0.08)",
          stroke: "#13609a", "stroke-width": 1 }));
      }
      g.append(el("title", {}, `${(areas[id] || {}).name || id}: ${n} 件在办 open`));
      centre[id] = m ? [cx / m, cy / m] : null;
      if (centre[id]) g.append(el("text", { x: centre[id][0], y: centre[id][1] + 20, "text-anchor": "middle",
        class: "grid-name" }, ((areas[id] || {}).name || id).replace(/网格$/, "")));
      if (centre[id] && n) g.append(el("text", { x: centre[id][0], y: centre[id][1] - 10, "text-anchor": "middle",
        class: "grid-count" }, String(n)));
      svg.append(g);
    }
    // markers: the issue's own location, else its grid's point or centre, spread so none hides another
    const seen = {};
    for (const i of issues) {
      let xy = i.location ? P(i.location.lon, i.location.lat)
        : locs[i.grid] && !centre[i.grid] ? P(locs[i.grid].lon, locs[i.grid].lat) : centre[i.grid];
      if (!xy) continue;
      const n = seen[i.grid] = (seen[i.grid] || 0) + 1;
      if (!i.location && n > 1) { const a = n * 2.4, r = 5 * Math.sqrt(n); xy = [xy[0] + r * Math.cos(a), xy[1] + r * Math.sin(a)]; }
      const l = light(i);
      const a = el("a", { href: opts.href ? opts.href(i) : "#", class: `marker light-${l}`, "data-issue": i.id,
        "aria-label": `${i.title} (${i.status})` });
      a.append(el("circle", { cx: xy[0].toFixed(1), cy: xy[1].toFixed(1), r: 7, fill: COLOURS[l],
        stroke: i.status === "pending_review" ? "#111" : "#fff", "stroke-width": i.status === "pending_review" ? 2.5 : 1.5 }),
      el("title", {}, `${i.title} · ${i.status}`));
      if (opts.onOpen) a.addEventListener("click", (e) => { e.preventDefault(); opts.onOpen(i); });
      svg.append(a);
    }
    // a pin (the place picked for a report) and, with onPick, a tap anywhere picks a place: the grid is the one
    // whose boundary holds the point (ray casting on the lon/lat rings)
    if (opts.pin) {
      const [px, py] = P(opts.pin.lon, opts.pin.lat);
      svg.append(el("g", { class: "pin" }, el("circle", { cx: px.toFixed(1), cy: py.toFixed(1), r: 9, fill: "#13609a",
        stroke: "#fff", "stroke-width": 3 }), el("title", {}, `${opts.pin.lat}, ${opts.pin.lon}`)));
    }
    if (opts.onPick) {
      svg.classList.add("pickable");
      svg.addEventListener("click", (e) => {
        const m = svg.getScreenCTM();
        if (!m) return;
        const q = new DOMPoint(e.clientX, e.clientY).matrixTransform(m.inverse());
        const lon = x0 + (q.x - ox) / (k * s), lat = y0 + (H - oy - q.y) / s;
        const grid = grids.find((id) => rings(bounds[id]).some((r) => inside(lon, lat, r))) || null;
        opts.onPick({ lat: +lat.toFixed(6), lon: +lon.toFixed(6) }, grid);
      });
    }
    container.replaceChildren(svg);
  }
  function inside(x, y, ring) {
    let hit = false;
    for (let i = 0, j = ring.length - 1; i < ring.length; j = i++) {
      const [xi, yi] = ring[i], [xj, yj] = ring[j];
      if ((yi > y) !== (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi) hit = !hit;
    }
    return hit;
  }
  window.NeedleMap = { draw, light, inside };
})();
