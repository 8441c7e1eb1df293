"""Model output is untrusted: every hostile case comes out inert."""
from html.parser import HTMLParser

import pytest

from webapp.markdown import render

HOSTILE = {
    "script tag": "<script>alert(1)</script>",
    "onerror image": '<img src=x onerror="alert(1)">',
    "javascript link": "[click](javascript:alert(1))",
    "javascript link, odd case": "[click](JaVaScRiPt:alert(1))",
    "javascript autolink": "<javascript:alert(1)>",
    "data link": "[x](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "vbscript link": "[x](vbscript:msgbox)",
    "raw anchor": '<a href="javascript:alert(1)">x</a>',
    "iframe": '<iframe src="https://evil.example"></iframe>',
    "style": "<style>body{display:none}</style>",
    "svg": '<svg onload="alert(1)"></svg>',
    "event attribute in html block": '<div onclick="alert(1)">hi</div>',
}


class Elements(HTMLParser):
    """What a browser would build from the HTML: tag names and their attributes."""

    def __init__(self, html):
        super().__init__()
        self.found = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, dict(attrs)))


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_input_is_inert(name):
    for tag, attrs in Elements(str(render(HOSTILE[name]))).found:
        assert tag in {"p", "a", "code", "pre"}, (name, tag)
        assert not any(attr.startswith("on") for attr in attrs), (name, attrs)
        href = attrs.get("href", "https:").strip().lower()
        assert href.startswith(("https:", "http:", "mailto:")), (name, href)


def test_remote_images_become_links_not_loads():
    html = str(render("![secret chart](https://tracker.example/pixel.png?chat=secret)"))
    assert "<img" not in html
    assert '<a href="https://tracker.example/pixel.png?chat=secret" rel="noopener noreferrer nofollow">' in html
    assert "[image: secret chart]" in html


def test_safe_markdown_survives():
    html = str(render("# Title\n\n**bold**, *it*, `code`, ~~old~~\n\n- a\n- b\n\n> quote\n\n[site](https://example.org)"))
    for piece in ("<h1>Title</h1>", "<strong>bold</strong>", "<em>it</em>", "<code>code</code>", "<s>old</s>",
                  "<li>a</li>", "<blockquote>", 'href="https://example.org"'):
        assert piece in html


def test_code_is_highlighted_on_the_server():
    html = str(render("```python\ndef f():\n    return 1\n```"))
    assert '<pre><code class="language-python">' in html
    assert '<span class="k">def</span>' in html


def test_code_without_language_is_escaped_text():
    html = str(render("```\n<b>not bold</b>\n```"))
    assert "&lt;b&gt;not bold&lt;/b&gt;" in html and "<b>" not in html


def test_tables_and_line_breaks():
    html = str(render("| a | b |\n|---|---|\n| 1 | 2 |\n\nline one\nline two"))
    assert "<table>" in html and "<td>1</td>" in html and "<br>" in html
    assert "style=" not in html  # the CSP forbids inline styles anyway
