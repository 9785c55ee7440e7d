// llm-observe console: charts (Chart.js, served from /static, no CDN), copy buttons, project switcher,
// and the few computed styles (set here through the CSSOM, which the Content-Security-Policy allows,
// instead of style attributes, which it refuses).
(function () {
  "use strict";
  function data(id) {
    var el = document.getElementById(id);
    return el ? JSON.parse(el.textContent) : null;
  }
  function label(t, stepSeconds) {
    var d = new Date(t);
    var iso = d.toISOString();
    if (stepSeconds >= 7 * 86400) return iso.slice(0, 10);
    return stepSeconds >= 86400 ? iso.slice(5, 10) : iso.slice(5, 10) + " " + iso.slice(11, 16);
  }
  var palette = ["#0969da", "#cf222e", "#1a7f37", "#9a6700", "#8250df", "#bf3989"];
  function line(canvas, labels, sets, opts) {
    if (!window.Chart) return;
    new window.Chart(canvas, {
      type: opts && opts.bar ? "bar" : "line",
      data: {
        labels: labels,
        datasets: sets.map(function (s, i) {
          return { label: s.label, data: s.data, borderColor: palette[i], backgroundColor: palette[i] + (opts && opts.bar ? "cc" : "22"),
                   pointRadius: 0, borderWidth: 1.5, tension: 0.2, spanGaps: true, stack: opts && opts.stacked ? "a" : undefined };
        })
      },
      options: {
        responsive: true, maintainAspectRatio: false, animation: false,
        interaction: { mode: "index", intersect: false },
        plugins: { legend: { position: "bottom", labels: { boxWidth: 10 } } },
        scales: { x: { ticks: { maxTicksLimit: 8, autoSkip: true }, stacked: !!(opts && opts.stacked) },
                  y: { beginAtZero: true, stacked: !!(opts && opts.stacked) } }
      }
    });
  }
  function pick(series, key) { return series.map(function (p) { return p[key]; }); }

  var series = data("series");
  if (series) {
    var step = series.length > 1 ? (new Date(series[1].t) - new Date(series[0].t)) / 1000 : 3600;
    var labels = series.map(function (p) { return label(p.t, step); });
    var charts = {
      spans: function (c) { line(c, labels, [{ label: "spans", data: pick(series, "spans") }, { label: "errors", data: pick(series, "errors") }], { bar: true }); },
      cost: function (c) { line(c, labels, [{ label: "USD", data: pick(series, "cost_usd") }], { bar: true }); },
      tokens: function (c) { line(c, labels, [{ label: "prompt", data: pick(series, "prompt_tokens") }, { label: "completion", data: pick(series, "completion_tokens") }], { bar: true, stacked: true }); },
      latency: function (c) { line(c, labels, [{ label: "p50", data: pick(series, "latency_p50") }, { label: "p95", data: pick(series, "latency_p95") }, { label: "p99", data: pick(series, "latency_p99") }]); },
      ttft: function (c) { line(c, labels, [{ label: "p50", data: pick(series, "ttft_p50") }, { label: "p95", data: pick(series, "ttft_p95") }, { label: "p99", data: pick(series, "ttft_p99") }]); }
    };
    document.querySelectorAll("canvas[data-chart]").forEach(function (c) {
      var draw = charts[c.getAttribute("data-chart")];
      if (draw) draw(c);
    });
  }
  var sec = data("security-series");
  if (sec) {
    var sstep = sec.length > 1 ? (new Date(sec[1].t) - new Date(sec[0].t)) / 1000 : 3600;
    var slabels = sec.map(function (p) { return label(p.t, sstep); });
    document.querySelectorAll("canvas[data-chart=security]").forEach(function (c) {
      line(c, slabels, [{ label: "PII", data: pick(sec, "pii") }, { label: "injection", data: pick(sec, "injections") }], { bar: true });
    });
  }
  document.querySelectorAll("[data-copy]").forEach(function (btn) {
    btn.addEventListener("click", function () {
      var input = document.querySelector(btn.getAttribute("data-copy"));
      input.select();
      var done = function () { btn.textContent = "Copied"; };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(input.value).then(done, function () { document.execCommand("copy"); done(); });
      } else { document.execCommand("copy"); done(); }
    });
  });
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (e) { if (!window.confirm(form.getAttribute("data-confirm"))) e.preventDefault(); });
  });
  document.querySelectorAll("td[data-indent]").forEach(function (td) {
    td.style.paddingLeft = 1.2 * Number(td.getAttribute("data-indent")) + "rem";
  });
  document.querySelectorAll(".bar[data-left]").forEach(function (bar) {
    bar.style.marginLeft = bar.getAttribute("data-left") + "%";
    bar.style.width = bar.getAttribute("data-width") + "%";
  });
  document.querySelectorAll("form[data-once]").forEach(function (form) {
    // A double click would send the one-time token twice: the second is refused, but says so on a new page.
    form.addEventListener("submit", function () {
      form.querySelectorAll("button[type=submit]").forEach(function (b) { b.disabled = true; });
    });
  });
  var sw = document.querySelector("form[data-project-switch] select");
  if (sw) sw.addEventListener("change", function () { if (sw.value) window.location = sw.value; });
})();
