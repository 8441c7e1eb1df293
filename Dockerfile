# llm_api_assistant: Flask app on gunicorn. Build: docker build -t llm-api-assistant .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    FLASK_APP=webapp

WORKDIR /app

# Dependencies in their own layer: code changes do not reinstall them.
COPY requirements.txt .
RUN pip install -r requirements.txt

RUN useradd --create-home --uid 10001 app
COPY --chown=app:app webapp ./webapp
COPY --chown=app:app templates ./templates
COPY --chown=app:app static ./static
COPY --chown=app:app migrations ./migrations
RUN mkdir -p instance && chown app:app instance

USER app
EXPOSE 8000
# Readiness (database reachable, migrations at head; never the LLM): 503 makes urlopen raise.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=3)"

# Upgrade the schema, then hand PID 1 to gunicorn so it gets the stop signal.
CMD ["sh", "-c", "flask db upgrade && exec gunicorn -c webapp/gunicorn_conf.py 'webapp:create_app()'"]
