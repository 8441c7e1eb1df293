"""Model output (and user text) -> safe HTML. The only place that makes HTML from chat text.

Two layers, so one mistake is not enough: markdown-it renders CommonMark with raw HTML turned
off (tags come out as text), then nh3 (the Rust `ammonia` sanitizer) keeps only an allowlist of
tags, attributes and URL schemes. Images are never embedded: loading a remote image would tell a
third party what is in the chat, so they become plain links. Code is highlighted server-side by
Pygments, so no highlighting script runs in the browser.
"""
import nh3
from markdown_it import MarkdownIt
from markupsafe import Markup, escape
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

ALLOWED_TAGS = {"p", "br", "strong", "em", "del", "s", "code", "pre", "blockquote", "ul", "ol", "li", "a",
                "h1", "h2", "h3", "h4", "h5", "h6", "hr", "span", "table", "thead", "tbody", "tr", "th", "td"}
# No style attributes: the Content-Security-Policy forbids inline styles anyway.
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "span": {"class"}, "code": {"class"}, "ol": {"start"}}
URL_SCHEMES = {"http", "https", "mailto"}
_formatter = HtmlFormatter(nowrap=True)


def _highlight(code, lang, _attrs):
    """Pygments spans for a fenced block with a known language; plain (escaped) text otherwise."""
    try:
        lexer = get_lexer_by_name(lang.strip().split()[0]) if lang and lang.strip() else None
    except ClassNotFound:
        lexer = None
    if lexer is None:
        return ""  # markdown-it then escapes the code itself
    return highlight(code, lexer, _formatter)


def _image_as_link(renderer, tokens, idx, options, env):
    """![alt](url) -> a link to the image, never an <img> that would load it."""
    token = tokens[idx]
    alt = "".join(child.content for child in token.children or []) or "image"
    return f'<a href="{escape(token.attrGet("src") or "")}">[image: {escape(alt)}]</a>'


_md = MarkdownIt("commonmark", {"html": False, "highlight": _highlight, "breaks": True}).enable(
    ["table", "strikethrough"])
_md.add_render_rule("image", _image_as_link)


def render(text):
    """Markdown text -> sanitized HTML as Markup (safe to put in a template with no escaping)."""
    html = _md.render(text or "")
    clean = nh3.clean(html, tags=ALLOWED_TAGS, attributes=ALLOWED_ATTRIBUTES, url_schemes=URL_SCHEMES,
                      link_rel="noopener noreferrer nofollow", strip_comments=True)
    return Markup(clean)


def pygments_css():
    """Light and dark highlighting styles, scoped to rendered messages."""
    light = HtmlFormatter(style="default").get_style_defs(".markdown pre")
    dark = HtmlFormatter(style="monokai").get_style_defs(".markdown pre")
    return f"{light}\n@media (prefers-color-scheme: dark) {{\n{dark}\n}}\n"
