// lamina console: live state without reloads.
//
// A page whose <main> has data-live="URL" polls that URL every 2 s while it is visible.
// The answer is {"fields": {name: text}, "rows": {key: {name: text}}, "keys": [key...]}:
// each text goes into the elements marked data-field="name" (inside the row marked
// data-key="key" for rows), always as textContent, so nothing from the server is ever
// parsed as markup. When "keys" differs from the rows on the page, a notice offers a reload.
(function () {
  "use strict";

  var PERIOD = 2000;
  var main = document.querySelector("main[data-live]");
  if (!main) {
    return;
  }
  var url = main.getAttribute("data-live");

  function put(el, value) {
    var text = value === null || value === undefined ? "—" : String(value);
    if (el.textContent !== text) {
      el.textContent = text;
      el.classList.remove("updated");
      void el.offsetWidth; // restart the highlight animation
      el.classList.add("updated");
    }
    el.setAttribute("data-value", text);
  }

  function inRow(el) {
    var row = el.closest("[data-key]");
    return row !== null && main.contains(row);
  }

  function apply(data) {
    var fields = data.fields || {};
    Object.keys(fields).forEach(function (name) {
      main.querySelectorAll('[data-field="' + name + '"]').forEach(function (el) {
        if (!inRow(el)) {
          put(el, fields[name]);
        }
      });
    });
    var rows = data.rows || {};
    main.querySelectorAll("[data-key]").forEach(function (row) {
      var values = rows[row.getAttribute("data-key")];
      if (!values) {
        return;
      }
      Object.keys(values).forEach(function (name) {
        row.querySelectorAll('[data-field="' + name + '"]').forEach(function (el) {
          put(el, values[name]);
        });
      });
    });
    var notice = document.getElementById("changed");
    if (notice && Array.isArray(data.keys)) {
      var shown = [];
      main.querySelectorAll("tbody [data-key]").forEach(function (row) {
        shown.push(row.getAttribute("data-key"));
      });
      notice.hidden = shown.join("\n") === data.keys.join("\n");
    }
    main.setAttribute("data-updated", String(Date.now()));
  }

  function poll() {
    if (document.hidden) {
      setTimeout(poll, PERIOD);
      return;
    }
    fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" })
      .then(function (response) {
        if (response.status === 401) {
          window.location.assign("/login");
          return null;
        }
        return response.ok ? response.json() : null;
      })
      .then(function (data) {
        if (data) {
          apply(data);
        }
      })
      .catch(function () {
        // the manager is restarting: try again on the next tick
      })
      .then(function () {
        setTimeout(poll, PERIOD);
      });
  }

  setTimeout(poll, PERIOD);
})();

// The machines list: the header's box selects every machine on the page for a bulk action.
(function () {
  "use strict";

  var all = document.getElementById("select-all");
  if (!all) {
    return;
  }
  all.addEventListener("change", function () {
    document.querySelectorAll('input[name="names"]').forEach(function (box) {
      box.checked = all.checked;
    });
  });
})();
