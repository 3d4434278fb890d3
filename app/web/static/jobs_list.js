// The job list reloads itself every few seconds while a job on it is still running (data-refresh-s on the table).
(function () {
  "use strict";
  var table = document.getElementById("jobs");
  var seconds = table ? Number(table.dataset.refreshS) : 0;
  if (seconds > 0) { window.setTimeout(function () { window.location.reload(); }, seconds * 1000); }
})();
