// The metalake web console: a grid, a map and an item page over the HTTP API (docs/api.md).
//
// Everything that comes from the datalake (filenames, metadata values, tags, error messages)
// is untrusted: it reaches the page only through textContent, input values and setAttribute on
// inert attributes, never through innerHTML. The server's Content-Security-Policy forbids
// inline scripts besides.

import { WORLD } from "./world.js";

const FIELDS = [
  "latitude", "longitude", "altitude", "acquired_at", "acquired_by", "weather",
  "resolution_x", "resolution_y", "resolution_unit", "compression", "manufacturer",
  "software", "color_space", "custom_id", "reference",
];
const NUMBERS = new Set(["latitude", "longitude", "altitude", "resolution_x", "resolution_y"]);
const PAGE_SIZE = 100;
const ORDER = "created_at desc"; // newest first; new items go on top
const MAP_POINTS = 2000;

const $ = (id) => document.getElementById(id);
const state = {
  config: null,
  token: sessionStorage.getItem("metalake-token") || "",
  filter: "",
  nextToken: "",
  loading: false,
  done: false,
  generation: 0, // bumps on every new query: late answers of an old one are dropped
  watch: null,
  shown: new Set(),
  facets: { manufacturer: new Set(), tags: new Set(), labels: new Map() }, // labels: key -> Set of values
};

class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.error = error || {};
  }
  violation(field) {
    for (const detail of this.error.details || []) {
      for (const v of detail.fieldViolations || []) if (v.field === field) return v;
    }
    return null;
  }
}

function headers() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

async function request(path, options = {}) {
  const sent = state.token;
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (response.status === 401) {
    // Only a refusal of the token still in use asks for another: a request made with a token
    // replaced since (mistyped, then typed again) may be refused after the new one is in.
    if (sent === state.token) askForToken(sent ? "That token was refused." : "");
    throw new ApiError(401, { message: "a valid API token is required" });
  }
  return response;
}

async function api(path, options = {}) {
  const response = await request(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, body.error);
  return body;
}

function element(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text) node.textContent = text;
  return node;
}

function notice(text) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

// Images: plain URLs without a token (the browser caches and lazy-loads them); with a token,
// fetched with the Authorization header and shown from a blob: URL.
const imageQueue = [];
let imagesInFlight = 0;
function showImage(img, url, onMissing) {
  if (!state.token) {
    img.addEventListener("error", onMissing, { once: true });
    img.loading = "lazy";
    img.src = url;
    return;
  }
  imageQueue.push([img, url, onMissing]);
  pumpImages();
}
function pumpImages() {
  while (imagesInFlight < 6 && imageQueue.length) {
    const [img, url, onMissing] = imageQueue.shift();
    imagesInFlight++;
    request(url)
      .then(async (response) => {
        if (!response.ok) return onMissing();
        img.src = URL.createObjectURL(await response.blob());
      })
      .catch(() => onMissing())
      .finally(() => { imagesInFlight--; pumpImages(); });
  }
}

// Logging in.

function askForToken(message) {
  state.token = "";
  sessionStorage.removeItem("metalake-token");
  stopWatching();
  for (const id of ["grid-view", "map-view", "item-view"]) $(id).hidden = true;
  $("login").hidden = false;
  $("logout").hidden = true;
  $("login-error").textContent = message;
  $("login-error").hidden = !message;
  $("token").focus();
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = $("token").value.trim();
  $("token").value = "";
  sessionStorage.setItem("metalake-token", state.token);
  $("login").hidden = true;
  route();
});

$("logout").addEventListener("click", () => askForToken(""));

// The filter bar: the server parses filters; its errors say where, and are shown there.

function showFilterError(text, error) {
  const violation = error.violation("filter");
  const box = $("filter-error");
  const position = violation && Number.isInteger(violation.position) ? violation.position : null;
  box.querySelector(".before").textContent = position === null ? text : text.slice(0, position);
  box.querySelector(".at").textContent = position === null ? "" : (text.slice(position, position + 1) || " ");
  box.querySelector(".after").textContent = position === null ? "" : text.slice(position + 1);
  box.querySelector(".message").textContent = violation ? violation.description : error.message;
  box.hidden = false;
  $("filter").classList.add("invalid");
  if (position !== null) {
    $("filter").focus();
    $("filter").setSelectionRange(position, Math.min(text.length, position + 1));
  }
}

function clearFilterError() {
  $("filter-error").hidden = true;
  $("filter").classList.remove("invalid");
}

$("filter-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const filter = $("filter").value.trim();
  const view = location.hash.startsWith("#/map") ? "#/map" : "#/";
  const wanted = `${view}?filter=${encodeURIComponent(filter)}`;
  if (location.hash === wanted) route();
  else location.hash = wanted;
});

function quoted(value) {
  return `"${value.replaceAll("\\", "\\\\").replaceAll('"', '\\"').replaceAll("*", "\\*")}"`;
}

function narrow(term) {
  const current = $("filter").value.trim();
  $("filter").value = current ? `${current} AND ${term}` : term;
  $("filter-form").requestSubmit();
}

// The grid: keyset pages of 100, newest first, loaded as the sentinel scrolls into view.

function resetGrid() {
  state.generation++;
  state.nextToken = "";
  state.done = false;
  state.loading = false;
  state.shown.clear();
  state.facets.manufacturer.clear();
  state.facets.tags.clear();
  state.facets.labels.clear();
  $("grid").replaceChildren();
  $("end").hidden = true;
  renderFacets();
}

function card(data) {
  const link = element("a", { class: "card", href: `#/item/${encodeURIComponent(data.id)}`, "data-id": data.id });
  const img = element("img", { alt: data.filename, title: data.filename });
  link.append(img, element("span", { class: "name" }, data.filename));
  showImage(img, `/v1/data/${encodeURIComponent(data.id)}/thumbnail?size=256`, () => {
    img.replaceWith(element("div", { class: "placeholder" }, data.content_type || "no preview"));
  });
  return link;
}

// Facets: distinct manufacturers, tags, label keys and the values of each key in the whole
// datalake, from the server (index walks, no counts); items arriving live add theirs.
const FACET_LIMIT = 30;
const LABEL_KEYS = 10;
const LABEL_VALUES = 10;

function addFacets(data) {
  const manufacturer = data.metadata?.manufacturer;
  if (manufacturer) state.facets.manufacturer.add(manufacturer);
  for (const tag of data.tags || []) state.facets.tags.add(tag);
  for (const [key, value] of Object.entries(data.labels || {})) {
    if (!state.facets.labels.has(key)) state.facets.labels.set(key, new Set());
    state.facets.labels.get(key).add(value);
  }
}

async function loadFacets() {
  const generation = state.generation;
  const values = async (field, limit) => (await api(`/v1/facets/${field}?limit=${limit}`)).values;
  try {
    const [manufacturers, tags, keys] = await Promise.all([
      values("manufacturer", FACET_LIMIT), values("tags", FACET_LIMIT), values("labels", LABEL_KEYS),
    ]);
    const labels = await Promise.all(keys.map((key) => values(`labels.${key}`, LABEL_VALUES)));
    if (generation !== state.generation) return;
    manufacturers.forEach((value) => state.facets.manufacturer.add(value));
    tags.forEach((value) => state.facets.tags.add(value));
    keys.forEach((key, i) => {
      if (!state.facets.labels.has(key)) state.facets.labels.set(key, new Set());
      labels[i].forEach((value) => state.facets.labels.get(key).add(value));
    });
    renderFacets();
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
  }
}

function facetList(values, term) {
  return [...values].sort().slice(0, FACET_LIMIT).map((value) => {
    const button = element("button", { type: "button" }, value);
    button.addEventListener("click", () => narrow(term(value)));
    const item = element("li");
    item.append(button);
    return item;
  });
}

function renderFacets() {
  $("facet-manufacturer").replaceChildren(...facetList(state.facets.manufacturer, (v) => `manufacturer = ${quoted(v)}`));
  $("facet-tags").replaceChildren(...facetList(state.facets.tags, (v) => `tags:${quoted(v)}`));
  // Keys are letters, digits and "_" (the server checks): `labels.KEY` is a field name as is.
  const keys = [...state.facets.labels.keys()].sort().slice(0, FACET_LIMIT);
  $("facet-labels").replaceChildren(...keys.map((key) => {
    const item = element("li", { class: "label-key", "data-key": key });
    const values = element("ul");
    values.append(...facetList(state.facets.labels.get(key), (v) => `labels.${key} = ${quoted(v)}`));
    item.append(element("span", { class: "key" }, key), values);
    return item;
  }));
}

async function loadPage() {
  if (state.loading || state.done) return;
  state.loading = true;
  const generation = state.generation;
  const params = new URLSearchParams({ filter: state.filter, order_by: ORDER, page_size: PAGE_SIZE });
  if (state.nextToken) params.set("page_token", state.nextToken);
  try {
    const page = await api(`/v1/data?${params}`);
    if (generation !== state.generation) return;
    clearFilterError();
    const cards = [];
    for (const data of page.data) {
      if (state.shown.has(data.id)) continue;
      state.shown.add(data.id);
      cards.push(card(data));
    }
    $("grid").append(...cards);
    state.nextToken = page.next_page_token;
    state.done = !page.next_page_token;
    $("end").hidden = !state.done;
  } catch (error) {
    if (generation !== state.generation || !(error instanceof ApiError)) throw error;
    state.done = true;
    if (error.violation("filter")) showFilterError(state.filter, error);
    else if (error.status !== 401) notice(error.message);
  } finally {
    if (generation === state.generation) state.loading = false;
  }
  // A short first page may not fill the screen: keep going while the sentinel shows.
  if (generation === state.generation && !state.done && sentinelVisible) loadPage();
}

let sentinelVisible = false;
new IntersectionObserver((entries) => {
  sentinelVisible = entries.some((entry) => entry.isIntersecting);
  if (sentinelVisible && !$("grid-view").hidden) loadPage();
}, { rootMargin: "800px" }).observe($("sentinel"));

// Live: WatchData's change log as Server-Sent Events, read with fetch (EventSource cannot send
// an Authorization header). Reconnects from the last event id, so nothing is missed.

function stopWatching() {
  if (state.watch) state.watch.abort();
  state.watch = null;
  delete document.body.dataset.live;
}

function watch(filter) {
  stopWatching();
  const controller = new AbortController();
  state.watch = controller;
  let lastId = "";
  const connect = async () => {
    while (!controller.signal.aborted) {
      try {
        const extra = lastId ? { "Last-Event-ID": lastId } : {};
        const response = await request(`/v1/watch?${new URLSearchParams({ filter })}`, { signal: controller.signal, headers: extra });
        if (!response.ok) return;
        document.body.dataset.live = "on"; // connected: changes from now on arrive here
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            const event = {};
            for (const line of block.split("\n")) {
              if (line.startsWith(":")) continue;
              const colon = line.indexOf(":");
              event[line.slice(0, colon)] = line.slice(colon + 1).replace(/^ /, "");
            }
            if (event.id) lastId = event.id;
            if (event.data) onChange(event.event, JSON.parse(event.data));
          }
        }
      } catch (error) {
        if (controller.signal.aborted || (error instanceof ApiError && error.status === 401)) return;
      }
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  };
  connect();
}

function onChange(kind, data) {
  const existing = document.querySelector(`#grid .card[data-id="${CSS.escape(data.id)}"]`);
  if (kind === "deleted") {
    existing?.remove();
    state.shown.delete(data.id);
  } else if (kind === "created" && !existing) {
    state.shown.add(data.id);
    addFacets(data);
    renderFacets();
    const fresh = card(data);
    fresh.classList.add("new");
    $("grid").prepend(fresh);
  } else if (kind === "updated" && existing) {
    existing.querySelector(".name").textContent = data.filename;
  }
}

// The map: GPS-tagged items on the bundled outline (or on tiles, when the server names a tile
// URL), equirectangular without tiles, Web Mercator with them.

async function showMap() {
  const canvas = $("map");
  const context = canvas.getContext("2d");
  const tiles = state.config?.tile_url;
  const project = tiles
    ? ([lon, lat]) => {
        const clamped = Math.max(-85, Math.min(85, lat)) * Math.PI / 180;
        const y = (1 - Math.log(Math.tan(clamped) + 1 / Math.cos(clamped)) / Math.PI) / 2;
        return [(lon + 180) / 360 * canvas.width, y * canvas.height];
      }
    : ([lon, lat]) => [(lon + 180) / 360 * canvas.width, (90 - lat) / 180 * canvas.height];
  canvas.height = tiles ? canvas.width : canvas.width / 2;
  context.fillStyle = "#dbe9f6";
  context.fillRect(0, 0, canvas.width, canvas.height);
  if (tiles) await drawTiles(context, canvas, tiles);
  else {
    context.fillStyle = "#f3f1ea";
    context.strokeStyle = "#9aa5ad";
    for (const ring of WORLD) {
      context.beginPath();
      ring.forEach((point, i) => (i ? context.lineTo(...project(point)) : context.moveTo(...project(point))));
      context.closePath();
      context.fill();
      context.stroke();
    }
  }
  const points = [];
  const generation = state.generation;
  const gps = "latitude:* AND longitude:*";
  const filter = state.filter ? `(${state.filter}) AND ${gps}` : gps;
  let token = "";
  $("map-status").textContent = "Loading…";
  try {
    do {
      const params = new URLSearchParams({ filter, page_size: 1000 });
      if (token) params.set("page_token", token);
      const page = await api(`/v1/data?${params}`);
      if (generation !== state.generation) return;
      clearFilterError();
      context.fillStyle = "#d0342c";
      for (const data of page.data) {
        const [x, y] = project([data.metadata.longitude, data.metadata.latitude]);
        points.push([x, y, data]);
        context.beginPath();
        context.arc(x, y, 4, 0, 2 * Math.PI);
        context.fill();
      }
      token = page.next_page_token;
    } while (token && points.length < MAP_POINTS);
    $("map-status").textContent = `${points.length}${token ? "+" : ""} GPS-tagged items` +
      (token ? ` (the first ${points.length} shown)` : "") + ". Click a point to open it.";
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    if (error.violation("filter")) showFilterError(state.filter, error);
    $("map-status").textContent = "";
  }
  canvas.onclick = (event) => {
    const box = canvas.getBoundingClientRect();
    const x = (event.clientX - box.left) * canvas.width / box.width;
    const y = (event.clientY - box.top) * canvas.height / box.height;
    let best = null;
    for (const point of points) {
      const distance = Math.hypot(point[0] - x, point[1] - y);
      if (distance < 10 && (!best || distance < best[0])) best = [distance, point[2]];
    }
    if (best) location.hash = `#/item/${encodeURIComponent(best[1].id)}`;
  };
}

async function drawTiles(context, canvas, template) {
  const zoom = 2;
  const count = 2 ** zoom;
  const size = canvas.width / count;
  const loads = [];
  for (let x = 0; x < count; x++) {
    for (let y = 0; y < count; y++) {
      const url = template.replace("{z}", zoom).replace("{x}", x).replace("{y}", y).replace("{s}", "a");
      const img = new Image();
      img.crossOrigin = "anonymous";
      loads.push(new Promise((resolve) => {
        img.onload = () => { context.drawImage(img, x * size, y * size, size, size); resolve(); };
        img.onerror = resolve;
      }));
      img.src = url;
    }
  }
  await Promise.all(loads);
}

// The item page: its preview, every field with where it came from, editing with the etag,
// and the download.

function formatted(field, value, data) {
  if (field === "acquired_at" && data.metadata.acquired_at_utc_offset) {
    return `${value} (UTC offset ${data.metadata.acquired_at_utc_offset})`;
  }
  return String(value);
}

let itemGeneration = 0;
async function showItem(id) {
  const generation = ++itemGeneration;
  let data;
  try {
    data = await api(`/v1/data/${encodeURIComponent(id)}`);
  } catch (error) {
    if (error instanceof ApiError && error.status !== 401) notice(error.message);
    return;
  }
  if (generation !== itemGeneration) return;
  $("item-title").textContent = data.filename;
  const img = $("item-image");
  img.hidden = false;
  img.removeAttribute("src");
  img.setAttribute("alt", data.filename);
  $("item-no-preview").hidden = true;
  showImage(img, `/v1/data/${encodeURIComponent(id)}/thumbnail?size=1024`, () => {
    img.hidden = true;
    $("item-no-preview").hidden = false;
  });
  const rows = [];
  const row = (name, value, source = "") => {
    const tr = element("tr");
    const cell = element("td", value === undefined ? { class: "absent" } : {}, value === undefined ? "—" : String(value));
    tr.append(element("th", {}, name), cell, element("td", {}, source));
    rows.push(tr);
  };
  for (const name of ["id", "filename", "size", "content_type", "sha256", "created_at", "updated_at", "etag"]) row(name, data[name]);
  row("tags", (data.tags || []).join(", ") || undefined);
  const sources = data.metadata_sources || {};
  for (const field of FIELDS) {
    const value = data.metadata?.[field];
    row(field, value === undefined ? undefined : formatted(field, value, data), sources[field] || "");
  }
  $("item-fields").tBodies[0].replaceChildren(...rows);

  const inputs = FIELDS.map((field) => {
    const input = element("input", { name: field, id: `edit-${field}` });
    const value = data.metadata?.[field];
    input.value = value === undefined ? "" : String(value);
    input.dataset.original = input.value;
    return [element("label", { for: `edit-${field}` }, field), input];
  });
  $("edit-fields").replaceChildren(...inputs.flat());
  $("edit-status").textContent = "";
  $("edit-form").onsubmit = (event) => {
    event.preventDefault();
    save(data);
  };
  $("download").onclick = () => download(data);
}

async function save(data) {
  const metadata = {};
  const mask = [];
  for (const field of FIELDS) {
    const input = $(`edit-${field}`);
    if (input.value === input.dataset.original) continue;
    mask.push(field);
    const text = input.value.trim();
    if (text === "") continue; // in the mask, absent from metadata: cleared
    metadata[field] = NUMBERS.has(field) ? Number(text) : text;
    if (field === "acquired_at") {
      const offset = text.match(/([+-])(\d\d):(\d\d)$/);
      if (offset) {
        const seconds = (offset[1] === "-" ? -1 : 1) * (Number(offset[2]) * 3600 + Number(offset[3]) * 60);
        metadata.acquired_at_utc_offset = `${seconds}s`;
      }
    }
  }
  if (!mask.length) {
    $("edit-status").textContent = "Nothing changed.";
    return;
  }
  try {
    await api(`/v1/data/${encodeURIComponent(data.id)}`, {
      method: "PATCH",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ metadata, update_mask: mask, etag: data.etag }),
    });
    await showItem(data.id);
    $("edit-status").textContent = "Saved.";
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    $("edit-status").textContent = error.status === 409
      ? "Someone changed this item since you opened it: reload it and edit again."
      : error.message + (error.error.details ? `: ${error.error.details[0].fieldViolations.map((v) => `${v.field} ${v.description}`).join("; ")}` : "");
  }
}

async function download(data) {
  const response = await request(`/v1/data/${encodeURIComponent(data.id)}/content`);
  if (!response.ok) return notice(`Download failed (HTTP ${response.status}).`);
  const url = URL.createObjectURL(await response.blob());
  const link = element("a", { href: url });
  link.download = data.filename.split(/[\\/]/).pop() || "download"; // the browser sanitizes it further
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

// Routing: #/?filter=..., #/map?filter=..., #/item/<id>.

async function route() {
  notice("");
  if (!state.config) {
    try {
      state.config = await api("/v1/config");
    } catch {
      return notice("The server does not answer.");
    }
  }
  if (state.config.auth_required && !state.token) return askForToken("");
  $("login").hidden = true;
  $("logout").hidden = !state.config.auth_required;
  const hash = location.hash || "#/";
  const [path, query] = hash.slice(1).split("?");
  const filter = new URLSearchParams(query || "").get("filter") || "";
  for (const id of ["grid-view", "map-view", "item-view"]) $(id).hidden = true;
  if (path.startsWith("/item/")) {
    $("item-view").hidden = false;
    return showItem(decodeURIComponent(path.slice("/item/".length)));
  }
  $("filter").value = filter;
  clearFilterError();
  if (path === "/map") {
    state.filter = filter;
    state.generation++;
    $("map-view").hidden = false;
    stopWatching();
    return showMap();
  }
  $("grid-view").hidden = false;
  if (filter !== state.filter || !state.shown.size || !state.watch) {
    state.filter = filter;
    resetGrid();
    loadFacets();
    watch(filter);
  }
  loadPage();
}

window.addEventListener("hashchange", route);
route();
