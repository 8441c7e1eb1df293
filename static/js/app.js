// The little JavaScript htmx cannot do: follow streaming answers (SSE), the composer's keys,
// keeping the view at the newest text, copy buttons on code, the phone-width sidebar toggle.
// No inline scripts anywhere: the Content-Security-Policy forbids them.
(function () {
  "use strict";

  var streams = {};

  function scroller() { return document.getElementById("scroller"); }

  // Follow new text only when the reader is already at the bottom (they may have scrolled up to read).
  function nearBottom() {
    var s = scroller();
    return !s || s.scrollHeight - s.scrollTop - s.clientHeight < 80;
  }

  function toBottom() {
    var s = scroller();
    if (s) { s.scrollTop = s.scrollHeight; }
  }

  function anyStreaming() {
    return document.querySelector("article.message[data-stream-url]") !== null;
  }

  function setBusy(busy) {
    var send = document.getElementById("send");
    if (send) { send.disabled = busy; }
    var form = document.getElementById("composer");
    if (form) { form.classList.toggle("busy", busy); }
  }

  function addCopyButtons(root) {
    root.querySelectorAll(".markdown pre").forEach(function (pre) {
      if (pre.querySelector(".copy-code")) { return; }
      var button = document.createElement("button");
      button.type = "button";
      button.className = "copy-code small";
      button.textContent = "Copy";
      button.setAttribute("aria-label", "Copy code");
      pre.appendChild(button);
    });
  }

  // Server-Sent Events: "html" carries the whole answer so far (rendered and sanitized on the
  // server), "done" the final message. A reconnect replays from the start, so we replace, not append.
  function follow(article) {
    var url = article.getAttribute("data-stream-url");
    if (!url || streams[article.id]) { return; }
    var source = new EventSource(url);
    streams[article.id] = source;
    setBusy(true);
    source.addEventListener("html", function (event) {
      var stick = nearBottom();
      article.querySelector(".text").innerHTML = JSON.parse(event.data).html;
      addCopyButtons(article);
      if (stick) { toBottom(); }
    });
    source.addEventListener("done", function (event) {
      var stick = nearBottom();
      source.close();
      delete streams[article.id];
      var template = document.createElement("template");
      template.innerHTML = JSON.parse(event.data).html.trim();
      var fresh = template.content.firstElementChild;
      article.replaceWith(fresh);
      if (window.htmx) { window.htmx.process(fresh); }
      addCopyButtons(fresh);
      setBusy(anyStreaming());
      if (stick) { toBottom(); }
    });
  }

  function activate(root) {
    root.querySelectorAll("article.message[data-stream-url]").forEach(follow);
    addCopyButtons(root);
  }

  document.addEventListener("click", function (event) {
    var copy = event.target.closest(".copy-code");
    if (copy) {
      var code = copy.parentElement.querySelector("code");
      navigator.clipboard.writeText(code ? code.innerText : "").then(function () {
        copy.textContent = "Copied";
        setTimeout(function () { copy.textContent = "Copy"; }, 1500);
      });
      return;
    }
    var toggle = event.target.closest(".sidebar-toggle");
    if (toggle) {
      var open = document.body.classList.toggle("sidebar-open");
      toggle.setAttribute("aria-expanded", open ? "true" : "false");
    }
  });

  // Enter sends, Shift+Enter adds a line (and never while an IME is composing text).
  document.addEventListener("keydown", function (event) {
    if (event.target.id !== "prompt" || event.key !== "Enter" || event.shiftKey || event.isComposing) { return; }
    event.preventDefault();
    var send = document.getElementById("send");
    if (send && !send.disabled && event.target.value.trim()) { event.target.form.requestSubmit(); }
  });

  document.addEventListener("htmx:afterRequest", function (event) {
    var form = event.detail.elt;
    if (!form || form.id !== "composer") { return; }
    var failed = !event.detail.successful || (event.detail.target && event.detail.target.id === "composer-error");
    if (!failed) {
      form.querySelector("#prompt").value = "";
      document.getElementById("composer-error").textContent = "";
      var empty = document.querySelector("#messages > .empty");
      if (empty) { empty.remove(); }
      toBottom();
    }
  });

  document.addEventListener("htmx:responseError", function (event) {
    var slot = document.getElementById("composer-error");
    if (slot) { slot.textContent = "That didn't work (error " + event.detail.xhr.status + "). Your text is kept; try again."; }
  });

  document.addEventListener("htmx:sendError", function () {
    var slot = document.getElementById("composer-error");
    if (slot) { slot.textContent = "The server can't be reached. Your text is kept; try again."; }
  });

  document.addEventListener("DOMContentLoaded", function () {
    activate(document);
    toBottom();
    if (window.htmx) { window.htmx.onLoad(function (elt) { activate(elt); }); }
    document.documentElement.setAttribute("data-js-ready", "");  // for tests: handlers are in place
  });
})();
