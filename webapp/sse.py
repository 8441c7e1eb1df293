"""Server-Sent Events: the one stream format, for API clients and the browser alike."""
import json

from flask import Response, stream_with_context


def event(name, data):
    """One SSE frame. JSON keeps newlines in data escaped, so a frame is always one data line."""
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


PING = ": ping\n\n"


def response(frames):
    return Response(stream_with_context(frames), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
