// A WHATWG EventSource client (npm `eventsource`) following one answer through tests/test_sse_resume.py.
// argv: <url of GET …/messages/<mid>/stream on server A> <base url of server B> <bearer token> <cut after N tokens>
// The first connection is cut (its body errors) after N token events; EventSource reconnects by itself
// with Last-Event-ID, and the reconnect is sent to server B (another worker). After `done` the server
// closes the stream, EventSource reconnects again with the final id, gets 204 and stops for good.
// Prints one JSON line: the tokens, the events' ids, every request (url, Last-Event-ID, status).
import { EventSource } from "eventsource";

const [url, otherBase, token, cutAfter] = process.argv.slice(2);
const requests = [];
let tokensOnFirst = 0;

function cutting(response, after) {
  // Pass the body through until `after` token events went by, then fail like a dropped connection.
  const reader = response.body.getReader();
  const body = new ReadableStream({
    async pull(controller) {
      if (tokensOnFirst >= after) { controller.error(new Error("connection cut by the test")); return; }
      const { value, done } = await reader.read();
      if (done) { controller.close(); return; }
      controller.enqueue(value);
    },
    cancel() { reader.cancel(); },
  });
  return new Response(body, { status: response.status, headers: response.headers });
}

async function fetchVia(input, init) {
  const headers = { ...(init.headers || {}), Authorization: "Bearer " + token };
  let target = String(input);
  if (requests.length > 0) {  // every reconnect goes to the other server
    const u = new URL(target);
    target = otherBase + u.pathname + u.search;
  }
  const response = await fetch(target, { ...init, headers });
  requests.push({ url: target, lastEventId: headers["Last-Event-ID"] || headers["last-event-id"] || null,
                  status: response.status, type: response.headers.get("content-type") });
  return requests.length === 1 ? cutting(response, Number(cutAfter)) : response;
}

const source = new EventSource(url, { fetch: fetchVia });
const out = { tokens: [], ids: [], events: [], final: null, errors: 0 };
source.addEventListener("token", (event) => {
  out.tokens.push(JSON.parse(event.data).text);
  out.ids.push(event.lastEventId);
  if (requests.length === 1) { tokensOnFirst += 1; }
});
for (const name of ["start", "done", "failed"]) {
  source.addEventListener(name, (event) => {
    out.events.push([name, event.lastEventId]);
    if (name !== "start") { out.final = JSON.parse(event.data); }
  });
}
source.addEventListener("error", () => {
  out.errors += 1;
  if (source.readyState === source.CLOSED) { finish(); }
});
const timer = setTimeout(() => { out.timeout = true; finish(); }, 30000);

function finish() {
  clearTimeout(timer);
  source.close();
  out.requests = requests;
  process.stdout.write(JSON.stringify(out) + "\n");
  process.exit(0);
}
