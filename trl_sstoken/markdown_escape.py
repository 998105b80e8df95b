"""Markdown that shows a user's text as written: names and settings in the model card.

A model card is markdown, rendered to HTML by the hub (and GitHub, and any viewer), and names in it come from the
user: a base model's `_name_or_path`, a dataset name, an output folder, a setting such as `history_cache_dir`. Put in
raw, `<script>` is HTML, `x](javascript:...)` closes a link into a `javascript:` one, a backtick ends a code span, a
`|` splits a table cell and a newline ends a table row or a heading. So:

- `visible_text` writes every non-printable character (controls, newlines, lone surrogates, bidirectional overrides)
  as `\\n`, `\\x01`, `\\u202e`: the text stays on one line and shows what it holds;
- `markdown_text` is literal text: HTML-escaped (`&`, `<`, `>`), and the characters markdown reads as syntax
  anywhere in a line (`\\`, `` ` ``, `*`, `_`, `[`, `]`, `|`) backslash-escaped;
- `markdown_code` is inline code: a code span (literal in every CommonMark renderer) when the text has none of
  `` ` | < > & ``, else an HTML `<code>` element around `markdown_text` (a code span cannot hold a `|` inside a
  table in every renderer alike, python-markdown and GFM differ; and so the card's source holds no raw tag either).
"""

import html
import re


_MARKDOWN_SYNTAX = re.compile(r"([\\`*_\[\]|])")


def visible_text(text: str) -> str:
    """`text` with each non-printable character written as its Python escape (`\\n`, `\\x00`, `\\u2028`)."""
    return "".join(character if character.isprintable() else _escaped(character) for character in str(text))


def markdown_text(text: str) -> str:
    """`text` as literal markdown text, on one line: nothing in it is markup, a link or a table separator."""
    return _MARKDOWN_SYNTAX.sub(r"\\\1", html.escape(visible_text(text), quote=False))


def markdown_code(text: str) -> str:
    """`text` as inline code, on one line, safe inside a table cell."""
    shown = visible_text(text)
    if shown and not any(c in shown for c in "`|<>&") and shown.strip() == shown:
        return f"`{shown}`"
    return f"<code>{markdown_text(text)}</code>"


def _escaped(character: str) -> str:
    if character in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[character]
    code = ord(character)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
