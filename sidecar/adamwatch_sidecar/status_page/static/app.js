// adamwatch status page: polls this sidecar's read-only JSON API and draws it with uPlot.
//
// Every 500 ms: /api/v1/series (only points newer than our cursor) and
// /api/v1/events (only newer events); every second: /api/v1/trainers (the
// panels). Everything shown comes from the trainer or the sidecar and is written
// with textContent, never parsed as HTML.
"use strict";

(function () {
  const SERIES_MS = 500;
  const STATUS_MS = 1000;
  const CHART_HEIGHT = 190;
  const PALETTE = ["#2563eb", "#0d9488", "#9333ea", "#ea580c", "#0891b2", "#65a30d", "#db2777", "#4b5563"];
  const MARK = {
    detection: "#f59e0b", applied: "#16a34a", failed: "#dc2626", dry_run: "#a16207", restored: "#7c3aed",
  };

  const $ = (id) => document.getElementById(id);
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function num(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "—";
    if (typeof v !== "number") return String(v);
    const a = Math.abs(v);
    const rounded = Number(v.toPrecision(digits === undefined ? 4 : digits));
    return a !== 0 && (a >= 1e5 || a < 1e-3) ? rounded.toExponential() : String(rounded);
  }
  function clock(t) {
    if (!t) return "—";
    return new Date(t * 1000).toLocaleTimeString([], { hour12: false });
  }
  function ago(t, now) {
    if (!t) return "—";
    const s = Math.max(0, now - t);
    if (s < 1) return "just now";
    if (s < 90) return s.toFixed(0) + " s ago";
    if (s < 5400) return (s / 60).toFixed(0) + " min ago";
    return (s / 3600).toFixed(1) + " h ago";
  }
  function positive(v) { return v === null || v > 0 ? v : null; } // log scales
  function axisNum(v) {
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e4 || a < 1e-2)) return Number(v.toPrecision(3)).toExponential();
    return String(Number(v.toPrecision(3)));
  }
  function timeLabel(t, span) {
    const d = new Date(t * 1000);
    const hms = d.toLocaleTimeString([], { hour12: false });
    return span < 20 ? hms + "." + String(d.getMilliseconds()).padStart(3, "0").slice(0, span < 2 ? 2 : 1) : hms;
  }
  function repeat(v, n) { return new Array(n).fill(v); }

  // ------------------------------------------------------------------ state
  const S = {
    key: null,            // {job, rank}
    series: null,         // the merged series of the selected trainer (see resetSeries)
    events: [], eventEpoch: null, eventSeq: 0,
    trainers: [], jobs: {}, remediation: null, memory: null, serverTime: 0,
    charts: {},           // name -> uPlot
    zoomed: new Set(),    // charts the user zoomed into (drag; double-click resets): new data keeps their scale
    markers: [],
    lastUpdate: 0,        // Date.now() of the latest series answer with new points
    errors: 0,
  };
  window.adamwatchStatus = S; // for the browser test and the curious

  function resetSeries() {
    S.series = {
      epoch: null, lastSeq: null, firstSeq: 1, groups: [], limits: null, dsVersion: null, ds: null,
      pts: { seq: [], step: [], time: [], loss: [], grad_norm: [], duration_s: [], samples: [], tokens: [],
        skipped: [], nonfinite: [], lr: {} },
      deep: { seq: [], step: [], time: [], groups: {} },
    };
    S.events = []; S.eventEpoch = null; S.eventSeq = 0; S.markers = [];
  }
  resetSeries();

  // ------------------------------------------------------------------ fetching
  async function getJSON(path, params) {
    const query = new URLSearchParams();
    for (const [k, v] of Object.entries(params || {})) if (v !== null && v !== undefined) query.set(k, v);
    const q = query.toString();
    const response = await fetch(path + (q ? "?" + q : ""), { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) throw new Error(path + ": HTTP " + response.status);
    return response.json();
  }

  function banner(text) {
    const b = $("banner");
    b.hidden = !text;
    b.textContent = text || "";
  }

  async function pollStatus() {
    try {
      if (document.hidden) return;
      const status = await getJSON("/api/v1/trainers", S.key ? { job: S.key.job, rank: S.key.rank } : {});
      S.trainers = status.trainers; S.jobs = status.jobs || {}; S.remediation = status.remediation;
      S.memory = status.memory; S.serverTime = status.sidecar.time;
      renderPicker();
      renderPanels();
      banner("");
    } catch (err) {
      banner("The sidecar does not answer (" + err.message + "); retrying every second.");
    } finally {
      setTimeout(pollStatus, STATUS_MS);
    }
  }

  async function pollSeries() {
    try {
      if (S.key && !document.hidden) { // a background tab costs the sidecar nothing
        const key = S.key;
        const s = S.series;
        const answer = await getJSON("/api/v1/series", {
          job: key.job, rank: key.rank, since: s.lastSeq, epoch: s.epoch, downsampled: s.dsVersion,
        });
        if (S.key === key) mergeSeries(answer);
        const ev = await getJSON("/api/v1/events", {
          job: key.job, rank: key.rank, since: S.eventSeq, epoch: S.eventEpoch,
        });
        if (S.key === key) mergeEvents(ev);
        if (S.key === key) draw();
      }
    } catch (err) {
      S.errors += 1;
    } finally {
      setTimeout(pollSeries, SERIES_MS);
    }
  }

  function mergeSeries(a) {
    const s = S.series;
    const fresh = a.since === null || a.epoch !== s.epoch;
    if (fresh) {
      const keep = S.key;
      const events = [S.events, S.eventEpoch, S.eventSeq];
      resetSeries();
      S.key = keep;
      [S.events, S.eventEpoch, S.eventSeq] = events;
    }
    const t = S.series;
    t.epoch = a.epoch; t.lastSeq = a.last_seq; t.firstSeq = a.first_seq; t.groups = a.param_groups; t.limits = a.limits;
    if (a.downsampled) { t.ds = a.downsampled; t.dsVersion = a.downsampled_version; }
    const p = a.points;
    const n = p.seq.length;
    for (const name of ["seq", "step", "time", "loss", "grad_norm", "duration_s", "samples", "tokens", "skipped", "nonfinite"]) {
      t.pts[name].push(...p[name]);
    }
    for (const g of t.groups) (t.pts.lr[g] = t.pts.lr[g] || []).push(...(p.lr[g] || repeat(null, n)));
    const d = a.deep;
    t.deep.seq.push(...d.seq); t.deep.step.push(...d.step); t.deep.time.push(...d.time);
    for (const g of t.groups) {
      const src = d.groups[g];
      const dst = t.deep.groups[g] = t.deep.groups[g] || { effective_lr: {}, update_size: {}, update_to_weight: [] };
      for (const kind of ["effective_lr", "update_size"]) {
        for (const [q, vals] of Object.entries(src[kind])) (dst[kind][q] = dst[kind][q] || []).push(...vals);
      }
      dst.update_to_weight.push(...src.update_to_weight);
    }
    // Points the sidecar has folded into the downsampled tier leave the full-resolution arrays.
    const drop = t.pts.seq.findIndex((seq) => seq >= t.firstSeq);
    if (drop > 0 || (drop === -1 && t.pts.seq.length)) trimFront(t.pts, drop === -1 ? t.pts.seq.length : drop);
    const deepDrop = t.deep.seq.length - (t.limits ? t.limits.deep_rows : t.deep.seq.length);
    if (deepDrop > 0) trimFront(t.deep, deepDrop);
    if (n > 0 || fresh) S.lastUpdate = Date.now();
  }

  function trimFront(obj, n) {
    for (const [k, v] of Object.entries(obj)) {
      if (Array.isArray(v)) v.splice(0, n);
      else if (v && typeof v === "object") trimFront(v, n);
    }
  }

  function mergeEvents(a) {
    if (a.epoch !== S.eventEpoch) { S.events = []; S.eventEpoch = a.epoch; }
    S.events.push(...a.events);
    if (S.events.length > 2000) S.events.splice(0, S.events.length - 2000);
    S.eventSeq = a.last_seq;
    S.markers = [];
    for (const e of S.events) {
      if (e.kind === "detection") S.markers.push({ time: e.time, color: MARK.detection, dash: [4, 3], label: e.detector });
      else if (e.kind === "outcome") {
        const color = e.outcome === "applied" ? MARK.applied : e.outcome === "dry_run" ? MARK.dry_run : MARK.failed;
        S.markers.push({ time: e.time, color: color, dash: [], label: (e.action || "").replace("_checkpoint", "") });
      } else if (e.kind === "checkpoint" && e.checkpoint === "restored") {
        S.markers.push({ time: e.time, color: MARK.restored, dash: [2, 2], label: "restored " + (e.step === null ? "" : e.step) });
      }
    }
    renderTimeline();
  }

  // ------------------------------------------------------------------ charts
  function markersPlugin() {
    return {
      hooks: {
        draw: [(u) => {
          const ctx = u.ctx;
          const { left, top, width, height } = u.bbox;
          const ratio = window.devicePixelRatio || 1;
          let lastLabelX = -1e9;
          ctx.save();
          ctx.font = (10 * ratio) + "px system-ui, sans-serif";
          ctx.textBaseline = "top";
          for (const m of S.markers) {
            const x = Math.round(u.valToPos(m.time, "x", true));
            if (!(x >= left && x <= left + width)) continue;
            ctx.strokeStyle = m.color;
            ctx.lineWidth = 1.5 * ratio;
            ctx.setLineDash(m.dash.map((d) => d * ratio));
            ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + height); ctx.stroke();
            if (x - lastLabelX > 60 * ratio && m.label) {
              ctx.fillStyle = m.color;
              ctx.fillText(m.label, Math.min(x + 3 * ratio, left + width - 60 * ratio), top + 2 * ratio);
              lastLabelX = x;
            }
          }
          ctx.restore();
        }],
      },
    };
  }

  function axisValues(u, splits) { return splits.map((v) => (v === null ? "" : axisNum(v))); }
  function timeValues(u, splits) {
    const span = u.scales.x.max - u.scales.x.min;
    return splits.map((v) => (v === null ? "" : timeLabel(v, span)));
  }

  // Every chart spans the same time range (the update chart's points come only every N steps).
  function xRange(u, min, max) {
    const x = timeline().x;
    return x.length ? [x[0], x[x.length - 1] > x[0] ? x[x.length - 1] : x[0] + 1] : [min, max];
  }

  function baseOptions(width, extra) {
    const options = Object.assign({
      width: width, height: CHART_HEIGHT,
      scales: { x: { time: true, range: xRange } },
      axes: [
        { stroke: "#6b7280", grid: { stroke: "#eef0f3" }, ticks: { stroke: "#e5e7eb" }, values: timeValues, space: 70 },
        { stroke: "#6b7280", grid: { stroke: "#eef0f3" }, ticks: { stroke: "#e5e7eb" }, size: 58, values: axisValues },
      ],
      legend: { live: true },
      cursor: { drag: { x: true, y: false }, sync: { key: "adamwatch" } },
      plugins: [markersPlugin()],
    }, extra);
    options.scales.x = { time: true, range: xRange };
    return options;
  }

  // Off the chart the legend shows the newest point; a sparse series (deep statistics) its newest value.
  function legendValue(u, v, si, idx) {
    if (v === null && idx === u.data[0].length - 1) {
      const col = u.data[si];
      for (let i = col.length - 1; i >= 0 && i >= col.length - 200; i--) if (col[i] !== null) return num(col[i]);
    }
    return num(v);
  }

  function line(label, stroke, extra) {
    return Object.assign({ label: label, stroke: stroke, width: 1.5, spanGaps: true, points: { show: false },
      value: legendValue }, extra || {});
  }

  // The x series: its legend says which step and when (read at hover time: the arrays grow).
  function xSeries(deep) {
    return {
      label: "at",
      value: (u, v, si, idx) => {
        if (v === null || idx === null) return "—";
        const s = S.series;
        const dsLen = s.ds ? s.ds.step.length : 0;
        const step = deep ? s.deep.step[idx] : idx < dsLen ? s.ds.step[idx] : s.pts.step[idx - dsLen];
        return (step === undefined ? "" : "step " + step + " · ") + timeLabel(v, u.scales.x.max - u.scales.x.min);
      },
    };
  }

  // Each builder returns {options, data} for the current series of the selected trainer.
  const BUILDERS = {
    loss(width) {
      const { x, full } = timeline();
      const s = S.series;
      const ds = s.ds && s.ds.time.length ? s.ds : null;
      const loss = full("loss", "loss");
      // A spike can be 1000x the healthy loss: a log scale keeps both readable (when every loss is positive).
      const finite = loss.filter((v) => v !== null);
      const log = finite.length > 0 && Math.min(...finite) > 0 && Math.max(...finite) / Math.min(...finite) > 50;
      const series = [xSeries(false), line("loss", "#2563eb", { fill: log ? undefined : "rgba(37,99,235,.06)" })];
      const data = [x, log ? loss.map(positive) : loss];
      if (ds) {
        series.push(line("max per downsampled point", "#93c5fd", { dash: [3, 3], width: 1 }));
        data.push(ds.loss_max.concat(repeat(null, s.pts.seq.length)).map(log ? positive : (v) => v));
      }
      return { options: baseOptions(width, { scales: { y: log ? { distr: 3 } : {} }, series: series }), data: data,
        shape: log ? "log" : "linear" };
    },
    grad(width) {
      const { x, full } = timeline();
      const s = S.series;
      const ds = s.ds && s.ds.time.length ? s.ds : null;
      const series = [xSeries(false), line("grad norm", "#7c3aed")];
      const data = [x, full("grad_norm", "grad_norm").map(positive)];
      if (ds) {
        series.push(line("max per downsampled point", "#c4b5fd", { dash: [3, 3], width: 1 }));
        data.push(ds.grad_norm_max.concat(repeat(null, s.pts.seq.length)).map(positive));
      }
      return { options: baseOptions(width, { scales: { y: { distr: 3 } }, series: series }), data: data };
    },
    lr(width) {
      const { x, full, offset } = timeline();
      const s = S.series;
      const group = selectedGroup("group-lr");
      const series = [xSeries(false)];
      const data = [x];
      s.groups.forEach((g, i) => {
        series.push(line("lr " + g, PALETTE[i % PALETTE.length], { width: g === group ? 2 : 1.25 }));
        data.push(full(null, null, (src) => src.lr[g]).map(positive));
      });
      // Effective-LR quantiles of the chosen group sit at the steps that carried deep statistics.
      const eff = (s.deep.groups[group] || {}).effective_lr || {};
      const at = deepIndex(offset, x.length);
      for (const [q, label, color] of [["0.9", "effective p90", "#f59e0b"], ["0.5", "effective median", "#d97706"],
        ["0.1", "effective p10", "#f59e0b"]]) {
        const col = repeat(null, x.length);
        (eff[q] || []).forEach((v, i) => { if (at[i] !== null) col[at[i]] = positive(v); });
        series.push(line(label, color, { width: q === "0.5" ? 1.75 : 1, dash: q === "0.5" ? [] : [4, 3] }));
        data.push(col);
      }
      const hi = 1 + s.groups.length;
      return {
        options: baseOptions(width, {
          scales: { y: { distr: 3 } },
          series: series,
          bands: [{ series: [hi, hi + 2], fill: "rgba(245,158,11,.14)" }],
        }),
        data: data,
      };
    },
    update(width) {
      const s = S.series;
      const group = selectedGroup("group-update");
      const upd = (s.deep.groups[group] || {}).update_size || {};
      const series = [xSeries(true), line("update p99", "#0f766e", { dash: [4, 3], width: 1 }),
        line("update median", "#0d9488", { width: 1.75 }), line("update p10", "#5eead4", { dash: [4, 3], width: 1 })];
      const data = [s.deep.time.slice(), (upd["0.99"] || []).map(positive), (upd["0.5"] || []).map(positive),
        (upd["0.1"] || []).map(positive)];
      s.groups.forEach((g, i) => {
        series.push(line("update/weight " + g, PALETTE[(i + 6) % PALETTE.length], { scale: "ratio", width: 1.25 }));
        data.push(((s.deep.groups[g] || {}).update_to_weight || []).map(positive));
      });
      const options = baseOptions(width, {
        scales: { y: { distr: 3 }, ratio: { distr: 3 } },
        series: series,
        bands: [{ series: [1, 3], fill: "rgba(13,148,136,.10)" }],
      });
      options.axes.push({ scale: "ratio", side: 1, stroke: "#be185d", grid: { show: false }, size: 58, values: axisValues });
      return { options: options, data: data };
    },
    speed(width) {
      const { x, full } = timeline();
      const dur = full("duration_s", "duration_s");
      const samples = full("samples", "samples");
      const tokens = full("tokens", "tokens");
      const useTokens = !samples.some((v) => v !== null) && tokens.some((v) => v !== null);
      const per = useTokens ? tokens : samples;
      const anyPer = per.some((v) => v !== null);
      const rate = dur.map((d, i) => (d > 0 ? (anyPer ? (per[i] === null ? null : per[i] / d) : 1 / d) : null));
      const unit = anyPer ? (useTokens ? "tokens/s" : "samples/s") : "steps/s";
      const options = baseOptions(width, {
        scales: { y: {}, rate: {} },
        series: [xSeries(false), line("step time ms", "#475569"), line(unit, "#16a34a", { scale: "rate" })],
      });
      options.axes.push({ scale: "rate", side: 1, stroke: "#16a34a", grid: { show: false }, size: 58, values: axisValues });
      return { options: options, data: [x, dur.map((d) => (d === null ? null : d * 1000)), rate] };
    },
    skips(width) {
      const { x, full } = timeline();
      const s = S.series;
      const ds = s.ds;
      const cumulative = (name) => {
        const out = [];
        let total = 0;
        if (ds) for (const v of ds[name]) { total += v; out.push(total); }
        for (const v of s.pts[name]) { total += v; out.push(total); }
        return out;
      };
      const stepped = uPlot.paths.stepped({ align: 1 });
      return {
        options: baseOptions(width, {
          series: [xSeries(false), line("skipped", "#d97706", { paths: stepped, value: (u, v) => (v === null ? "—" : String(v)) }),
            line("non-finite", "#dc2626", { paths: stepped, value: (u, v) => (v === null ? "—" : String(v)) })],
          scales: { y: { range: (u, lo, hi) => [0, Math.max(1, hi)] } },
        }),
        data: [x, cumulative("skipped"), cumulative("nonfinite")],
      };
    },
  };

  // The shared x axis: downsampled buckets first, then full-resolution points.
  function timeline() {
    const s = S.series;
    const ds = s.ds;
    const dsLen = ds ? ds.time.length : 0;
    const x = ds ? ds.time.concat(s.pts.time) : s.pts.time.slice();
    const full = (ptsName, dsName, pick) => {
      const head = !ds ? [] : pick ? (pick(ds) || repeat(null, dsLen)) : ds[dsName];
      const tail = pick ? (pick(s.pts) || repeat(null, s.pts.seq.length)) : s.pts[ptsName];
      return head.concat(tail);
    };
    return { x: x, full: full, offset: dsLen };
  }

  // Index in the shared x axis of each deep row (null when its step left the full-resolution window).
  function deepIndex(offset, length) {
    const s = S.series;
    const first = s.pts.seq.length ? s.pts.seq[0] : 0;
    return s.deep.seq.map((seq) => {
      const i = offset + seq - first;
      return seq >= first && i < length ? i : null;
    });
  }

  function selectedGroup(id) {
    const select = $(id);
    const groups = S.series.groups;
    const current = select.value;
    if (select.options.length !== groups.length || groups.some((g, i) => select.options[i].value !== g)) {
      select.replaceChildren(...groups.map((g) => { const o = el("option", null, g); o.value = g; return o; }));
      select.value = groups.includes(current) ? current : groups[0] || "";
    }
    select.hidden = groups.length < 2;
    return select.value || groups[0];
  }

  function chartWidth(container) { return Math.max(280, container.clientWidth); }

  function draw() {
    const havePoints = S.series.pts.seq.length > 0 || (S.series.ds && S.series.ds.time.length > 0);
    for (const [name, build] of Object.entries(BUILDERS)) {
      const container = $("chart-" + name);
      if (!havePoints) {
        if (S.charts[name]) { S.charts[name].destroy(); delete S.charts[name]; }
        if (!container.querySelector(".empty")) container.replaceChildren(el("div", "empty", S.key ? "waiting for steps…" : "no trainer yet"));
        continue;
      }
      const built = build(chartWidth(container));
      let chart = S.charts[name];
      // uPlot cannot change its series or scales in place: rebuild when they change.
      const shape = built.options.series.length + (built.shape || "");
      if (!chart || chart.adamwatchShape !== shape) {
        if (chart) chart.destroy();
        container.replaceChildren();
        built.options.hooks = {
          setSelect: [(u) => { if (u.select.width > 0) S.zoomed.add(name); }],
        };
        chart = S.charts[name] = new uPlot(built.options, built.data, container);
        chart.adamwatchShape = shape;
        chart.over.addEventListener("dblclick", () => S.zoomed.delete(name));
      } else {
        chart.setData(built.data, !S.zoomed.has(name));
      }
      // Off the chart, the legend shows the newest values.
      if (chart.cursor.left < 0 && chart.data[0].length) chart.setLegend({ idx: chart.data[0].length - 1 });
    }
    renderFooter();
  }

  window.addEventListener("resize", () => {
    for (const [name, chart] of Object.entries(S.charts)) {
      chart.setSize({ width: chartWidth($("chart-" + name)), height: CHART_HEIGHT });
    }
  });
  for (const id of ["group-lr", "group-update"]) $(id).addEventListener("change", draw);

  // ------------------------------------------------------------------ panels
  function keyOf(t) { return t.job + "/" + t.rank; }

  function renderPicker() {
    const select = $("trainer");
    const wanted = S.key ? keyOf(S.key) : decodeURIComponent(location.hash.replace(/^#/, ""));
    const values = S.trainers.map(keyOf);
    const same = select.options.length === values.length && values.every((v, i) => select.options[i].value === v);
    if (!same) {
      select.replaceChildren(...S.trainers.map((t) => {
        const o = el("option", null, t.job + " · rank " + t.rank + (t.connected ? "" : " (disconnected)"));
        o.value = keyOf(t);
        return o;
      }));
    }
    if (!S.trainers.length) { select.replaceChildren(el("option", null, "waiting for a trainer…")); return; }
    const pick = values.includes(wanted) ? wanted : values[0];
    select.value = pick;
    if (!S.key || keyOf(S.key) !== pick) choose(S.trainers[values.indexOf(pick)]);
  }

  function choose(t) {
    for (const chart of Object.values(S.charts)) chart.destroy();
    S.charts = {};
    resetSeries();
    S.key = { job: t.job, rank: t.rank };
    history.replaceState(null, "", "#" + encodeURIComponent(keyOf(t)));
    renderTimeline();
    draw();
  }

  $("trainer").addEventListener("change", (e) => {
    const t = S.trainers.find((x) => keyOf(x) === e.target.value);
    if (t) choose(t);
  });

  function current() {
    if (!S.key) return null;
    return S.trainers.find((t) => t.job === S.key.job && t.rank === S.key.rank) || null;
  }

  function pill(text, value, cls) {
    const p = el("span", "pill" + (cls ? " " + cls : ""));
    p.append(el("span", "dot"), el("span", null, text));
    if (value !== undefined) p.append(el("b", null, value));
    return p;
  }

  function renderPanels() {
    const t = current();
    const job = t ? S.jobs[t.job] : null;
    const pills = [];
    if (t) {
      pills.push(t.connected ? pill("connected", undefined, "ok")
        : t.finished ? pill("finished", undefined, "info") : pill("disconnected", undefined, "bad"));
      pills.push(pill("step", num(t.step, 9)));
      pills.push(pill("loss", num(t.loss)));
      if (t.dropped_total) pills.push(pill("dropped", String(t.dropped_total), "warn"));
      if (job) {
        if (job.exhausted) pills.push(pill("ladder exhausted: a human must act", undefined, "bad"));
        if (job.learning_rate_scale !== 1) pills.push(pill("lr scale", num(job.learning_rate_scale), "warn"));
      }
      const r = S.remediation;
      pills.push(r ? pill("remediation", r.enabled ? (r.dry_run ? "dry run" : "on") : "off", r.enabled ? "info" : "")
        : pill("remediation", "not attached"));
    }
    $("pills").replaceChildren(...pills);
    $("updated").textContent = S.lastUpdate ? "updated " + new Date(S.lastUpdate).toLocaleTimeString([], { hour12: false }) : "";
    renderLadder(t, job);
    renderDetectors(t, job);
    renderTrainer(t);
    renderOptimizer(t);
  }

  function facts(id, rows) {
    const dl = $(id);
    const out = [];
    for (const row of rows) {
      if (row.section) { out.push(el("dt", "section", row.section)); continue; }
      out.push(el("dt", null, row[0]));
      out.push(el("dd", row[2] || null, row[1] === null || row[1] === undefined ? "—" : row[1]));
    }
    dl.replaceChildren(...out);
  }

  function renderLadder(t, job) {
    const box = $("ladder");
    if (!t) { box.replaceChildren(el("div", "muted", "no trainer selected")); return; }
    if (!S.remediation) { box.replaceChildren(el("div", "muted", "remediation is not attached to this sidecar")); return; }
    if (!job) { box.replaceChildren(el("div", "muted", "no remediation state for this job yet")); return; }
    const status = el("div", "status");
    const tag = (text, cls) => el("span", "tag " + (cls || ""), text);
    status.append(S.remediation.enabled ? tag(S.remediation.dry_run ? "dry run" : "acting", "ok") : tag("disabled", "grey"));
    if (!job.acting_here) status.append(tag("not acting: rank 0 is not connected here", "warn"));
    if (job.exhausted) status.append(tag("exhausted: a human must act", "bad"));
    if (job.cooldown) status.append(tag("cooldown after " + job.cooldown.after + ": " + job.cooldown.steps_left
      + " steps, " + num(job.cooldown.seconds_left, 2) + " s", "warn"));
    if (job.pending_command) status.append(tag("waiting for ACK of " + job.pending_command, "warn"));
    status.append(tag("lr scale " + num(job.learning_rate_scale), job.learning_rate_scale === 1 ? "grey" : "warn"));
    const list = el("ul", "rungs");
    for (const [name, ladder] of Object.entries(job.ladders || {})) {
      list.append(el("li", "ladder-name", name + (ladder.in_cooldown ? "  · cooling down" : "")));
      ladder.rungs.forEach((r, i) => {
        const spent = r.action !== "escalate" && r.uses_in_window >= r.max_per_window;
        const li = el("li", "rung" + (ladder.last_rung === i ? " last" : "") + (spent ? " spent" : ""));
        li.append(el("span", "n", i + 1), el("span", null, r.action),
          el("span", "uses", r.action === "escalate" ? "pages a human" : r.uses_in_window + "/" + r.max_per_window + " used"));
        list.append(li);
      });
    }
    box.replaceChildren(status, list);
    if (job.deferred_reason) box.append(el("div", "note", job.deferred_reason));
  }

  function renderDetectors(t, job) {
    if (!t || !job || !job.ranks || !job.ranks[String(t.rank)] || !job.ranks[String(t.rank)].detectors) {
      facts("detectors", [["state", S.remediation ? "no steps seen yet" : "remediation not attached"]]);
      return;
    }
    const d = job.ranks[String(t.rank)].detectors;
    const spike = (name, s) => {
      if (!s.enabled) return [[name, "disabled"]];
      if (!s.armed) return [[name, "warming up: " + s.samples + "/" + s.min_samples + " healthy steps"]];
      return [[name, "fires above " + num(s.threshold) + (s.streak ? " · streak " + s.streak : ""), s.streak ? "bad" : "ok"],
        ["  window", s.samples + " steps, mean " + num(s.mean) + ", σ " + num(s.std)]];
    };
    facts("detectors", [
      ...spike("loss spike", d.loss_spike),
      ...spike("grad-norm spike", d.grad_norm_spike),
      ["non-finite", d.non_finite.enabled ? (d.non_finite.streak ? "streak " + d.non_finite.streak + " of "
        + d.non_finite.consecutive_steps : "fires after " + d.non_finite.consecutive_steps + " in a row") : "disabled",
      d.non_finite.streak ? "bad" : null],
      ["stall", d.stall.enabled ? (d.stall.fired ? "stalled" : "fires after " + num(d.stall.timeout_seconds) + " s without a step")
        : "disabled", d.stall.fired ? "bad" : null],
      ...(d.spike_guard ? [["spike guard streak", d.spike_guard.enabled ? (d.spike_guard.streak ? "streak "
        + d.spike_guard.streak + " of " + d.spike_guard.consecutive_steps : "fires after "
        + d.spike_guard.consecutive_steps + " guarded steps in a row") : "disabled", d.spike_guard.streak ? "bad" : null]] : []),
    ]);
  }

  function renderTrainer(t) {
    if (!t) { facts("trainer-info", [["state", "no trainer connected yet"]]); return; }
    const h = t.history || {};
    facts("trainer-info", [
      ["job / rank", t.job + " / " + t.rank + " of " + t.world_size],
      ["connection", t.connected ? "connected" : t.finished ? "finished (GOODBYE)" : "disconnected", t.connected ? "ok" : t.finished ? null : "bad"],
      ["host / pid", t.host + " / " + t.pid],
      ["session", t.session],
      ["last step", num(t.step, 9) + " · " + ago(t.last_step_time, S.serverTime)],
      ["dropped", String(t.dropped_total || 0) + " summaries", t.dropped_total ? "warn" : null],
      ["known-good ckpt", t.known_good_step === null ? "none yet" : "step " + t.known_good_step],
      ["versions", "adamwatch " + t.adamwatch_version + " · torch " + (t.torch_version || "?")],
      ["history", (h.steps || 0) + " steps kept (limit " + (h.limit_steps || "—") + ")"
        + (h.downsampled_points ? " + " + h.downsampled_points + " downsampled points of " + h.steps_per_downsampled_point + " steps" : "")],
    ]);
  }

  function renderOptimizer(t) {
    if (!t || !t.optimizer) { facts("optimizer", [["state", "—"]]); return; }
    const o = t.optimizer;
    const rows = [
      ["kind", o.kind + (o.implementation ? " (" + o.implementation + ")" : "")],
      ["betas", Array.isArray(o.betas) ? o.betas.join(", ") : "—"],
      ["eps", num(o.eps)],
      ["weight decay", num(o.weight_decay)],
      ["amsgrad", String(!!o.amsgrad)],
      ["device", o.device || "—"],
      ["deep stats", t.deep_stats_every ? "every " + t.deep_stats_every + " steps" : "off"],
      { section: "param groups: scheduled lr now" },
    ];
    for (const [g, lr] of Object.entries(t.learning_rates || {})) rows.push([g, num(lr)]);
    facts("optimizer", rows);
  }

  // Incidents: a detection opens one; decisions follow it (same detector), outcomes their decision (command id).
  function incidents() {
    const list = [];
    const byCommand = {};
    const open = {};
    const activity = [];
    for (const e of S.events) {
      if (e.kind === "detection") {
        const inc = { detection: e, detector: e.detector, time: e.time, step: e.step, rank: e.rank, actions: [], notes: [] };
        list.push(inc); open[e.detector] = inc;
      } else if (e.kind === "decision") {
        let inc = open[e.detector];
        if (!inc) { inc = { detection: null, detector: e.detector, time: e.time, step: e.step, rank: e.rank, actions: [], notes: [] }; list.push(inc); open[e.detector] = inc; }
        const act = { decision: e, outcome: null };
        inc.actions.push(act);
        if (e.command_id) byCommand[e.command_id] = act;
      } else if (e.kind === "outcome") {
        const act = byCommand[e.command_id];
        if (act) act.outcome = e;
        else list.push({ detection: null, detector: e.source === "trainer" ? "trainer" : e.detector, time: e.time, step: e.step,
          rank: e.rank, actions: [{ decision: null, outcome: e }], notes: [] });
      } else if (e.kind === "suppressed" || e.kind === "deferred") {
        const inc = open[e.detector];
        if (inc) inc.notes.push(e); else activity.push(e);
      } else if (e.kind !== "checkpoint" || e.checkpoint === "restored" || e.checkpoint === "corrupt") {
        activity.push(e); // routine saves and known-good marks are in the trainer panel, not here
      }
    }
    return { list, activity };
  }

  function evidenceText(e) {
    const ev = e && e.evidence;
    if (!ev) return "";
    if (ev.threshold !== undefined && ev.value !== undefined) {
      return "value " + num(ev.value) + " > threshold " + num(ev.threshold) + " (mean " + num(ev.mean) + ", σ " + num(ev.std) + ")";
    }
    if (ev.sources) return ev.sources.join(" and ") + " non-finite, " + ev.streak + " steps in a row";
    if (ev.seconds_since_last_step !== undefined) return "no step for " + num(ev.seconds_since_last_step) + " s";
    if (ev.alertname) return "alert " + ev.alertname;
    return "";
  }

  function actionRow(act) {
    const d = act.decision;
    const o = act.outcome;
    const row = el("div", "action");
    const name = (d || o).action || "?";
    const args = d && d.args && d.args.factor ? " ×" + num(d.args.factor) : "";
    const outcome = o ? o.outcome : "pending";
    row.dataset.action = name;
    row.dataset.outcome = outcome;
    row.append(el("span", "arrow", "→"), el("span", "name", name + args), el("span", "outcome " + outcome, outcome.replace("_", " ")));
    const bits = [];
    if (o && o.step !== null && o.step !== undefined) bits.push("at step " + o.step);
    if (o && o.steps_to_effect !== null && o.steps_to_effect !== undefined) {
      bits.push(o.steps_to_effect + (o.steps_to_effect === 1 ? " step later" : " steps later"));
    }
    if (o && o.latency_seconds) bits.push(num(o.latency_seconds * 1000, 3) + " ms");
    if (o && o.detail) bits.push(o.detail);
    if (bits.length) row.append(el("span", "detail", bits.join(" · ")));
    return row;
  }

  function renderTimeline() {
    const box = $("timeline");
    const { list, activity } = incidents();
    const items = [];
    for (const inc of list.slice(-30).reverse()) {
      const outcomes = inc.actions.map((a) => (a.outcome ? a.outcome.outcome : "pending"));
      const repaired = outcomes.includes("applied");
      const failed = outcomes.some((o) => o === "failed" || o === "timeout" || o === "rejected");
      const li = el("li", "incident" + (repaired ? " repaired" : failed ? " failed" : ""));
      li.dataset.detector = inc.detector || "";
      const head = el("div", "head");
      head.append(el("span", "what", inc.detector || "action"),
        el("span", "muted", (inc.step === null || inc.step === undefined ? "" : "step " + inc.step) + " · rank " + inc.rank),
        el("span", "when", clock(inc.time)));
      li.append(head);
      const evidence = evidenceText(inc.detection);
      if (evidence) li.append(el("div", "evidence", evidence));
      for (const act of inc.actions) li.append(actionRow(act));
      for (const note of inc.notes.slice(-2)) li.append(el("div", "note", note.kind + ": " + (note.detail || "")));
      if (!inc.actions.length && !inc.notes.length) li.append(el("div", "note", "no action taken"));
      items.push(li);
    }
    for (const e of activity.slice(-8).reverse()) {
      const li = el("li", "activity");
      li.dataset.kind = e.kind;
      const what = e.kind === "checkpoint" ? "checkpoint " + e.checkpoint + (e.step === null ? "" : " (step " + e.step + ")")
        : e.kind + (e.detail ? ": " + e.detail : "");
      li.append(el("span", null, what), el("span", "when", clock(e.time)));
      items.push(li);
    }
    if (!items.length) items.push(el("li", "empty", "nothing yet: detections, decisions and outcomes appear here"));
    box.replaceChildren(...items);
  }

  function renderFooter() {
    const s = S.series;
    const parts = [];
    if (s.limits) {
      parts.push("history: " + s.pts.seq.length + " steps at full resolution (this trainer keeps up to " + s.limits.steps + ")");
      if (s.ds && s.ds.time.length) parts.push("older steps in " + s.ds.time.length + " downsampled points (mean, with the max of loss and gradient norm)");
    }
    if (S.memory) {
      const b = S.memory.history_bytes;
      parts.push("history memory of this sidecar " + (b < 1048576 ? (b / 1024).toFixed(0) + " KiB" : (b / 1048576).toFixed(1) + " MiB")
        + " (bound " + (S.memory.history_limits.total_bytes / 1048576).toFixed(0) + " MiB)");
    }
    parts.push("read-only; data from this sidecar only");
    $("footer").textContent = parts.join(" · ");
  }

  renderTimeline();
  draw();
  pollStatus();
  pollSeries();
})();
