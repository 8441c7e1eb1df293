// Starts Swagger UI on /docs (a file, not an inline script: the page's CSP allows scripts only from here).
// validatorUrl null: the document is never sent to swagger.io's online validator.
window.addEventListener("DOMContentLoaded", function () {
  var root = document.getElementById("swagger-ui");
  window.ui = window.SwaggerUIBundle({
    url: root.dataset.specUrl,
    domNode: root,
    validatorUrl: null,
    deepLinking: true,
    persistAuthorization: false,
    tryItOutEnabled: false,
  });
});
