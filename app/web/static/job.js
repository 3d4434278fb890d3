// The job page: a new partner link's copy button; Cancel asks first.
(function () {
  "use strict";
  var copy = document.getElementById("copy-link");
  if (copy) {
    copy.addEventListener("click", function () {
      var field = document.getElementById(copy.dataset.copies);
      var status = document.getElementById("copy-link-status");
      field.select();
      function done() { status.textContent = "Copied."; }
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(field.value).then(done, function () {
          status.textContent = "Select the link and copy it with Ctrl+C.";
        });
      } else {
        // Plain http outside localhost has no Clipboard API: the older command still copies the selection.
        if (document.execCommand("copy")) { done(); } else { status.textContent = "Select the link and copy it with Ctrl+C."; }
      }
    });
  }
  var cancel = document.getElementById("cancel-form");
  if (cancel) {
    cancel.addEventListener("submit", function (event) {
      if (!window.confirm(cancel.dataset.confirm)) { event.preventDefault(); }
    });
  }
})();

// Live progress on the job page: state, progress, stages and error updated in place from the job's event stream
// (polling the JSON API where the stream is refused).
(function () {
  "use strict";
  var root = document.getElementById("job");
  if (!root || root.dataset.terminal === "true") { return; }
  var TERMINAL = ["succeeded", "failed", "cancelled"];
  var url = root.dataset.apiUrl;
  var LABELS = JSON.parse(root.dataset.stageLabels || "{}");
  function label(state) { return LABELS[state] || state; }

  function num(n) { return n === null || n === undefined ? "?" : n.toLocaleString("en-US"); }
  function duration(seconds) {
    if (seconds < 60) { return seconds.toFixed(1) + " s"; }
    var s = Math.round(seconds);
    return Math.floor(s / 60) + " min " + (s % 60) + " s";
  }
  function took(stage) {
    if (TERMINAL.indexOf(stage.state) >= 0) { return "–"; }
    if (stage.seconds === null) { return "running"; }
    return duration(stage.seconds);
  }
  function when(iso) { return iso.replace("T", " ").replace(/\.\d+/, "").replace(/(\+00:00|Z)$/, " UTC"); }
  function cell(row, label, text, cls) {
    var td = document.createElement("td");
    td.dataset.label = label;
    td.textContent = text;
    if (cls) { td.className = cls; }
    row.appendChild(td);
  }

  function show(job) {
    var state = document.getElementById("job-state");
    state.textContent = job.state;
    state.className = "state state-" + job.state;
    if (TERMINAL.indexOf(job.state) < 0) {
      document.getElementById("job-state-words").textContent = job.state === "queued"
        ? "This retro test is waiting in the queue."
        : "This retro test is running: " + label(job.state).toLowerCase() + ".";
    }
    var p = job.progress;
    var pct = p.percent || 0;
    document.getElementById("job-progress").value = pct;
    document.getElementById("job-progress-text").textContent =
      pct.toFixed(1) + "% · " + num(p.rows_scored + p.rows_rejected) + " of " + num(p.rows_total) + " rows";
    document.getElementById("job-activity").textContent = p.activity.charAt(0).toUpperCase() + p.activity.slice(1);
    var pace = duration(p.elapsed_s) + " elapsed";
    if (p.rows_per_s) { pace += ", " + Math.round(p.rows_per_s).toLocaleString("en-US") + " rows/s"; }
    if (p.eta_s !== null && p.eta_s !== undefined) { pace += ", about " + duration(p.eta_s) + " left"; }
    document.getElementById("job-rate").textContent = pace;
    var body = document.getElementById("stages");
    body.textContent = "";
    job.stages.forEach(function (stage) {
      var tr = document.createElement("tr");
      cell(tr, "Stage", label(stage.state) + (stage.attempt > 1 ? " (attempt " + stage.attempt + ")" : ""));
      cell(tr, "Started", when(stage.started_at));
      cell(tr, "Took", took(stage), "num");
      body.appendChild(tr);
    });
    var err = document.getElementById("job-error");
    if (job.error) {
      err.textContent = job.state + ": " + job.error.message + " (" + job.error.code + ")";
      err.hidden = false;
    }
  }

  function ended() { window.location.reload(); }  // once, to show the result files and the link form

  // Polling: only where server-sent events are not available (an old browser, a proxy that refuses the stream).
  function poll() {
    fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) {
        if (r.status === 401) { throw new Error("signed out"); }
        return r.json();
      })
      .then(function (job) {
        show(job);
        if (TERMINAL.indexOf(job.state) >= 0) {
          ended();
        } else {
          window.setTimeout(poll, 1000);
        }
      })
      .catch(function () { window.setTimeout(poll, 5000); });
  }

  // Pushed updates: the server sends the job's view whenever it changes, from one shared query per API process.
  // EventSource reconnects by itself after a dropped connection; a refused stream (an error status) closes it,
  // and the page then polls instead.
  function listen() {
    var source = new EventSource(url + "/events");
    root.dataset.live = "connecting";
    source.addEventListener("open", function () { root.dataset.live = "events"; });
    source.addEventListener("job", function (event) { show(JSON.parse(event.data)); });
    source.addEventListener("end", function () { source.close(); ended(); });
    source.addEventListener("error", function () {
      if (source.readyState === EventSource.CLOSED) {
        root.dataset.live = "polling";
        window.setTimeout(poll, 1000);
      }
    });
  }
  if (window.EventSource) {
    listen();
  } else {
    root.dataset.live = "polling";
    window.setTimeout(poll, 1000);
  }
})();
