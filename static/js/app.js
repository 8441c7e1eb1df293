// The little JavaScript htmx cannot do: follow streaming answers (SSE), the composer's keys,
// keeping the view at the newest text, copy buttons on code, the phone-width sidebar.
// No inline scripts anywhere: the Content-Security-Policy forbids them. Everything here is an
// enhancement: without JavaScript every form still posts and the answer shows after a reload.
(function () {
  "use strict";

  var streams = {};  // article id -> EventSource

  function byId(id) { return document.getElementById(id); }

  // Follow new text only when the reader is already at the bottom (they may have scrolled up to read).
  function nearBottom() {
    var s = byId("scroller");
    return !s || s.scrollHeight - s.scrollTop - s.clientHeight < 80;
  }

  function toBottom() {
    var s = byId("scroller");
    if (s) { s.scrollTop = s.scrollHeight; }
  }

  function announce(text) {
    var slot = byId("announcer");
    if (slot) { slot.textContent = text; }
  }

  function composerError(text) {
    var slot = byId("composer-error");
    if (slot) { slot.textContent = text; }
  }

  // One turn at a time per conversation: Send is off while any answer on the page is streaming.
  // The textarea stays usable so the next question can be written meanwhile.
  function setBusy(busy) {
    var send = byId("send");
    if (send) { send.disabled = busy; }
    var form = byId("composer");
    if (form) { form.classList.toggle("busy", busy); }
  }

  function anyStreaming() {
    return document.querySelector("article.message[data-stream-url]") !== null;
  }

  // Only the newest answer offers Retry/Regenerate (the server would regenerate the newest turn).
  function pruneOldRetries() {
    var articles = document.querySelectorAll("#messages article.message");
    for (var i = 0; i < articles.length - 1; i++) {
      var form = articles[i].querySelector("form.regenerate");
      if (form) { form.remove(); }
    }
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

  function fragment(html) {
    var template = document.createElement("template");
    template.innerHTML = html.trim();
    return template.content.firstElementChild;
  }

  // The answer's sidebar entry, fresh from the server ("answering…", message count): it replaces the
  // old entry and goes to the top, as the newest conversation. A filtered list (search) only gets
  // it if it was already showing it.
  function placeItem(html) {
    var list = byId("conversation-list");
    var item = html && fragment(html);
    if (!list || !item) { return; }
    var old = byId(item.id);
    var search = document.querySelector("#sidebar input[type=search]");
    if (!old && search && search.value.trim()) { return; }
    if (old) { old.remove(); }
    var empty = list.querySelector(".empty-list");
    if (empty) { empty.remove(); }
    list.insertBefore(item, list.firstElementChild);
  }

  // Call after the article left the streaming state (replaced, removed, or marked failed).
  function finish(article, source) {
    source.close();
    delete streams[article.id];
    setBusy(anyStreaming());
  }

  // Server-Sent Events from /c/<id>/m/<message id>/events:
  //   "html" - the whole answer so far, rendered and sanitized on the server (always the whole
  //            text, also after a reconnect, so we replace the text, never append);
  //   "queued" - its place in the model's queue, while it waits (see below);
  //   "done" - the final message fragment (stats, or the failure in words, and Retry);
  //   "gone" - the conversation was deleted meanwhile.
  // Each event's id is the answer's offset; after a dropped connection the browser reconnects with
  // Last-Event-ID by itself. A reconnect that was already at the end of a finished answer gets 204
  // (EventSource then closes): attach once more afresh, which replays the final "done" fragment.
  function follow(article, again) {
    var url = article.getAttribute("data-stream-url");
    if (!url || (streams[article.id] && !again)) { return; }
    var source = new EventSource(url);
    var first = !again, seen = false;  // seen: an event came, so a later 204 means "finished"
    streams[article.id] = source;
    setBusy(true);
    source.addEventListener("html", function (event) {
      seen = true;
      var stick = nearBottom();
      var text = article.querySelector(".text");
      if (text) { text.innerHTML = JSON.parse(event.data).html; }
      addCopyButtons(article);
      if (stick) { toBottom(); }
    });
    // "queued" - the answer waits for the model; position 1 is next in line.
    source.addEventListener("queued", function (event) {
      var ahead = JSON.parse(event.data).position - 1;
      var working = article.querySelector(".working");
      if (working) {
        working.textContent = ahead > 0 ? "Waiting for the model: " + ahead + " ahead of you…"
                                        : "Waiting for the model: you are next…";
      }
    });
    source.addEventListener("html", function (event) {
      var working = article.querySelector(".working");
      if (working && working.textContent !== "Answering…") { working.textContent = "Answering…"; }
    });
    source.addEventListener("item", function (event) {
      seen = true;
      placeItem(JSON.parse(event.data).html);
    });
    source.addEventListener("done", function (event) {
      var stick = nearBottom();
      var data = JSON.parse(event.data);
      placeItem(data.item);
      var fresh = fragment(data.html);
      article.replaceWith(fresh);
      finish(article, source);
      if (window.htmx) { window.htmx.process(fresh); }
      addCopyButtons(fresh);
      var problem = fresh.querySelector(".message-footer .error");
      announce(problem ? problem.textContent : (data.status === "cancelled" ? "Answer stopped." : "Answer finished."));
      if (stick) { toBottom(); }
    });
    source.addEventListener("gone", function () {
      article.remove();
      finish(article, source);
    });
    // Network trouble: EventSource reconnects by itself (with Last-Event-ID). A refusal (signed
    // out, 404) closes it for good: say so rather than showing "Answering…" forever.
    source.addEventListener("error", function () {
      if (source.readyState !== EventSource.CLOSED) { return; }
      if (first && seen) {  // it had been streaming: the 204 of a finished answer
        source.close();
        follow(article, true);
        return;
      }
      article.removeAttribute("data-stream-url");
      article.removeAttribute("aria-busy");
      finish(article, source);
      var working = article.querySelector(".working");
      if (working) {
        working.className = "error";
        working.textContent = "Lost the connection to this answer. Reload the page to see it.";
      }
    });
  }

  function activate(root) {
    if (root.matches && root.matches("template.sidebar-item")) {
      placeItem(root.innerHTML);
      root.remove();
      return;
    }
    if (root.matches && root.matches("article.message[data-stream-url]")) { follow(root); }
    root.querySelectorAll("article.message[data-stream-url]").forEach(follow);
    addCopyButtons(root);
  }

  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) { return navigator.clipboard.writeText(text); }
    // Plain http on a LAN has no clipboard API: fall back to a selected, off-screen textarea.
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.appendChild(area);
    area.select();
    var ok = document.execCommand("copy");
    area.remove();
    return ok ? Promise.resolve() : Promise.reject(new Error("copy failed"));
  }

  function setSidebar(open) {
    document.body.classList.toggle("sidebar-open", open);
    var toggle = document.querySelector(".sidebar-toggle");
    if (toggle) {
      toggle.setAttribute("aria-expanded", open ? "true" : "false");
      toggle.setAttribute("aria-label", open ? "Hide conversations" : "Show conversations");
    }
    if (open) {
      var search = byId("search");
      if (search) { search.focus(); }
    }
  }

  document.addEventListener("click", function (event) {
    var copy = event.target.closest(".copy-code");
    if (copy) {
      var code = copy.parentElement.querySelector("code");
      copyText(code ? code.innerText : "").then(function () {
        copy.textContent = "Copied";
      }, function () {
        copy.textContent = "Copy failed";
      }).then(function () {
        setTimeout(function () { copy.textContent = "Copy"; }, 1500);
      });
      return;
    }
    if (event.target.closest(".sidebar-toggle")) {
      setSidebar(!document.body.classList.contains("sidebar-open"));
      return;
    }
    // A click outside the open phone sidebar closes it.
    if (document.body.classList.contains("sidebar-open") && !event.target.closest("#sidebar")) {
      setSidebar(false);
    }
  });

  document.addEventListener("keydown", function (event) {
    if (event.key === "Escape" && document.body.classList.contains("sidebar-open")) {
      setSidebar(false);
      var toggle = document.querySelector(".sidebar-toggle");
      if (toggle) { toggle.focus(); }
      return;
    }
    // Enter sends, Shift+Enter adds a line (and never while an IME is composing text).
    if (event.target.id !== "prompt" || event.key !== "Enter" || event.shiftKey || event.isComposing) { return; }
    event.preventDefault();
    var send = byId("send");
    if (send && !send.disabled && event.target.value.trim()) { event.target.form.requestSubmit(); }
  });

  // With htmx the search box filters as you type; the form's own submit is only for no-JS use.
  document.addEventListener("submit", function (event) {
    if (window.htmx && event.target.classList.contains("search-form")) { event.preventDefault(); }
  });

  // Drafts: what is typed in the composer is kept in this browser per conversation (and for a new
  // chat) until it is sent, so a reload, a crash or a wander to another chat loses nothing.
  function draftKey(form) {
    return "draft:" + (form.getAttribute("action") || location.pathname);
  }

  function storage() {
    try { return window.localStorage; } catch (e) { return null; }  // private modes may refuse it
  }

  function restoreDraft() {
    var prompt = byId("prompt"), store = storage();
    if (!prompt || !store) { return; }
    var saved = store.getItem(draftKey(prompt.form));
    if (saved && !prompt.value) { prompt.value = saved; }
  }

  document.addEventListener("input", function (event) {
    var store = storage();
    if (event.target.id !== "prompt" || !store) { return; }
    var key = draftKey(event.target.form);
    try {
      if (event.target.value) { store.setItem(key, event.target.value); } else { store.removeItem(key); }
    } catch (e) { /* storage full: the draft is simply not kept */ }
  });

  // Sending drops the draft at once (a new chat's answer is a redirect, after which this page's
  // handlers never run); a send that fails puts it back, since the text is still in the box.
  function forgetDraft(form) {
    var store = storage();
    if (store) { store.removeItem(draftKey(form)); }
  }

  function keepDraft(form) {
    var store = storage(), prompt = form.querySelector("#prompt");
    if (!store || !prompt || !prompt.value) { return; }
    try { store.setItem(draftKey(form), prompt.value); } catch (e) { /* storage full */ }
  }

  document.addEventListener("htmx:beforeRequest", function (event) {
    if (event.detail.elt && event.detail.elt.id === "composer") {
      setBusy(true);  // no double send while the POST is on its way
      composerError("");
      forgetDraft(event.detail.elt);
    }
  });

  document.addEventListener("htmx:afterRequest", function (event) {
    var form = event.detail.elt;
    if (!form || form.id !== "composer") { return; }
    var xhr = event.detail.xhr;
    // A new chat answers with HX-Redirect: the page is going away (htmx leaves `successful` unset).
    if (xhr && xhr.status < 400 && xhr.getResponseHeader("HX-Redirect")) { return; }
    var failed = !event.detail.successful || (event.detail.target && event.detail.target.id === "composer-error");
    if (failed) {
      setBusy(anyStreaming());  // the text stays in the box for another try
      keepDraft(form);
      return;
    }
    form.querySelector("#prompt").value = "";
    var empty = document.querySelector("#messages > .empty");
    if (empty) { empty.remove(); }
    pruneOldRetries();
    toBottom();
  });

  // htmx does not swap error answers; show the server's words (plain text) or a generic line.
  document.addEventListener("htmx:responseError", function (event) {
    var xhr = event.detail.xhr;
    var type = xhr.getResponseHeader("Content-Type") || "";
    var words = type.indexOf("text/plain") === 0 && xhr.responseText.length < 500 ? xhr.responseText : "";
    composerError((words || "That didn't work (error " + xhr.status + ").") + " Your text is kept; try again.");
  });

  document.addEventListener("htmx:sendError", function () {
    composerError("The server can't be reached. Your text is kept; try again.");
  });

  document.addEventListener("DOMContentLoaded", function () {
    activate(document);
    restoreDraft();
    toBottom();
    if (window.htmx) { window.htmx.onLoad(function (elt) { activate(elt); }); }
    document.documentElement.setAttribute("data-js-ready", "");  // for tests: handlers are in place
  });
})();
