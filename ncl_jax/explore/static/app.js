// The explorer page: three views over the JSON API of ncl_jax.explore.server.
// Everything the server returns is put on the page as text (textContent), never as HTML.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

async function api(path, params) {
  const query = new URLSearchParams(params || {}).toString();
  const response = await fetch(query ? `${path}?${query}` : path);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function setStatus(node, text, isError) {
  node.textContent = text;
  node.classList.toggle("error", Boolean(isError));
}

function videos(count) {
  return `${count} video${count === 1 ? "" : "s"}`;
}

function formatRank(rank) {
  return Number.isInteger(rank) ? String(rank) : rank.toFixed(1);
}

// Search results ------------------------------------------------------------------------------

// The rank change of an item between the plain and NCL columns, as a marked label.
function changeLabel(item, mode) {
  const delta = item.plain_rank - item.ncl_rank;  // > 0: NCL ranks the video higher
  const cls = delta > 0 ? "up" : delta < 0 ? "down" : "same";
  let text;
  if (mode === "ncl") {
    text = delta === 0 ? "= plain" :
      `${delta > 0 ? "▲" : "▼"}${Math.abs(delta)} (plain #${item.plain_rank})`;
  } else {
    text = delta === 0 ? "= NCL" :
      `NCL #${item.ncl_rank} ${delta > 0 ? "▲" : "▼"}${Math.abs(delta)}`;
  }
  return el("span", {class: `change ${cls}`, text, title: "rank change between the columns"});
}

function resultItem(item, mode) {
  const li = el("li", {class: "result", "data-index": String(item.index)});
  if (item.ground_truth) li.classList.add("gt");
  li.append(el("span", {class: "rank", text: `#${item.rank}`}));
  if (item.thumbnail) {
    li.append(el("img", {src: item.thumbnail, alt: `first frame of ${item.id}`, loading: "lazy"}));
  } else {
    li.append(el("span", {class: "thumb-none"}));
  }
  const body = el("div", {}, el("span", {class: "id", text: item.id}));
  if (item.ground_truth) body.append(el("span", {class: "gt-label", text: "ground truth"}));
  const more = item.num_captions > item.captions.length ?
    ` (+${item.num_captions - item.captions.length} more)` : "";
  body.append(el("div", {class: "captions", text: item.captions.join(" · ") + more}));
  li.append(body);
  li.append(el("div", {class: "side"},
    el("div", {class: "score", text: item.score.toFixed(mode === "plain" ? 4 : 3),
               title: mode === "plain" ? "cosine similarity" : "cos / temperature + bias"}),
    changeLabel(item, mode)));
  return li;
}

// Hovering a video marks it in both columns.
function linkColumns(lists) {
  for (const list of lists) {
    list.addEventListener("mouseover", (event) => {
      const item = event.target.closest(".result");
      for (const other of lists) {
        for (const node of other.querySelectorAll(".result")) {
          node.classList.toggle("linked", item !== null && node.dataset.index === item.dataset.index);
        }
      }
    });
  }
}

function renderColumns(result, plainList, nclList) {
  plainList.replaceChildren(...result.plain.map((item) => resultItem(item, "plain")));
  nclList.replaceChildren(...result.ncl.map((item) => resultItem(item, "ncl")));
}

const searchView = {
  form: document.getElementById("search-form"),
  input: document.getElementById("query"),
  k: document.getElementById("search-k"),
  status: document.getElementById("search-status"),
  plain: document.getElementById("plain-results"),
  ncl: document.getElementById("ncl-results"),
};

async function runSearch() {
  const text = searchView.input.value.trim();
  if (!text) {
    setStatus(searchView.status, "type a caption first", true);
    return;
  }
  setStatus(searchView.status, "searching…");
  try {
    const result = await api("/api/search", {q: text, k: searchView.k.value});
    renderColumns(result, searchView.plain, searchView.ncl);
    rememberSearch(text, searchView.k.value);
    setStatus(searchView.status,
      `top ${result.k} of ${state.info.num_videos} videos for “${result.query}” ` +
      `(${result.elapsed_ms.toFixed(1)} ms on the server)`);
  } catch (error) {
    setStatus(searchView.status, error.message, true);
  }
}

searchView.form.addEventListener("submit", (event) => {
  event.preventDefault();
  runSearch();
});
linkColumns([searchView.plain, searchView.ncl]);

// Test queries --------------------------------------------------------------------------------

const queriesView = {
  loaded: false,
  form: document.getElementById("queries-form"),
  filter: document.getElementById("queries-filter"),
  order: document.getElementById("queries-order"),
  status: document.getElementById("queries-status"),
  table: document.querySelector("#queries-table tbody"),
  metrics: document.getElementById("rank-metrics"),
  chart: document.getElementById("rank-chart"),
  detail: document.getElementById("query-detail"),
  detailTitle: document.getElementById("query-detail-title"),
  detailRanks: document.getElementById("query-detail-ranks"),
  plain: document.getElementById("detail-plain-results"),
  ncl: document.getElementById("detail-ncl-results"),
};

function renderMetrics(table, metrics) {
  const names = ["R@1", "R@5", "R@10", "MdR", "MnR"];
  const head = el("tr", {}, el("th", {text: ""}), ...names.map((n) => el("th", {text: n})));
  const rows = ["plain", "ncl"].map((mode) => el("tr", {},
    el("th", {}, el("span", {class: `swatch ${mode}`}), mode === "plain" ? "plain" : "NCL"),
    ...names.map((n) => el("td", {text: metrics[mode][n].toFixed(n.startsWith("R@") ? 1 : 2)}))));
  table.replaceChildren(head, ...rows);
}

// Grouped bars: for each rank group, the number of captions plain and NCL.
function drawRankChart(svg, distribution) {
  const width = Number(svg.getAttribute("width"));
  const height = Number(svg.getAttribute("height"));
  const left = 44, right = 12, top = 26, bottom = 34;
  const plotW = width - left - right, plotH = height - top - bottom;
  const groups = distribution.groups;
  const peak = Math.max(1, ...distribution.plain, ...distribution.ncl);
  const groupW = plotW / groups.length, barW = groupW * 0.36;
  const nodes = [svgEl("text", {x: left, y: 16, class: "title"}, "captions per ground-truth rank")];
  nodes.push(svgEl("line", {x1: left, y1: top + plotH, x2: left + plotW, y2: top + plotH, class: "axis"}));
  nodes.push(svgEl("line", {x1: left, y1: top, x2: left, y2: top + plotH, class: "axis"}));
  for (const value of [0, Math.round(peak / 2), peak]) {
    const y = top + plotH - (value / peak) * plotH;
    nodes.push(svgEl("text", {x: left - 6, y: y + 4, "text-anchor": "end"}, String(value)));
  }
  groups.forEach((label, g) => {
    const x0 = left + g * groupW + groupW * 0.14;
    ["plain", "ncl"].forEach((mode, m) => {
      const count = distribution[mode][g];
      const h = (count / peak) * plotH;
      const bar = svgEl("rect", {x: x0 + m * barW, y: top + plotH - h, width: barW - 2, height: h,
                                 class: `bar-${mode}`});
      bar.append(svgEl("title", {}, `${mode === "plain" ? "plain" : "NCL"}, rank ${label}: ${count}`));
      nodes.push(bar);
    });
    nodes.push(svgEl("text", {x: left + (g + 0.5) * groupW, y: top + plotH + 14,
                              "text-anchor": "middle"}, label));
  });
  nodes.push(svgEl("text", {x: left + plotW / 2, y: height - 4, "text-anchor": "middle"},
                   "rank of the ground-truth video"));
  svg.replaceChildren(...nodes);
}

function queryRow(query) {
  const change = query.plain_rank - query.ncl_rank;
  const row = el("tr", {"data-index": String(query.index)},
    el("td", {class: "num", text: String(query.index)}),
    el("td", {text: query.text}),
    el("td", {text: query.video}),
    el("td", {class: "num", text: formatRank(query.plain_rank)}),
    el("td", {class: "num", text: formatRank(query.ncl_rank)}),
    el("td", {class: "num"}, el("span", {
      class: `change ${change > 0 ? "up" : change < 0 ? "down" : "same"}`,
      text: change === 0 ? "=" : `${change > 0 ? "▲" : "▼"}${formatRank(Math.abs(change))}`})));
  row.tabIndex = 0;  // reachable with the keyboard: Tab to a row, Enter opens it
  row.addEventListener("click", () => showQuery(query.index, row));
  row.addEventListener("keydown", (event) => {
    if (event.key === "Enter") showQuery(query.index, row);
  });
  return row;
}

async function loadQueries() {
  setStatus(queriesView.status, "loading…");
  try {
    const result = await api("/api/queries", {
      contains: queriesView.filter.value.trim(), order: queriesView.order.value, limit: 200});
    renderMetrics(queriesView.metrics, result.metrics);
    drawRankChart(queriesView.chart, result.rank_distribution);
    queriesView.table.replaceChildren(...result.queries.map(queryRow));
    setStatus(queriesView.status,
      `${result.matched} of ${result.total} captions of the ${result.split} split match` +
      (result.matched > result.queries.length ? `; the first ${result.queries.length} are listed` : "") +
      `. Click one to see its results (rank ties: ${result.tie}).`);
    queriesView.loaded = true;
  } catch (error) {
    setStatus(queriesView.status, error.message, true);
  }
}

async function showQuery(index, row) {
  for (const other of queriesView.table.querySelectorAll("tr.selected")) other.classList.remove("selected");
  if (row) row.classList.add("selected");
  try {
    const result = await api("/api/search", {caption: index, k: 10});
    const gt = result.ground_truth;
    queriesView.detail.hidden = false;
    queriesView.detailTitle.textContent = `Caption ${index}: “${result.query}”`;
    queriesView.detailRanks.textContent =
      `Its video ${gt.id} ranks #${formatRank(gt.plain_rank)} plain and ` +
      `#${formatRank(gt.ncl_rank)} with NCL.`;
    renderColumns(result, queriesView.plain, queriesView.ncl);
    queriesView.detail.scrollIntoView({block: "nearest"});
  } catch (error) {
    setStatus(queriesView.status, error.message, true);
  }
}

let filterTimer = null;
queriesView.filter.addEventListener("input", () => {
  clearTimeout(filterTimer);
  filterTimer = setTimeout(loadQueries, 250);
});
queriesView.order.addEventListener("change", loadQueries);
queriesView.form.addEventListener("submit", (event) => {
  event.preventDefault();
  loadQueries();
});
linkColumns([queriesView.plain, queriesView.ncl]);

// Hubs ----------------------------------------------------------------------------------------

const hubsView = {
  loaded: false,
  over: document.getElementById("hubs-over"),
  order: document.getElementById("hubs-order"),
  summary: document.getElementById("hubs-summary"),
  chart: document.getElementById("hub-histogram"),
  plain: document.getElementById("hubs-plain"),
  ncl: document.getElementById("hubs-ncl"),
};

function niceStep(span, target) {
  const raw = span / target;
  const power = 10 ** Math.floor(Math.log10(raw));
  for (const factor of [1, 2, 5, 10]) if (raw <= factor * power) return factor * power;
  return 10 * power;
}

// One histogram panel: bars over shared bin edges, the expected share (1) dashed.
function histogramPanel(x, y, w, h, edges, counts, mode, title) {
  const nodes = [];
  const low = edges[0], high = edges[edges.length - 1];
  const peak = Math.max(1, ...counts);
  const sx = (v) => x + ((v - low) / (high - low)) * w;
  const sy = (c) => y + h - (c / peak) * h;
  nodes.push(svgEl("text", {x, y: y - 8, class: "title"}, title));
  counts.forEach((count, i) => {
    if (!count) return;
    const bar = svgEl("rect", {x: sx(edges[i]), y: sy(count),
                               width: Math.max(1, sx(edges[i + 1]) - sx(edges[i]) - 1),
                               height: y + h - sy(count), class: `bar-${mode}`});
    const range = `${edges[i].toFixed(2)}–${edges[i + 1].toFixed(2)}`;
    bar.append(svgEl("title", {}, `${count} videos with ${range} × their share`));
    nodes.push(bar);
  });
  nodes.push(svgEl("line", {x1: x, y1: y + h, x2: x + w, y2: y + h, class: "axis"}));
  nodes.push(svgEl("line", {x1: x, y1: y, x2: x, y2: y + h, class: "axis"}));
  const step = niceStep(high - low, 6);
  for (let v = low; v <= high + 1e-9; v += step) {
    nodes.push(svgEl("line", {x1: sx(v), y1: y + h, x2: sx(v), y2: y + h + 4, class: "axis"}));
    nodes.push(svgEl("text", {x: sx(v), y: y + h + 16, "text-anchor": "middle"}, String(+v.toFixed(2))));
  }
  for (const value of [0, Math.round(peak / 2), peak]) {
    nodes.push(svgEl("text", {x: x - 6, y: sy(value) + 4, "text-anchor": "end"}, String(value)));
  }
  nodes.push(svgEl("line", {x1: sx(1), y1: y, x2: sx(1), y2: y + h, class: "share"}));
  nodes.push(svgEl("text", {x: sx(1) + 4, y: y + 10}, "share"));
  nodes.push(svgEl("text", {x: x + w / 2, y: y + h + 32, "text-anchor": "middle"},
                   "summed retrieval probability ÷ expected share"));
  return nodes;
}

function drawHistogram(svg, histogram, over) {
  const width = Number(svg.getAttribute("width"));
  const height = Number(svg.getAttribute("height"));
  const gap = 60, left = 48, top = 28, bottom = 44;
  const panelW = (width - left - gap - 16) / 2, panelH = height - top - bottom;
  const queries = over === "bank" ? "bank" : "caption";
  svg.replaceChildren(
    ...histogramPanel(left, top, panelW, panelH, histogram.edges, histogram.plain, "plain",
                      `plain: videos per summed ${queries} probability`),
    ...histogramPanel(left + panelW + gap, top, panelW, panelH, histogram.edges, histogram.ncl,
                      "ncl", `NCL-normalized: videos per summed ${queries} probability`),
    svgEl("text", {x: 12, y: top + panelH / 2, transform: `rotate(-90 12 ${top + panelH / 2})`,
                   "text-anchor": "middle"}, "videos"));
}

function hubTable(table, items) {
  const head = el("tr", {}, ...["video", "captions", "plain ×share", "NCL ×share"].map(
    (name) => el("th", {text: name})));
  const rows = items.map((item) => el("tr", {},
    el("td", {text: item.id}),
    el("td", {text: item.captions.join(" · ")}),
    el("td", {class: "num", text: item.plain.toFixed(3)}),
    el("td", {class: "num", text: item.ncl.toFixed(3)})));
  table.replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
}

async function loadHubs() {
  setStatus(hubsView.summary, "loading…");
  try {
    const result = await api("/api/hubs", {k: 20, over: hubsView.over.value, order: hubsView.order.value});
    drawHistogram(hubsView.chart, result.histogram, result.over);
    hubTable(hubsView.plain, result.plain);
    hubTable(hubsView.ncl, result.ncl);
    const what = result.over === "bank" ? `the ${result.num_queries} training queries of the bank` :
      `the ${result.num_queries} captions of the split`;
    setStatus(hubsView.summary,
      `Summed over ${what}: ${videos(result.hubs.plain)} get more than twice their share with ` +
      `plain scores, ${result.hubs.ncl} after NCL; ${result.orphans.plain} get less than half, ` +
      `${result.orphans.ncl} after NCL. Relative normalization error (mean |mass ÷ share − 1|): ` +
      `${result.error.plain.relative_mae.toPrecision(3)} plain, ` +
      `${result.error.ncl.relative_mae.toPrecision(3)} NCL.` +
      (result.over === "bank" ? " NCL's biases are fitted on this bank (Sinkhorn), so after NCL " +
        "every video gets its share by construction; the split's captions show how that carries " +
        "over to new queries." : ""));
    hubsView.loaded = true;
  } catch (error) {
    setStatus(hubsView.summary, error.message, true);
  }
}

hubsView.over.addEventListener("change", loadHubs);
hubsView.order.addEventListener("change", loadHubs);

// Views and start ------------------------------------------------------------------------------

const state = {info: null};

// The page's state lives in its URL, so a search or a view can be linked and reloaded:
// ?q=<query>&k=<top k> is the last search, #queries or #hubs the open view (none: search).
const VIEWS = ["search", "queries", "hubs"];

function rememberSearch(text, k) {
  const url = new URL(window.location.href);
  url.searchParams.set("q", text);
  if (k === "10") url.searchParams.delete("k"); else url.searchParams.set("k", k);
  history.replaceState(null, "", url);
}

function viewFromUrl() {
  const name = window.location.hash.slice(1);
  return VIEWS.includes(name) ? name : "search";
}

function rememberView(name) {
  const url = new URL(window.location.href);
  url.hash = name === "search" ? "" : name;
  if (url.href !== window.location.href) history.replaceState(null, "", url);
}

function showView(name) {
  rememberView(name);
  for (const tab of document.querySelectorAll(".tab")) {
    tab.classList.toggle("active", tab.dataset.view === name);
  }
  for (const view of document.querySelectorAll(".view")) {
    view.hidden = view.id !== `view-${name}`;
  }
  if (name === "queries" && !queriesView.loaded) loadQueries();
  if (name === "hubs" && !hubsView.loaded) loadHubs();
}

for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => showView(tab.dataset.view));
}
window.addEventListener("hashchange", () => showView(viewFromUrl()));

function describeSource(info) {
  const where = info.source.workdir ? `run ${info.source.workdir}` : `bundle ${info.source.bundle}`;
  const known = info.source.step !== null && info.source.step !== undefined;
  const step = known ? `, step ${info.source.step}` : "";
  return `${where}${step} · ${info.dataset} ${info.split}: ${info.num_videos} videos, ` +
    `${info.num_texts} captions · bank of ${info.bank_size} training queries · ` +
    `temperature ${info.temperature.toFixed(4)}`;
}

async function start() {
  try {
    state.info = await api("/api/info");
  } catch (error) {
    setStatus(document.getElementById("source"), error.message, true);
    return;
  }
  document.getElementById("source").textContent = describeSource(state.info);
  document.getElementById("about-bank").textContent =
    `${state.info.bank_size} training queries of this model`;
  searchView.input.maxLength = state.info.max_query_chars;
  const examples = document.getElementById("examples");
  const [first] = state.info.example_queries;
  if (first) searchView.input.placeholder = `type a caption, e.g. ${first}`;
  examples.replaceChildren("Try a test caption NCL helps most:",
    ...state.info.example_queries.map((text) => {
      const button = el("button", {type: "button", text});
      button.addEventListener("click", () => {
        searchView.input.value = text;
        runSearch();
      });
      return button;
    }));
  restoreFromUrl();
}

function restoreFromUrl() {
  const params = new URLSearchParams(window.location.search);
  const k = params.get("k");
  if (k && [...searchView.k.options].some((option) => option.value === k)) searchView.k.value = k;
  const text = params.get("q");
  if (text) {
    searchView.input.value = text.slice(0, state.info.max_query_chars);
    runSearch();
  }
  showView(viewFromUrl());
}

start();
