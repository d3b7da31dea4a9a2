/* hexpr viewer: predicted expression over a slide, offline from file://.
 * Data files are scripts calling hexprData(kind, key, payload) (browsers refuse fetch()/XHR of file:// URLs);
 * per-gene files are loaded with a <script> tag when the gene is chosen. State is window.hexprViewer. */
(function () {
  "use strict";
  var S = window.hexprViewer = {ready: false, genes: {}, gene: null, mode: "value", cmap: "viridis", score: null,
                                top: null, scores: null, switches: [], data: null, viewer: null};
  var loaded = {};
  var QMAX = 65534;

  function $(id) { return document.getElementById(id); }

  function bytes(b64) {
    var bin = atob(b64), n = bin.length, out = new Uint8Array(n);
    for (var i = 0; i < n; i++) out[i] = bin.charCodeAt(i);
    return out.buffer;
  }
  function dequantise(packed) {            // [min, max, base64 uint16 codes] -> Float32Array (NaN = missing)
    var lo = packed[0], hi = packed[1], codes = new Uint16Array(bytes(packed[2]));
    var out = new Float32Array(codes.length), step = (hi - lo) / QMAX;
    for (var i = 0; i < codes.length; i++) out[i] = codes[i] > QMAX ? NaN : lo + codes[i] * step;
    return out;
  }

  window.hexprData = function (kind, key, payload) {
    if (kind === "slide") { start(payload); return; }
    if (kind === "gene") {
      var g = {v: dequantise(payload.v)};
      if (payload.lower) { g.lower = dequantise(payload.lower); g.upper = dequantise(payload.upper); }
      if (payload.std) g.std = dequantise(payload.std);
      S.genes[key] = g;
    } else if (kind === "scores") {
      S.scores = {};
      Object.keys(payload).forEach(function (s) { S.scores[s] = dequantise(payload[s]); });
    } else if (kind === "top") {
      S.top = {k: payload.k, genes: new Uint32Array(bytes(payload.genes)), z: new Float32Array(bytes(payload.z))};
    }
  };

  function loadScript(src) {               // resolves once the script ran (its hexprData call is done)
    if (loaded[src]) return loaded[src];
    loaded[src] = new Promise(function (resolve, reject) {
      var el = document.createElement("script");
      el.src = src;
      el.onload = function () { resolve(); };
      el.onerror = function () { delete loaded[src]; reject(new Error("cannot load " + src)); };
      document.head.appendChild(el);
    });
    return loaded[src];
  }

  function fmt(x) {
    if (x === null || x === undefined || isNaN(x)) return "n/a";
    var a = Math.abs(x);
    return (a !== 0 && (a >= 1e5 || a < 1e-3)) ? x.toExponential(3) : Number(x.toPrecision(4)).toString();
  }
  function lut(name) {
    var hex = S.data.colour_maps[name], out = new Uint8Array(hex.length / 2);
    for (var i = 0; i < out.length; i++) out[i] = parseInt(hex.substr(2 * i, 2), 16);
    return out;
  }
  function range(values) {
    var lo = Infinity, hi = -Infinity;
    for (var i = 0; i < values.length; i++) { var v = values[i]; if (v < lo) lo = v; if (v > hi) hi = v; }
    return lo <= hi ? [lo, hi] : [0, 0];
  }

  /* what is drawn: {values, lo, hi, title, units} for the mode */
  function shown() {
    var d = S.data, g = S.genes[S.gene];
    if (S.mode === "score" && S.scores && S.score !== null) {
      var sv = S.scores[S.score], r = range(sv);
      return {values: sv, lo: r[0], hi: r[1], title: "gene set " + S.score + ", score", units: "mean z-score of its genes over this slide"};
    }
    if (!g) return null;
    var name = d.genes[S.gene];
    if (S.mode === "spread" && (g.lower || g.std)) {
      var w = g.std;
      if (g.lower) { w = new Float32Array(g.v.length); for (var i = 0; i < w.length; i++) w[i] = g.upper[i] - g.lower[i]; }
      var rw = range(w);
      return {values: w, lo: rw[0], hi: rw[1], title: name + ", " + spreadLabel(), units: d.units};
    }
    var rv = range(g.v);
    return {values: g.v, lo: rv[0], hi: rv[1], title: name + ", predicted", units: d.units};
  }
  function spreadLabel() {
    var d = S.data;
    return d.spread === "interval width" && d.interval ? "width of the " + Math.round(d.interval * 100) + " % interval" : (d.spread || "");
  }

  function render() {
    var d = S.data, what = shown();
    if (!what) return;
    var img = S.ctx.createImageData(d.n_cols, d.n_rows), px = img.data, table = lut(S.cmap);
    var span = what.hi - what.lo;
    for (var t = 0; t < d.n_tiles; t++) {
      var v = what.values[t];
      if (isNaN(v)) continue;
      var k = span > 0 ? Math.round((v - what.lo) / span * 255) : 128;
      k = Math.max(0, Math.min(255, k));
      var o = S.cells[t] * 4;
      px[o] = table[3 * k]; px[o + 1] = table[3 * k + 1]; px[o + 2] = table[3 * k + 2]; px[o + 3] = 255;
    }
    S.ctx.putImageData(img, 0, 0);
    legend(what, table);
  }
  function legend(what, table) {
    var c = $("legend-bar").getContext("2d"), img = c.createImageData(256, 1);
    for (var i = 0; i < 256; i++) { img.data.set([table[3 * i], table[3 * i + 1], table[3 * i + 2], 255], 4 * i); }
    for (var y = 0; y < 12; y++) c.putImageData(img, 0, y);
    $("legend-title").textContent = what.title;
    $("legend-min").textContent = fmt(what.lo);
    $("legend-max").textContent = fmt(what.hi);
    $("legend-units").textContent = what.units;
  }

  function selectGene(i) {
    if (i === null || i === undefined || i < 0) return Promise.resolve();
    var t0 = performance.now();
    S.gene = i;
    $("gene").value = S.data.genes[i];
    $("status").textContent = "loading " + S.data.genes[i] + " ...";
    return loadScript("data/genes/" + i + ".js").then(function () {
      if (S.gene !== i) return;
      if (S.mode === "score") setMode("value");
      render();
      var ms = performance.now() - t0;
      S.switches.push({gene: S.data.genes[i], ms: ms});
      performance.measure("hexpr-gene-switch", {start: t0, end: t0 + ms});
      $("status").textContent = S.data.genes[i] + " drawn (" + ms.toFixed(0) + " ms)";
      if (S.info !== undefined) showInfo(S.info);
    }, function (err) { $("status").textContent = err.message; });
  }

  /* gene search with autocomplete over every predicted gene */
  function matches(text) {
    var q = text.trim().toLowerCase(), genes = S.data.genes, pre = [], sub = [];
    if (!q) return [];
    for (var i = 0; i < genes.length && pre.length < 20; i++) {
      var g = genes[i].toLowerCase();
      if (g.indexOf(q) === 0) pre.push(i); else if (sub.length < 20 && g.indexOf(q) > 0) sub.push(i);
    }
    return pre.concat(sub).slice(0, 20);
  }
  function exact(text) {
    var q = text.trim().toLowerCase(), genes = S.data.genes;
    for (var i = 0; i < genes.length; i++) if (genes[i].toLowerCase() === q) return i;
    return -1;
  }
  function suggest() {
    var list = $("suggestions"), found = matches($("gene").value);
    list.innerHTML = "";
    found.forEach(function (i, n) {
      var li = document.createElement("li");
      li.textContent = S.data.genes[i];
      li.dataset.gene = i;
      if (n === 0) li.className = "active";
      li.addEventListener("mousedown", function (e) { e.preventDefault(); choose(i); });
      list.appendChild(li);
    });
    list.hidden = found.length === 0;
  }
  function choose(i) { $("suggestions").hidden = true; selectGene(i); }
  function onKey(e) {
    var items = Array.prototype.slice.call($("suggestions").children);
    var at = items.findIndex(function (li) { return li.className === "active"; });
    if (e.key === "ArrowDown" || e.key === "ArrowUp") {
      e.preventDefault();
      if (!items.length) return;
      if (at >= 0) items[at].className = "";
      at = (at + (e.key === "ArrowDown" ? 1 : items.length - 1)) % items.length;
      items[at].className = "active";
      items[at].scrollIntoView({block: "nearest"});
    } else if (e.key === "Enter") {
      var i = exact($("gene").value);
      if (i < 0 && at >= 0 && !$("suggestions").hidden) i = Number(items[at].dataset.gene);
      if (i >= 0) choose(i); else $("status").textContent = "no predicted gene matches '" + $("gene").value + "'";
    } else if (e.key === "Escape") {
      $("suggestions").hidden = true;
    }
  }

  function setMode(mode) {
    S.mode = mode;
    $("mode").value = mode;
    $("score-label").hidden = mode !== "score";
    if (mode === "score" && !S.scores) {
      loadScript("data/scores.js").then(render);
      return;
    }
    render();
  }

  /* hover / click: the tile under the pointer */
  function tileAt(viewerPoint) {
    var d = S.data, item = S.viewer.world.getItemAt(0);
    if (!item) return -1;
    var p = item.viewerElementToImageCoordinates(viewerPoint);
    var x = p.x / S.imageScale - S.origin, y = p.y / S.imageScale - S.origin;
    var c = Math.floor(x / d.stride_px), r = Math.floor(y / d.stride_px);
    if (c < 0 || r < 0 || c >= d.n_cols || r >= d.n_rows) return -1;
    return S.tileOfCell[r * d.n_cols + c];
  }
  function showInfo(t) {
    S.info = t;
    var d = S.data, box = $("info");
    if (t < 0) {
      box.textContent = "Hover or click a tile."; box.dataset.tile = "";
      if (S.frame) S.frame.hidden = true;
      return;
    }
    var cell = S.cells[t], r = Math.floor(cell / d.n_cols), c = cell % d.n_cols;
    var cx = c * d.stride_px + d.tile_px / 2, cy = r * d.stride_px + d.tile_px / 2;
    var lines = ["tile row " + r + ", col " + c];
    lines.push(d.um_per_px ? "centre x " + fmt(cx * d.um_per_px) + " µm, y " + fmt(cy * d.um_per_px) + " µm"
                           : "centre x " + fmt(cx) + " px, y " + fmt(cy) + " px");
    var g = S.genes[S.gene];
    if (g) {
      var line = d.genes[S.gene] + ": " + fmt(g.v[t]);
      if (g.lower) line += "  [" + fmt(g.lower[t]) + ", " + fmt(g.upper[t]) + "]" + (d.interval ? " " + Math.round(d.interval * 100) + " % interval" : " interval");
      else if (g.std) line += "  ± " + fmt(g.std[t]) + " (members' std)";
      lines.push(line);
    }
    if (S.mode === "score" && S.scores && S.score !== null) lines.push("score " + S.score + ": " + fmt(S.scores[S.score][t]));
    if (S.top) {
      var parts = [];
      for (var j = 0; j < S.top.k; j++) parts.push(d.genes[S.top.genes[t * S.top.k + j]] + " (z " + S.top.z[t * S.top.k + j].toFixed(1) + ")");
      lines.push("top genes vs this slide: " + parts.join(", "));
    }
    box.textContent = lines.join("\n");
    box.dataset.tile = String(t);
    outline(cx, cy, d.tile_px);
  }
  function outline(cx, cy, side) {          // a frame around the tile under the pointer
    var item = S.viewer.world.getItemAt(0), k = S.imageScale;
    if (!item) return;
    var rect = item.imageToViewportRectangle((cx - side / 2) * k, (cy - side / 2) * k, side * k, side * k);
    if (!S.frame) {
      S.frame = document.createElement("div");
      S.frame.className = "hexpr-frame";
      S.viewer.addOverlay({element: S.frame, location: rect});
    } else {
      S.viewer.updateOverlay(S.frame, rect);
    }
    S.frame.hidden = false;
  }
  function pointOf(ev) {
    var r = S.viewer.container.getBoundingClientRect();
    return new OpenSeadragon.Point(ev.clientX - r.left, ev.clientY - r.top);
  }

  function scaleBar() {
    var d = S.data, item = S.viewer.world.getItemAt(0);
    if (!item || !d.um_per_px) { $("scalebar").hidden = true; return; }
    var a = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
    var b = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(1000 * S.imageScale, 0));
    var pxPerUm = (b.x - a.x) / 1000 / d.um_per_px;
    var um = 120 / pxPerUm, p = Math.pow(10, Math.floor(Math.log10(um))), n = um / p;
    um = (n >= 5 ? 5 : n >= 2 ? 2 : 1) * p;
    $("scalebar-bar").style.width = Math.round(um * pxPerUm) + "px";
    $("scalebar-label").textContent = um >= 1000 ? (um / 1000) + " mm" : (um >= 1 ? um : um.toPrecision(1)) + " µm";
  }

  function tileSource(d) {
    if (!d.pyramid) return {type: "image", url: d.thumbnail.file, buildPyramid: false};
    var P = d.pyramid;
    return {
      width: P.width, height: P.height, tileSize: P.tile_size, tileOverlap: 0, minLevel: 0, maxLevel: P.max_level,
      getTileUrl: function (level, x, y) { return "pyramid/" + level + "/" + x + "_" + y + ".jpg"; },
      tileExists: function (level, x, y) {
        if (level < P.fine_from) return true;
        var shift = level - P.fine_from, bx = x >> shift, by = y >> shift;
        return bx < P.block_cols && by < P.block_rows && P.blocks.charAt(by * P.block_cols + bx) === "1";
      }
    };
  }

  function start(d) {
    S.data = d;
    document.title = "hexpr: " + d.name;
    $("title").textContent = d.name + " (" + d.n_tiles + " tiles, " + d.genes.length + " genes)";
    if (d.note) { $("note").textContent = d.note; $("note").hidden = false; }
    S.cells = new Int32Array(bytes(d.cells));
    S.tileOfCell = new Int32Array(d.n_rows * d.n_cols).fill(-1);
    for (var t = 0; t < d.n_tiles; t++) S.tileOfCell[S.cells[t]] = t;
    S.origin = (d.tile_px - d.stride_px) / 2;
    S.imageScale = d.pyramid ? 1 : d.thumbnail.scale;
    Object.keys(d.colour_maps).forEach(function (name) {
      var o = document.createElement("option"); o.value = o.textContent = name; $("cmap").appendChild(o);
    });
    d.scores.forEach(function (s) { var o = document.createElement("option"); o.value = o.textContent = s; $("score").appendChild(o); });
    S.score = d.scores.length ? d.scores[0] : null;
    var spreadOption = $("mode").querySelector("option[value=spread]");
    spreadOption.disabled = !d.spread;
    if (d.spread) spreadOption.textContent = spreadLabel();
    $("mode").querySelector("option[value=score]").disabled = !d.scores.length;

    var canvas = document.createElement("canvas");
    canvas.width = d.n_cols; canvas.height = d.n_rows; canvas.className = "hexpr-overlay"; canvas.id = "overlay";
    canvas.style.opacity = $("opacity").value;
    S.canvas = canvas; S.ctx = canvas.getContext("2d");

    var viewer = S.viewer = OpenSeadragon({
      element: $("viewer"), tileSources: tileSource(d), drawer: "canvas", showNavigationControl: false,
      showNavigator: false, crossOriginPolicy: false, loadTilesWithAjax: false, maxZoomPixelRatio: 4,
      gestureSettingsMouse: {clickToZoom: false}, visibilityRatio: 0.5, animationTime: 0.4
    });
    viewer.addHandler("open", function () {
      var item = viewer.world.getItemAt(0), k = S.imageScale;
      var rect = item.imageToViewportRectangle(S.origin * k, S.origin * k, d.n_cols * d.stride_px * k, d.n_rows * d.stride_px * k);
      viewer.addOverlay({element: canvas, location: rect});
      scaleBar();
      selectGene(d.initial_gene).then(function () {
        S.ready = true;
        performance.mark("hexpr-interactive");
        document.body.dataset.ready = "1";
        loadScript("data/top.js").then(function () { if (S.info !== undefined) showInfo(S.info); });
      });
    });
    viewer.addHandler("open-failed", function (e) { $("status").textContent = "cannot open the slide: " + e.message; });
    viewer.addHandler("animation", scaleBar);
    viewer.addHandler("resize", scaleBar);
    viewer.addHandler("canvas-click", function (e) { if (e.quick) { S.pinned = tileAt(e.position); showInfo(S.pinned); } });
    viewer.container.addEventListener("mousemove", function (ev) { showInfo(tileAt(pointOf(ev))); });

    $("gene").addEventListener("input", suggest);
    $("gene").addEventListener("keydown", onKey);
    $("gene").addEventListener("blur", function () { $("suggestions").hidden = true; });
    $("mode").addEventListener("change", function () { setMode($("mode").value); });
    $("score").addEventListener("change", function () { S.score = $("score").value; render(); });
    $("cmap").addEventListener("change", function () { S.cmap = $("cmap").value; render(); });
    $("opacity").addEventListener("input", function () { canvas.style.opacity = $("opacity").value; });
  }

  /* for tests and scripts: whether every tile in view is drawn, and the finest pyramid level requested */
  S.fullyLoaded = function () { var i = S.viewer && S.viewer.world.getItemAt(0); return !!(i && i.getFullyLoaded()); };
  S.selectGene = function (name) { return selectGene(S.data.genes.indexOf(name)); };
}());
