// The job page: a new partner link's copy button; Cancel asks first.
(function () {
  "use strict";
  var copy = document.getElementById("copy-link");
  if (copy) {
    copy.addEventListener("click", function () {
      var field = document.getElementById(copy.dataset.copies);
      var status = document.getElementById("copy-link-status");
      field.select();
      var byHand = copy.dataset.copyByHand || "Select the link and copy it with Ctrl+C.";
      function done() { status.textContent = copy.dataset.copied || "Copied."; }
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(field.value).then(done, function () {
          status.textContent = byHand;
        });
      } else {
        // Plain http outside localhost has no Clipboard API: the older command still copies the selection.
        if (document.execCommand("copy")) { done(); } else { status.textContent = byHand; }
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
  // The page's words (data-messages, in its language); {name} fields are filled in here.
  var M = JSON.parse(root.dataset.messages || "{}");
  function t(key, english, fields) {
    var text = M[key] || english;
    Object.keys(fields || {}).forEach(function (name) { text = text.split("{" + name + "}").join(fields[name]); });
    return text;
  }
  function label(state) { return LABELS[state] || state; }
  function stateName(state) { return (M.states || {})[state] || state; }

  function num(n) { return n === null || n === undefined ? "?" : n.toLocaleString("en-US"); }
  function duration(seconds) {
    if (seconds < 60) { return t("seconds", "{seconds} s", { seconds: seconds.toFixed(1) }); }
    var s = Math.round(seconds);
    return t("minutes", "{minutes} min {seconds} s", { minutes: Math.floor(s / 60), seconds: s % 60 });
  }
  function took(stage) {
    if (TERMINAL.indexOf(stage.state) >= 0) { return "–"; }
    if (stage.seconds === null) { return t("still_running", "running"); }
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
    state.textContent = stateName(job.state);
    state.className = "state state-" + job.state;
    if (TERMINAL.indexOf(job.state) < 0) {
      document.getElementById("job-state-words").textContent = job.state === "queued"
        ? t("queued", "This retro test is waiting in the queue.")
        : t("running", "This retro test is running: {stage}.", { stage: label(job.state).toLowerCase() });
    }
    var p = job.progress;
    var pct = p.percent || 0;
    document.getElementById("job-progress").value = pct;
    document.getElementById("job-progress-text").textContent =
      pct.toFixed(1) + "% · " + t("rows", "{done} of {total} rows", { done: num(p.rows_scored + p.rows_rejected), total: num(p.rows_total) });
    document.getElementById("job-activity").textContent = p.activity.charAt(0).toUpperCase() + p.activity.slice(1);
    var pace = t("elapsed", "{time} elapsed", { time: duration(p.elapsed_s) });
    if (p.rows_per_s) { pace += ", " + t("rate", "{rate} rows/s", { rate: Math.round(p.rows_per_s).toLocaleString("en-US") }); }
    if (p.eta_s !== null && p.eta_s !== undefined) { pace += ", " + t("left", "about {time} left", { time: duration(p.eta_s) }); }
    document.getElementById("job-rate").textContent = pace;
    var body = document.getElementById("stages");
    body.textContent = "";
    job.stages.forEach(function (stage) {
      var tr = document.createElement("tr");
      cell(tr, t("stage", "Stage"), label(stage.state) + (stage.attempt > 1 ? " " + t("attempt", "(attempt {n})", { n: stage.attempt }) : ""));
      cell(tr, t("started", "Started"), when(stage.started_at));
      cell(tr, t("took", "Took"), took(stage), "num");
      body.appendChild(tr);
    });
    (job.models || []).forEach(function (m) {  // a comparison: each model's rows, as its chunks are committed
      var scored = document.getElementById("model-" + m.position + "-scored");
      var refused = document.getElementById("model-" + m.position + "-rejected");
      if (scored) { scored.textContent = num(m.rows_scored); }
      if (refused) { refused.textContent = num(m.rows_rejected); }
    });
    var err = document.getElementById("job-error");
    if (job.error) {
      err.textContent = stateName(job.state) + ": " + job.error.message + " (" + job.error.code + ")";
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
