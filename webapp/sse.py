"""Server-Sent Events: the one stream format, for API clients and the browser alike.

Every event of an answer stream carries `id:` = the answer's character offset after the event, so a
client that reconnects with `Last-Event-ID` (the header EventSource sends by itself, or a
`last_event_id` query parameter for clients that cannot set headers) continues exactly there.
`retry:` is sent once, with the first event."""
import json

from flask import Response, request, stream_with_context

from .errors import ServiceError

RETRY_MS = 2000  # how long an EventSource waits before reconnecting after a dropped connection
PING = ": ping\n\n"


def event(name, data, id=None, retry=None):
    """One SSE frame. JSON keeps newlines in data escaped, so a frame is always one data line."""
    head = (f"retry: {retry}\n" if retry is not None else "") + (f"id: {id}\n" if id is not None else "")
    return f"{head}event: {name}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def last_event_id():
    """The offset a reconnecting client has: `Last-Event-ID`, else `?last_event_id=`; None on a first attach.
    Anything but a non-negative integer (our ids) is a 400: it cannot be resumed exactly."""
    raw = request.headers.get("Last-Event-ID")
    if raw is None:
        raw = request.args.get("last_event_id")
    if raw is None or raw.strip() == "":
        return None
    raw = raw.strip()
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 12):
        raise ServiceError(400, "invalid_last_event_id",
                           "Last-Event-ID must be an id this stream sent (a character offset)", "last_event_id")
    return int(raw)


def response(frames):
    return Response(stream_with_context(frames), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def at_end(message_is_final, length, since):
    """A reconnect (not a first attach) whose offset is already at the end of a finished answer."""
    return since is not None and message_is_final and since >= length


def finished():
    """204 with no body and no content type: the client already has the whole (finished) answer, and
    an EventSource that gets a 204 stops reconnecting."""
    resp = Response(status=204)
    resp.headers.pop("Content-Type", None)
    return resp
