/* headlab.figures: interactive figures that work in a static page (no kernel).
 *
 * Each figure is a <div class="headlab-figure" id=ID> followed by <script type="application/json"
 * id=ID-data> (what headlab/figures.py computed) and a script that calls headlabFigures.mount(ID).
 * The menus are plain <select>s; every choice redraws from the embedded data with plotly.js, which is
 * loaded once per page from PLOTLY_URL (the book points it at its vendored copy).
 * Written to be inlined into a notebook output, so: no external URL, no global but headlabFigures.
 */
(function () {
  "use strict";
  var VERSION = 1;
  if (window.headlabFigures && window.headlabFigures.version >= VERSION) { return; }

  var PLOTLY_URL = "__PLOTLY_URL__";
  var waiting = [];
  var loadFailed = false;

  function withPlotly(ok, fail) {
    if (window.Plotly) { ok(window.Plotly); return; }
    if (loadFailed) { fail(); return; }
    waiting.push([ok, fail]);
    if (document.querySelector("script[data-headlab-plotly]")) { return; }
    var s = document.createElement("script");
    s.src = PLOTLY_URL;
    s.setAttribute("data-headlab-plotly", "1");
    s.onload = function () {
      var w = waiting; waiting = [];
      w.forEach(function (p) { if (window.Plotly) { p[0](window.Plotly); } else { p[1](); } });
    };
    s.onerror = function () {
      loadFailed = true;
      var w = waiting; waiting = [];
      w.forEach(function (p) { p[1](); });
    };
    document.head.appendChild(s);
  }

  // ---------------------------------------------------------------- small helpers
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) { e.textContent = text; }
    return e;
  }

  function fmt(v, digits) {
    if (v === null || v === undefined || (typeof v === "number" && isNaN(v))) { return "n/a"; }
    if (typeof v !== "number") { return String(v); }
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) { return v.toExponential(2); }
    return v.toFixed(digits === undefined ? 3 : digits);
  }

  function esc(s) {
    return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }

  function tokenLabel(t) {
    return String(t).replace(/\n/g, "\\n").replace(/\t/g, "\\t");
  }

  // A <select> inside a <label>; options are [value, text] pairs or plain values.
  function select(box, key, label, options, value, onchange) {
    var lab = el("label", {"class": "hlf-menu"});
    lab.appendChild(document.createTextNode(label + " "));
    var s = el("select", {"data-key": key, "aria-label": label});
    lab.appendChild(s);
    box.appendChild(lab);
    setOptions(s, options, value);
    s.addEventListener("change", function () { onchange(s.value); });
    return s;
  }

  function setOptions(s, options, value) {
    s.innerHTML = "";
    options.forEach(function (o) {
      var pair = Array.isArray(o) ? o : [o, o];
      var opt = el("option", {value: String(pair[0])}, String(pair[1]));
      s.appendChild(opt);
    });
    var values = options.map(function (o) { return String(Array.isArray(o) ? o[0] : o); });
    s.value = values.indexOf(String(value)) >= 0 ? String(value) : values[0];
    return s.value;
  }

  function unique(xs) {
    var seen = {}, out = [];
    xs.forEach(function (x) { var k = String(x); if (!seen[k]) { seen[k] = 1; out.push(x); } });
    return out;
  }

  function range(n) { var r = []; for (var i = 0; i < n; i++) { r.push(i); } return r; }

  // Base64 -> bytes -> (zlib) inflate, with the browser's DecompressionStream.
  function inflate(b64) {
    var bin = atob(b64), bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) { bytes[i] = bin.charCodeAt(i); }
    if (typeof DecompressionStream === "undefined") {
      return Promise.reject(new Error("this browser has no DecompressionStream"));
    }
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Response(stream).arrayBuffer().then(function (buf) { return new Uint8Array(buf); });
  }

  // Lower-triangular causal patterns, quantised to bytes: (L, H, tri(n)) -> one head's n x n matrix.
  function patternOf(bytes, n, nHeads, layer, head) {
    var tri = n * (n + 1) / 2, base = (layer * nHeads + head) * tri, z = [];
    for (var i = 0; i < n; i++) {
      var row = [];
      for (var j = 0; j < n; j++) { row.push(j <= i ? bytes[base + i * (i + 1) / 2 + j] / 255 : null); }
      z.push(row);
    }
    return z;
  }

  var CONFIG = {displaylogo: false, responsive: true,
                modeBarButtonsToRemove: ["select2d", "lasso2d", "autoScale2d", "toImage"]};

  // Draw (or redraw) into div; the div gets the layout's height, the width follows the page.
  function render(P, div, traces, layout) {
    div.style.height = layout.height + "px";
    return P.react(div, traces, layout, CONFIG);
  }
  var DIVERGING = [[0, "#2166ac"], [0.25, "#92c5de"], [0.5, "#f7f7f7"], [0.75, "#f4a582"], [1, "#b2182b"]];

  function headMap(P, div, grid, hover, title, opts) {
    opts = opts || {};
    var maxAbs = 0;
    grid.forEach(function (row) { row.forEach(function (v) { if (v !== null && Math.abs(v) > maxAbs) { maxAbs = Math.abs(v); } }); });
    var trace = {type: "heatmap", z: grid, text: hover, hoverinfo: "text", hoverongaps: false,
                 x: range(grid[0].length), y: range(grid.length), xgap: 1, ygap: 1,
                 colorbar: {thickness: 12, title: {text: opts.colorbar || "", side: "right"}}};
    var signed = grid.some(function (row) { return row.some(function (v) { return v !== null && v < 0; }); });
    if (signed || opts.diverging) {
      trace.colorscale = DIVERGING; trace.zmid = 0; trace.zmin = -(maxAbs || 1); trace.zmax = maxAbs || 1;
    } else {
      trace.colorscale = "Viridis";
    }
    var traces = [trace];
    if (opts.mark) {
      traces.push({type: "scatter", mode: "markers", x: [opts.mark[1]], y: [opts.mark[0]], hoverinfo: "skip",
                   marker: {symbol: "square-open", size: 14, color: "#000", line: {width: 2}}, showlegend: false});
    }
    var layout = {title: {text: title, font: {size: 13}}, margin: {l: 50, r: 10, t: 40, b: 40},
                  xaxis: {title: {text: "head"}, dtick: grid[0].length > 16 ? 2 : 1, zeroline: false},
                  yaxis: {title: {text: "layer"}, autorange: "reversed", dtick: grid.length > 16 ? 2 : 1, zeroline: false},
                  hovermode: "closest", height: Math.max(260, Math.min(720, 18 * grid.length + 110))};
    return render(P, div, traces, layout);
  }

  function tokenMap(P, div, z, tokens, title) {
    var n = tokens.length, labels = tokens.map(tokenLabel), hover = [];
    for (var i = 0; i < n; i++) {
      var row = [];
      for (var j = 0; j < n; j++) {
        row.push(z[i][j] === null ? "" : "query " + i + " " + esc(JSON.stringify(labels[i])) + " \u2192 key " + j + " " +
                 esc(JSON.stringify(labels[j])) + "<br>attention " + fmt(z[i][j]));
      }
      hover.push(row);
    }
    var trace = {type: "heatmap", z: z, text: hover, hoverinfo: "text", hoverongaps: false, colorscale: "Viridis",
                 zmin: 0, x: range(n), y: range(n), colorbar: {thickness: 12, title: {text: "attention", side: "right"}}};
    var tick = {tickvals: range(n), ticktext: labels.map(esc), tickfont: {size: n > 30 ? 8 : 10}, zeroline: false};
    var layout = {title: {text: title, font: {size: 13}}, margin: {l: 90, r: 10, t: 50, b: 90},
                  xaxis: Object.assign({title: {text: "key"}, tickangle: -90}, tick),
                  yaxis: Object.assign({title: {text: "query"}, autorange: "reversed"}, tick),
                  height: Math.max(320, Math.min(640, 16 * n + 160)), hovermode: "closest"};
    return render(P, div, [trace], layout);
  }

  // ---------------------------------------------------------------- kinds
  var kinds = {};

  // Layer x head heatmap of a head sweep: mode / level / seed (or the mean over seeds) / metric.
  kinds.sweep = function (P, root, d) {
    var controls = root.querySelector(".hlf-controls"), plot = root.querySelector(".hlf-plot");
    var state = {mode: d.init.mode, level: d.init.level, seed: d.init.seed, metric: d.init.metric};
    function views(filter) { return d.views.filter(filter); }
    var sMode, sLevel, sSeed;
    function sync() {
      state.mode = setOptions(sMode, unique(d.views.map(function (v) { return v.mode; })), state.mode);
      var levels = unique(views(function (v) { return v.mode === state.mode; }).map(function (v) { return v.level; }));
      state.level = setOptions(sLevel, levels, state.level);
      var seeds = unique(views(function (v) { return v.mode === state.mode && String(v.level) === state.level; })
                         .map(function (v) { return v.seed; }));
      state.seed = setOptions(sSeed, seeds, state.seed);
    }
    function draw() {
      var v = views(function (x) { return x.mode === state.mode && String(x.level) === state.level &&
                                          String(x.seed) === state.seed; })[0];
      var vals = v.values[state.metric], lo = (v.low || {})[state.metric], hi = (v.high || {})[state.metric];
      var grid = [], hover = [];
      for (var l = 0; l < d.n_layers; l++) {
        var row = [], hrow = [];
        for (var h = 0; h < d.n_heads; h++) {
          var i = l * d.n_heads + h, x = vals[i];
          row.push(x);
          var text = "layer " + l + ", head " + h + "<br>" + esc(state.metric) + ": " + fmt(x);
          text += lo ? "<br>95% CI [" + fmt(lo[i]) + ", " + fmt(hi[i]) + "]" : "<br>interval: " + esc(d.no_interval);
          hrow.push(x === null ? "" : text);
        }
        grid.push(row); hover.push(hrow);
      }
      var seedText = state.seed === d.mean_label ? d.mean_label : "seed " + state.seed;
      root.setAttribute("data-state", JSON.stringify(state));
      return headMap(P, plot, grid, hover, esc(state.metric) + ": " + esc(state.mode) + ", level " + esc(state.level) +
                     ", " + esc(seedText), {colorbar: state.metric});
    }
    function on(key) { return function (value) { state[key] = value; sync(); draw(); }; }
    sMode = select(controls, "mode", "mode", [], state.mode, on("mode"));
    sLevel = select(controls, "level", "level", [], state.level, on("level"));
    sSeed = select(controls, "seed", "seed", [], state.seed, on("seed"));
    select(controls, "metric", "measure", d.metrics, state.metric, on("metric"));
    sync();
    return draw();
  };

  // One head's attention pattern on one of a few texts: text / layer / head.
  kinds.pattern = function (P, root, d) {
    var controls = root.querySelector(".hlf-controls"), plot = root.querySelector(".hlf-plot");
    var state = {text: d.init.text, layer: String(d.init.layer), head: String(d.init.head)};
    var names = d.texts.map(function (t) { return t.name; });
    return Promise.all(d.texts.map(function (t) { return inflate(t.patterns); })).then(function (blobs) {
      function draw() {
        var k = names.indexOf(state.text), t = d.texts[k], L = +state.layer, H = +state.head;
        var note = d.notes[L + "," + H];
        root.setAttribute("data-state", JSON.stringify(state));
        return tokenMap(P, plot, patternOf(blobs[k], t.tokens.length, d.n_heads, L, H), t.tokens,
                        "L" + L + "H" + H + " on " + esc(JSON.stringify(state.text)) + (note ? "<br><sub>" + esc(note) + "</sub>" : ""));
      }
      function on(key) { return function (value) { state[key] = value; draw(); }; }
      select(controls, "text", "text", names, state.text, on("text"));
      select(controls, "layer", "layer", range(d.n_layers), state.layer, on("layer"));
      select(controls, "head", "head", range(d.n_heads), state.head, on("head"));
      return draw();
    });
  };

  // A small neuroscope: layer / neuron (among the strongest of each layer).
  kinds.neurons = function (P, root, d) {
    var controls = root.querySelector(".hlf-controls"), plot = root.querySelector(".hlf-plot");
    var side = root.querySelector(".hlf-side");
    var state = {layer: String(d.init.layer), neuron: String(d.init.neuron)};
    var layers = unique(d.cards.map(function (c) { return c.layer; }));
    var sNeuron;
    function neuronsOf(layer) {
      return d.cards.filter(function (c) { return String(c.layer) === layer; })
                    .map(function (c) { return [c.neuron, c.neuron + " (" + c.note + ")"]; });
    }
    function draw() {
      var c = d.cards.filter(function (x) { return String(x.layer) === state.layer && String(x.neuron) === state.neuron; })[0];
      root.setAttribute("data-state", JSON.stringify(state));
      side.innerHTML = "";
      side.appendChild(el("p", {"class": "hlf-caption"}, "L" + c.layer + " N" + c.neuron + ": " + c.note +
                          ". Top-activating tokens (boxed) in context; shade = activation, hover a token for its value."));
      var scale = 1e-9;
      c.examples.forEach(function (ex) { ex.tokens.forEach(function (t) { scale = Math.max(scale, Math.abs(t[1])); }); });
      c.examples.forEach(function (ex) {
        var line = el("div", {"class": "hlf-snippet"});
        line.appendChild(el("span", {"class": "hlf-act"}, fmt(ex.activation, 2)));
        ex.tokens.forEach(function (t) {
          var v = t[1] / scale, a = Math.min(1, Math.abs(v)).toFixed(2);
          var span = el("span", {title: fmt(t[1]), style: "white-space:pre;background:" +
                        (v >= 0 ? "rgba(220,40,40," + a + ")" : "rgba(40,90,220," + a + ")") +
                        (t[2] ? ";outline:1.5px solid black" : "")}, d.vocab[t[0]].replace(/\n/g, "\u21b5"));
          line.appendChild(span);
        });
        side.appendChild(line);
      });
      var p = c.promoted, s = c.suppressed;
      var labels = p.map(function (x) { return tokenLabel(d.vocab[x[0]]); }).concat(s.map(function (x) { return tokenLabel(d.vocab[x[0]]); }));
      var values = p.map(function (x) { return x[1]; }).concat(s.map(function (x) { return x[1]; }));
      var n = labels.length;
      return render(P, plot, [{type: "bar", orientation: "h", x: values, y: range(n), hoverinfo: "text",
                             text: labels.map(function (t, i) { return esc(JSON.stringify(t)) + ": " + fmt(values[i]); }),
                             textposition: "none",
                             marker: {color: values.map(function (v) { return v >= 0 ? "#b2182b" : "#2166ac"; })}}],
                     {title: {text: "L" + c.layer + " N" + c.neuron + ": tokens its output weights promote / suppress",
                              font: {size: 13}},
                      margin: {l: 110, r: 10, t: 40, b: 40}, height: Math.max(260, 18 * n + 90),
                      xaxis: {title: {text: "logit per unit of activation"}},
                      yaxis: {tickvals: range(n), ticktext: labels.map(function (t) { return esc(JSON.stringify(t)); }),
                              autorange: "reversed"}});
    }
    select(controls, "layer", "layer", layers, state.layer, function (v) {
      state.layer = v; state.neuron = setOptions(sNeuron, neuronsOf(v), null); draw();
    });
    sNeuron = select(controls, "neuron", "neuron", neuronsOf(state.layer), state.neuron, function (v) { state.neuron = v; draw(); });
    return draw();
  };

  // The head atlas: a layer x head map of one measure (click a head), the head's scores and pattern.
  kinds.atlas = function (P, root, d) {
    var controls = root.querySelector(".hlf-controls"), plot = root.querySelector(".hlf-plot");
    var side = root.querySelector(".hlf-side");
    var table = el("div", {"class": "hlf-table"}), pat = el("div", {"class": "hlf-plot2"});
    side.appendChild(table); side.appendChild(pat);
    var state = {measure: d.init.measure, layer: String(d.init.layer), head: String(d.init.head)};
    var sLayer, sHead, bytes = null;
    function drawMap() {
      var vals = d.values[state.measure] || [], ranks = d.ranks[state.measure] || [];
      var grid = [], hover = [];
      for (var l = 0; l < d.n_layers; l++) {
        var row = [], hrow = [];
        for (var h = 0; h < d.n_heads; h++) {
          var i = l * d.n_heads + h, x = vals[i];
          row.push(x === undefined ? null : x);
          hrow.push(x === null || x === undefined ? "" : "layer " + l + ", head " + h + "<br>" + esc(state.measure) + ": " + fmt(x) +
                    "<br>rank " + ranks[i] + " of " + d.counts[state.measure] + " (1 = largest)<br>click to show this head");
        }
        grid.push(row); hover.push(hrow);
      }
      return headMap(P, plot, grid, hover, esc(state.measure) + " per head (click a head)",
                     {colorbar: state.measure, mark: [+state.layer, +state.head]});
    }
    function drawHead() {
      var L = +state.layer, H = +state.head, i = L * d.n_heads + H;
      root.setAttribute("data-state", JSON.stringify(state));
      var rows = d.measures.map(function (m) {
        var v = d.values[m][i], r = d.ranks[m][i], n = d.counts[m];
        var pct = (v === null || r === null) ? "n/a" : fmt(100 * (n - r) / Math.max(n - 1, 1), 0);
        return "<tr><td>" + esc(m) + "</td><td>" + fmt(v) + "</td><td>" + (r === null ? "n/a" : r + " / " + n) +
               "</td><td>" + pct + "</td></tr>";
      });
      table.innerHTML = "<p class='hlf-caption'><b>L" + L + "H" + H + "</b>: every measure of this head</p>" +
        "<table class='hlf-scores'><thead><tr><th>measure</th><th>value</th><th>rank</th><th>percentile</th></tr></thead><tbody>" +
        rows.join("") + "</tbody></table>";
      var draws = [drawMap()];
      if (bytes) {
        draws.push(tokenMap(P, pat, patternOf(bytes, d.tokens.length, d.n_heads, L, H), d.tokens,
                            "L" + L + "H" + H + " attention on the atlas text"));
      }
      return Promise.all(draws);
    }
    function pick(L, H) {
      state.layer = String(L); state.head = String(H); sLayer.value = state.layer; sHead.value = state.head;
      return drawHead();
    }
    select(controls, "measure", "colour by", d.measures, state.measure, function (v) { state.measure = v; drawHead(); });
    sLayer = select(controls, "layer", "layer", range(d.n_layers), state.layer, function (v) { state.layer = v; drawHead(); });
    sHead = select(controls, "head", "head", range(d.n_heads), state.head, function (v) { state.head = v; drawHead(); });
    var loading = d.patterns ? inflate(d.patterns).then(function (b) { bytes = b; }) : Promise.resolve();
    return loading.then(drawHead).then(function () {
      plot.on("plotly_click", function (ev) {
        var p = ev.points && ev.points[0];
        if (p && p.curveNumber === 0) { pick(p.y, p.x); }
      });
    });
  };

  // ---------------------------------------------------------------- mounting
  function mount(id) {
    var root = document.getElementById(id), script = document.getElementById(id + "-data");
    if (!root || !script || root.getAttribute("data-mounted")) { return; }
    root.setAttribute("data-mounted", "1");
    var status = root.querySelector(".hlf-status");
    var d = JSON.parse(script.textContent);
    withPlotly(function (P) {
      Promise.resolve().then(function () { return kinds[d.kind](P, root, d); }).then(function () {
        status.textContent = "";
        status.style.display = "none";
        root.setAttribute("data-ready", "1");
      }, function (err) {
        status.textContent = "This figure could not be drawn: " + err;
        root.setAttribute("data-error", String(err));
      });
    }, function () {
      status.textContent = "This interactive figure needs plotly.js, which could not be loaded from " + PLOTLY_URL + ".";
      root.setAttribute("data-error", "plotly.js not loaded");
    });
  }

  window.headlabFigures = {version: VERSION, mount: mount, kinds: kinds};
})();
