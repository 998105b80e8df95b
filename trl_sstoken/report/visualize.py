"""Render which tokens ssToken keeps: pure functions from per-token values to an HTML page or an SVG picture.

Nothing here touches a model or a trainer. The input is what `SSTokenTrainer.preview_selection` returns, in
*prediction space* ((B, T-1), column j describes token j + 1), plus each row's token texts in *token space*
((B, T)); `examples_from_selection` lines the two up, and everything after it works on plain lists:

    examples = examples_from_selection(token_texts, valid, response, keep, score=..., rel=..., attention=...)
    summary = summarize(examples)
    page = render_html(examples, summary, title="...", settings={...})

Every text is escaped (`_escape`): nothing from the data reaches the page or the picture as markup, and the
characters that XML 1.0 forbids even escaped (C0 controls but tab, newline and carriage return; DEL and the C1
controls, invisible anyway; lone surrogates, which cannot even be written as UTF-8; U+FFFE and U+FFFF) are shown as
the text `\\x01`, `\\ud800`, ..., so the SVG is well-formed XML and the page shows what the token holds.
"""

import html
import math
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch


CONTEXT, KEPT, DROPPED = "context", "kept", "dropped"
TOKEN_TYPES = ("word", "number", "punctuation", "whitespace", "special", "other")
POSITION_BINS = 10

# Score colour scale, low -> high (ColorBrewer "Blues", light to dark)
_SCALE = [(0xF7, 0xFB, 0xFF), (0xC6, 0xDB, 0xEF), (0x6B, 0xAE, 0xD6), (0x21, 0x71, 0xB5), (0x08, 0x30, 0x6B)]


@dataclass(frozen=True)
class TokenView:
    """One token of an example, in token space. `role` is "context", "kept" or "dropped".

    `score`, `rel` and `attention` are set for response tokens where they were computed, else None.
    """

    text: str
    role: str
    score: float | None = None
    rel: float | None = None
    attention: float | None = None

    @property
    def is_response(self) -> bool:
        return self.role != CONTEXT


@dataclass(frozen=True)
class ExampleView:
    """One example as it is drawn: its tokens (padding removed) in order. `position` is the token index in the row."""

    index: int
    tokens: list[TokenView]
    positions: list[int]

    @property
    def response(self) -> list[TokenView]:
        return [token for token in self.tokens if token.is_response]


@dataclass
class Summary:
    """Kept fractions over a set of examples: overall, by relative position in the response, by token type."""

    examples: int
    response_tokens: int
    kept_tokens: int
    by_position: list[tuple[int, int]]  # (kept, total) per tenth of the response, first tenth first
    by_type: dict[str, tuple[int, int]]  # token type -> (kept, total)
    frequent_tokens: list[tuple[str, int, int]] = field(default_factory=list)  # (text, kept, total), most frequent

    @property
    def kept_fraction(self) -> float:
        return self.kept_tokens / self.response_tokens if self.response_tokens else 0.0


def examples_from_selection(
    token_texts: list[list[str]],
    valid: torch.Tensor,
    response: torch.Tensor,
    keep: torch.Tensor,
    score: torch.Tensor | None = None,
    rel: torch.Tensor | None = None,
    attention: torch.Tensor | None = None,
    first_index: int = 0,
) -> list[ExampleView]:
    """Lines prediction-space values up with token-space texts.

    Shapes: `token_texts` B lists of T strings; `valid` (B, T) bool, False on padding; `response`, `keep`, `score`,
    `rel`, `attention` (B, T-1), column j describing token j + 1. Token 0 of a row is never a response token. Padding
    is left out. Examples are numbered from `first_index`.
    """
    batch, length = valid.shape
    if len(token_texts) != batch or any(len(texts) != length for texts in token_texts):
        raise ValueError(f"token_texts must be {batch} lists of {length} strings, one per position of `valid`.")
    for name, values in (
        ("response", response),
        ("keep", keep),
        ("score", score),
        ("rel", rel),
        ("attention", attention),
    ):
        if values is not None and tuple(values.shape) != (batch, length - 1):
            raise ValueError(
                f"{name} must have shape (B, T-1) = ({batch}, {length - 1}) in prediction space, got {tuple(values.shape)}."
            )
    if bool((keep & ~response).any()):
        raise ValueError("keep marks a token that is not a response token.")

    def column(values, row):
        return None if values is None else values[row].detach().float().cpu().tolist()

    examples = []
    for row in range(batch):
        is_valid = valid[row].tolist()
        is_response, is_kept = response[row].tolist(), keep[row].tolist()
        scores, rels, attentions = column(score, row), column(rel, row), column(attention, row)
        tokens, positions = [], []
        for position in range(length):
            if not is_valid[position]:
                continue
            j = position - 1  # the prediction-space column of this token
            if j < 0 or not is_response[j]:
                tokens.append(TokenView(token_texts[row][position], CONTEXT))
            else:
                tokens.append(
                    TokenView(
                        token_texts[row][position],
                        KEPT if is_kept[j] else DROPPED,
                        score=_finite_or_none(scores, j),
                        rel=_finite_or_none(rels, j),
                        attention=_finite_or_none(attentions, j),
                    )
                )
            positions.append(position)
        examples.append(ExampleView(first_index + row, tokens, positions))
    return examples


def token_type(text: str, special_tokens: frozenset[str] = frozenset()) -> str:
    """One of TOKEN_TYPES. Leading/trailing whitespace (and the BPE space markers Ġ and ▁) is ignored."""
    if text in special_tokens:
        return "special"
    stripped = text.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n").strip()
    if not stripped:
        return "whitespace"
    if stripped.isdigit() or _is_number(stripped):
        return "number"
    if all(unicodedata.category(char).startswith(("P", "S")) for char in stripped):
        return "punctuation"
    if all(char.isalpha() or char in "'-" for char in stripped):
        return "word"
    return "other"


def summarize(
    examples: list[ExampleView], special_tokens: frozenset[str] = frozenset(), num_frequent: int = 20
) -> Summary:
    """Counts kept/total response tokens overall, per tenth of each response, per token type, per frequent token."""
    by_position = [[0, 0] for _ in range(POSITION_BINS)]
    by_type = {name: [0, 0] for name in TOKEN_TYPES}
    by_text: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    total = kept = 0
    for example in examples:
        response = example.response
        for rank, token in enumerate(response):
            is_kept = int(token.role == KEPT)
            bin_index = min(int((rank + 0.5) * POSITION_BINS / len(response)), POSITION_BINS - 1)  # by token centre
            for counts in (
                by_position[bin_index],
                by_type[token_type(token.text, special_tokens)],
                by_text[token.text],
            ):
                counts[0] += is_kept
                counts[1] += 1
            total += 1
            kept += is_kept
    frequency = Counter({text: counts[1] for text, counts in by_text.items()})
    frequent = [(text, by_text[text][0], count) for text, count in frequency.most_common(num_frequent)]
    return Summary(
        examples=len(examples),
        response_tokens=total,
        kept_tokens=kept,
        by_position=[tuple(counts) for counts in by_position],
        by_type={name: tuple(counts) for name, counts in by_type.items() if counts[1]},
        frequent_tokens=frequent,
    )


def score_color(score: float | None) -> str:
    """Background colour of a response token: light (low score) to dark blue (high score); grey without a score."""
    if score is None:
        return "#e8e8e8"
    position = min(max(score, 0.0), 1.0) * (len(_SCALE) - 1)
    low = min(int(position), len(_SCALE) - 2)
    weight = position - low
    rgb = [round(a + (b - a) * weight) for a, b in zip(_SCALE[low], _SCALE[low + 1], strict=True)]
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def text_color(score: float | None) -> str:
    return "#ffffff" if score is not None and score > 0.55 else "#111111"


def token_tooltip(token: TokenView) -> str:
    """The hover text of a token: its role and, where computed, score, REL and attention."""
    if not token.is_response:
        return "context (prompt): not scored"
    parts = [token.role]
    for name, value in (("score", token.score), ("REL", token.rel), ("attention", token.attention)):
        if value is not None:
            parts.append(f"{name} {value:+.4f}" if name == "REL" else f"{name} {value:.4f}")
    return " | ".join(parts)


def render_html(
    examples: list[ExampleView],
    summary: Summary,
    title: str = "ssToken selection",
    settings: dict[str, object] | None = None,
) -> str:
    """A self-contained HTML page (inline CSS, no script): the settings, the summary, then every example.

    Each response token is a `<span class="tok kept|dropped">` with `data-pos` (its token index in the row) and
    `data-kept` ("1" or "0"), coloured by score, with score, REL and attention in its `title` (shown on hover).
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body>",
        f"<h1>{_escape(title)}</h1>",
        _legend_html(),
    ]
    if settings:
        rows = "".join(f"<tr><th>{_escape(key)}</th><td>{_escape(value)}</td></tr>" for key, value in settings.items())
        parts.append(f'<h2>Settings</h2><table class="settings">{rows}</table>')
    parts.append(_summary_html(summary))
    parts.append('<h2 id="examples">Examples</h2>')
    for example in examples:
        parts.append(_example_html(example))
    parts.append("</body></html>")
    return "\n".join(parts)


def render_svg(examples: list[ExampleView], width: int = 760, font_size: int = 14, title: str | None = None) -> str:
    """A static picture of a few examples (for documentation): context in grey, response tokens coloured by score,
    kept tokens framed in green, dropped tokens struck through. A monospace font keeps the layout independent of the
    renderer."""
    char_width, line_height, pad, margin = font_size * 0.6, font_size * 1.9, 4, 8.0
    elements, y = [], margin
    if title:
        y += font_size + 4
        elements.append(
            f'<text x="{margin}" y="{y:.1f}" font-size="{font_size + 2}" font-weight="bold">{_escape(title)}</text>'
        )
    for example in examples:
        y += line_height
        elements.append(
            f'<text x="{margin}" y="{y:.1f}" font-size="{font_size - 2}" fill="#555555">example {example.index}</text>'
        )
        x = margin
        y += line_height * 0.9
        for token in example.tokens:
            text = _display_text(token.text)
            box = len(text) * char_width + 2 * pad
            if x + box > width - margin:
                x, y = margin, y + line_height
            if token.is_response:
                kept = token.role == KEPT
                elements.append(
                    f'<rect x="{x:.1f}" y="{y - font_size - 2:.1f}" width="{box:.1f}" height="{font_size + 8}" rx="3" '
                    f'fill="{score_color(token.score)}" stroke="{"#1b7f3b" if kept else "#bbbbbb"}" '
                    f'stroke-width="{2 if kept else 1}"/>'
                )
                decoration = "" if kept else ' text-decoration="line-through"'
                elements.append(
                    f'<text x="{x + pad:.1f}" y="{y:.1f}" fill="{text_color(token.score)}"{decoration}>{_escape(text)}</text>'
                )
            else:
                elements.append(f'<text x="{x + pad:.1f}" y="{y:.1f}" fill="#888888">{_escape(text)}</text>')
            x += box + 3
    legend = [
        "grey: the prompt (context, never trained on); boxes: response tokens, darker = higher score;",
        "green frame: kept (trained on); struck through: dropped.",
    ]
    y += line_height * 0.5
    for line in legend:
        y += font_size + 4
        elements.append(
            f'<text x="{margin}" y="{y:.1f}" font-size="{font_size - 2}" fill="#333333">{_escape(line)}</text>'
        )
    height = y + margin + 4
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height:.0f}" '
        f'viewBox="0 0 {width} {height:.0f}" font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" '
        f'font-size="{font_size}">\n<rect width="100%" height="100%" fill="#ffffff"/>\n'
        + "\n".join(elements)
        + "\n</svg>\n"
    )


# ----- helpers -----


def _finite_or_none(values: list[float] | None, j: int) -> float | None:
    if values is None or not math.isfinite(values[j]):
        return None
    return values[j]


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


# what XML 1.0 does not allow in a document (even as a character reference), plus the invisible DEL and C1 controls
_NOT_SHOWABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")


def _escape(value: object) -> str:
    """HTML/XML-escaped text (quotes too, for attributes), with `_NOT_SHOWABLE` characters written as text: `\\xNN`
    or `\\uNNNN`."""
    return html.escape(_NOT_SHOWABLE.sub(_as_code, str(value)), quote=True)


def _as_code(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _display_text(text: str) -> str:
    """Makes invisible tokens visible: newlines as ↵, tabs as →, carriage returns as ␍, an all-space token as ·."""
    shown = text.replace("\n", "↵").replace("\t", "→").replace("\r", "␍")
    return shown if shown.strip() else shown.replace(" ", "·") or "∅"


def _percent(kept: int, total: int) -> str:
    return f"{100 * kept / total:.1f}%" if total else "-"


def _bar(kept: int, total: int) -> str:
    width = 100 * kept / total if total else 0
    return f'<div class="bar"><div style="width:{width:.1f}%"></div></div>'


def _legend_html() -> str:
    return (
        '<p class="legend">Grey italic: context (the prompt, never trained on). Coloured: response tokens, the darker '
        'the higher the score. <span class="tok kept" style="background:#6baed6">kept</span> tokens (underlined) are '
        'trained on; <span class="tok dropped" style="background:#c6dbef">dropped</span> tokens (struck through) are '
        "not. Hover a token for its score, REL and attention.</p>"
    )


def _summary_html(summary: Summary) -> str:
    head = (
        f"<h2>Summary</h2><p>{summary.examples} examples, {summary.response_tokens} response tokens, "
        f"{summary.kept_tokens} kept ({_percent(summary.kept_tokens, summary.response_tokens)}).</p>"
    )
    position_rows = "".join(
        f"<tr><td>{10 * i}-{10 * (i + 1)}%</td><td>{total}</td><td>{_percent(kept, total)}</td><td>{_bar(kept, total)}</td></tr>"
        for i, (kept, total) in enumerate(summary.by_position)
    )
    type_rows = "".join(
        f"<tr><td>{_escape(name)}</td><td>{total}</td><td>{_percent(kept, total)}</td><td>{_bar(kept, total)}</td></tr>"
        for name, (kept, total) in summary.by_type.items()
    )
    token_rows = "".join(
        f"<tr><td><code>{_escape(_display_text(text))}</code></td><td>{total}</td><td>{_percent(kept, total)}</td>"
        f"<td>{_bar(kept, total)}</td></tr>"
        for text, kept, total in summary.frequent_tokens
    )
    header = "<tr><th>{}</th><th>tokens</th><th>kept</th><th></th></tr>"
    return (
        head
        + '<div class="tables">'
        + f'<table class="summary" id="by-position"><caption>Kept fraction by position in the response</caption>'
        f"{header.format('position')}{position_rows}</table>"
        + f'<table class="summary" id="by-type"><caption>Kept fraction by token type</caption>'
        f"{header.format('type')}{type_rows}</table>"
        + f'<table class="summary" id="by-token"><caption>Most frequent response tokens</caption>'
        f"{header.format('token')}{token_rows}</table>" + "</div>"
    )


def _example_html(example: ExampleView) -> str:
    spans = []
    for token, position in zip(example.tokens, example.positions, strict=True):
        text = _escape(_display_text(token.text))
        tooltip = _escape(token_tooltip(token))
        if token.is_response:
            spans.append(
                f'<span class="tok {token.role}" data-pos="{position}" data-kept="{int(token.role == KEPT)}" '
                f'style="background:{score_color(token.score)};color:{text_color(token.score)}" '
                f'title="{tooltip}">{text}</span>'
            )
        else:
            spans.append(f'<span class="tok context" data-pos="{position}" title="{tooltip}">{text}</span>')
        if token.text.endswith("\n"):
            spans.append("<br>")
    response = example.response
    kept = sum(token.role == KEPT for token in response)
    return (
        f'<div class="example" data-example="{example.index}"><div class="meta">example {example.index}: '
        f"{kept} of {len(response)} response tokens kept</div>"
        f'<div class="tokens">{"".join(spans)}</div></div>'
    )


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 70em;
       padding: 0 1em; color: #111; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.5em; }
.legend { color: #333; }
table { border-collapse: collapse; margin: 0.5em 1.5em 0.5em 0; }
th, td { padding: 2px 8px; text-align: left; border-bottom: 1px solid #ddd; font-size: 0.9em; }
caption { text-align: left; font-weight: 600; padding-bottom: 4px; }
.tables { display: flex; flex-wrap: wrap; align-items: flex-start; }
.bar { width: 120px; height: 10px; background: #eee; }
.bar div { height: 10px; background: #2171b5; }
.example { border: 1px solid #ddd; border-radius: 6px; padding: 8px 10px; margin: 10px 0; }
.meta { color: #555; font-size: 0.85em; margin-bottom: 4px; }
.tokens { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.95em; line-height: 2.0; }
.tok { display: inline-block; padding: 0 3px; margin: 1px; border-radius: 3px; white-space: pre; }
.tok.context { color: #888; font-style: italic; }
.tok.kept { border-bottom: 3px solid #1b7f3b; font-weight: 600; }
.tok.dropped { text-decoration: line-through; opacity: 0.75; border-bottom: 3px solid transparent; }
.tok:hover { outline: 2px solid #ff7f0e; }
"""
