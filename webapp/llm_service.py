"""The LLM extension: one client per app (built from the configuration) and a short cache of the
model list, so page loads do not hammer the model server. webapp/llm.py stays free of Flask."""
import time

from flask import current_app

from . import llm


class LLMService:
    def init_app(self, app):
        app.extensions["llm"] = _State(app.config)

    @staticmethod
    def _state():
        return current_app.extensions["llm"]

    @property
    def client(self):
        return self._state().client

    def list_models(self):
        """Models from the LLM server, cached for MODELS_CACHE_SECONDS (per process)."""
        state = self._state()
        if state.models is not None and time.monotonic() - state.fetched < current_app.config["MODELS_CACHE_SECONDS"]:
            return state.models
        state.models, state.fetched = state.client.list_models(), time.monotonic()
        return state.models

    def health(self):
        """The LLM server's health, cached like the model list (readiness and the header badge
        ask often; the answer changes rarely). An error is not cached."""
        state = self._state()
        if state.health is not None and time.monotonic() - state.checked < current_app.config["MODELS_CACHE_SECONDS"]:
            return state.health
        state.health, state.checked = state.client.health(), time.monotonic()
        return state.health


class _State:
    """Built on first use, so the configuration is read as it stands once the app is serving."""

    def __init__(self, config):
        self.config, self._client, self.models, self.fetched = config, None, None, 0.0
        self.health, self.checked = None, 0.0

    @property
    def client(self):
        if self._client is None:
            self._client = llm.client_from_config(self.config)
        return self._client
