// Fill "Version or alias" for the chosen model from a small JSON endpoint. Without JS the server fills it on submit.
(function () {
  "use strict";
  var model = document.getElementById("model_name");
  var ref = document.getElementById("model_ref");
  if (!model || !ref) { return; }

  function setOptions(groups, keep) {
    ref.textContent = "";
    if (!groups.length) {
      var none = document.createElement("option");
      none.value = "";
      none.textContent = model.value ? (ref.dataset.noVersions || "This model has no versions") : (ref.dataset.chooseModel || "Choose a model first");
      ref.appendChild(none);
      return;
    }
    groups.forEach(function (group) {
      var og = document.createElement("optgroup");
      og.label = group.label;
      group.options.forEach(function (o) {
        var opt = document.createElement("option");
        opt.value = o.value;
        opt.textContent = o.label;
        if (o.value === keep) { opt.selected = true; }
        og.appendChild(opt);
      });
      ref.appendChild(og);
    });
  }

  function showHistory(text) {
    var hint = document.getElementById("history-hint");
    if (hint) { hint.textContent = text; }
  }

  function load() {
    var keep = ref.value;
    if (!model.value) { setOptions([], keep); return; }
    ref.setAttribute("aria-busy", "true");
    fetch(model.dataset.optionsUrl + "?model=" + encodeURIComponent(model.value), {
      credentials: "same-origin",
      headers: { "Accept": "application/json" }
    })
      .then(function (r) { return r.ok ? r.json() : { groups: [] }; })
      .then(function (body) { setOptions(body.groups || [], keep); showHistory(body.history || ""); })
      .catch(function () { setOptions([], keep); showHistory(""); })
      .finally(function () { ref.removeAttribute("aria-busy"); });
  }

  model.addEventListener("change", load);
  if (model.value && ref.options.length <= 1 && !ref.value) { load(); }

  var summary = document.getElementById("error-summary");
  if (summary) { summary.focus(); }
})();
