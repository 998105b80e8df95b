"""visualize.py: lining prediction space up with tokens, summaries, escaping, and a page a browser renders."""

import subprocess
import xml.etree.ElementTree as ElementTree
from html.parser import HTMLParser

import pytest
import torch

from trl_sstoken.report.collect import write_figure, write_report
from trl_sstoken.report.visualize import (
    CONTEXT,
    DROPPED,
    KEPT,
    examples_from_selection,
    render_html,
    render_svg,
    score_color,
    summarize,
    token_tooltip,
    token_type,
)


class TokenSpans(HTMLParser):
    """Collects every token span of a page: (example index, data-pos, class, data-kept, title, text)."""

    def __init__(self):
        super().__init__()
        self.example = None
        self.spans = []
        self._open = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and "data-example" in attrs:
            self.example = int(attrs["data-example"])
        if tag == "span" and "tok" in attrs.get("class", "").split() and "data-pos" in attrs:
            self._open = dict(attrs, example=self.example, text="")

    def handle_data(self, data):
        if self._open is not None:
            self._open["text"] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.spans.append(self._open)
            self._open = None


def parse_spans(page):
    parser = TokenSpans()
    parser.feed(page)
    return parser.spans


def hand_batch():
    """Two rows of 6 positions. Row 0: prompt 0-2, response 3-5. Row 1: prompt 0-1, response 2-3, padding 4-5."""
    texts = [["p0", "p1", "p2", "r3", "r4", "r5"], ["q0", "q1", "s2", "s3", "<pad>", "<pad>"]]
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    # prediction space: column j describes token j + 1
    response = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    keep = torch.tensor([[0, 0, 1, 0, 1], [0, 0, 1, 0, 0]], dtype=torch.bool)
    score = torch.tensor([[0.0, 0.0, 0.9, 0.1, 0.5], [0.0, 0.2, 0.8, 0.0, 0.0]])
    rel = torch.tensor([[0.0, 0.0, 0.25, -0.5, 0.125], [0.0, -0.1, 0.3, 0.0, 0.0]])
    attention = torch.tensor([[0.0, 0.0, 0.75, 0.0625, 0.5], [0.0, 0.4, 0.6, 0.0, 0.0]])
    return texts, valid, response, keep, score, rel, attention


def test_column_j_describes_token_j_plus_one_and_padding_is_dropped():
    texts, valid, response, keep, score, rel, attention = hand_batch()
    first, second = examples_from_selection(texts, valid, response, keep, score, rel, attention, first_index=5)
    assert (first.index, second.index) == (5, 6)
    assert [t.text for t in first.tokens] == texts[0]
    assert [t.role for t in first.tokens] == [CONTEXT, CONTEXT, CONTEXT, KEPT, DROPPED, KEPT]
    assert first.tokens[3].score == pytest.approx(0.9) and first.tokens[3].rel == pytest.approx(0.25)
    assert first.tokens[4].attention == pytest.approx(0.0625)
    assert first.tokens[0].score is None  # context is not scored
    assert [t.text for t in second.tokens] == ["q0", "q1", "s2", "s3"]  # padding left out
    assert second.positions == [0, 1, 2, 3]
    assert [t.role for t in second.tokens] == [CONTEXT, CONTEXT, DROPPED, KEPT]


def test_methods_without_scores_render_roles_only():
    texts, valid, response, keep, *_ = hand_batch()
    examples = examples_from_selection(texts, valid, response, keep)
    assert all(t.score is None and t.rel is None for e in examples for t in e.tokens)
    assert token_tooltip(examples[0].tokens[3]) == "kept"


def test_shape_and_consistency_errors():
    texts, valid, response, keep, score, *_ = hand_batch()
    with pytest.raises(ValueError, match=r"score must have shape \(B, T-1\)"):
        examples_from_selection(texts, valid, response, keep, score=score[:, :-1])
    with pytest.raises(ValueError, match="token_texts"):
        examples_from_selection(texts[:1], valid, response, keep)
    with pytest.raises(ValueError, match="not a response token"):
        examples_from_selection(texts, valid, response, keep | torch.ones_like(keep))


def test_summary_counts_by_position_type_and_token():
    texts, valid, response, keep, *_ = hand_batch()
    texts = [["p0", "p1", "p2", "sure", "!", "42"], ["q0", "q1", "sure", "<|im_end|>", "<pad>", "<pad>"]]
    summary = summarize(
        examples_from_selection(texts, valid, response, keep), special_tokens=frozenset({"<|im_end|>"})
    )
    assert (summary.examples, summary.response_tokens, summary.kept_tokens) == (2, 5, 3)
    assert summary.kept_fraction == pytest.approx(0.6)
    # row 0: 3 response tokens at centres 1/6, 3/6, 5/6 -> bins 1, 5, 8; row 1: 2 tokens at 1/4, 3/4 -> bins 2, 7
    expected = [(0, 0)] * 10
    expected[1], expected[5], expected[8] = (1, 1), (0, 1), (1, 1)
    expected[2], expected[7] = (0, 1), (1, 1)
    assert summary.by_position == expected
    assert summary.by_type["number"] == (1, 1)
    assert summary.by_type["special"] == (1, 1)
    assert summary.by_type["punctuation"] == (0, 1)
    assert summary.by_type["word"] == (1, 2)
    assert summary.frequent_tokens[0] == ("sure", 1, 2)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("hello", "word"),
        (" Ġworld", "word"),
        ("▁don't", "word"),
        ("42", "number"),
        (" 3.14", "number"),
        ("!", "punctuation"),
        ("Ġ.", "punctuation"),
        ("\n", "whitespace"),
        ("Ċ", "whitespace"),
        ("x2", "other"),
        ("<|im_end|>", "special"),
    ],
)
def test_token_type(text, expected):
    assert token_type(text, frozenset({"<|im_end|>"})) == expected


def test_tokens_are_escaped_and_marks_match():
    texts, valid, response, keep, score, rel, attention = hand_batch()
    texts[0][3] = '<script>alert("x")</script>'
    texts[0][4] = "a&b'"
    examples = examples_from_selection(texts, valid, response, keep, score, rel, attention)
    page = render_html(examples, summarize(examples), title="<b>title</b>", settings={"model": "<m>"})
    assert "<script>" not in page and "<b>title</b>" not in page and "<m>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    spans = parse_spans(page)
    response_spans = [s for s in spans if "data-kept" in s]
    assert [(s["example"], int(s["data-pos"]), s["data-kept"]) for s in response_spans] == [
        (0, 3, "1"),
        (0, 4, "0"),
        (0, 5, "1"),
        (1, 2, "0"),
        (1, 3, "1"),
    ]
    assert response_spans[0]["text"] == '<script>alert("x")</script>'  # the browser shows the original text
    assert response_spans[1]["text"] == "a&b'"
    assert response_spans[0]["title"] == "kept | score 0.9000 | REL +0.2500 | attention 0.7500"
    assert response_spans[1]["title"] == "dropped | score 0.1000 | REL -0.5000 | attention 0.0625"


def test_svg_is_well_formed_and_escaped():
    texts, valid, response, keep, score, *_ = hand_batch()
    texts[0][3] = "<&>"
    svg = render_svg(examples_from_selection(texts, valid, response, keep, score), title="a < b")
    root = ElementTree.fromstring(svg)
    words = [element.text for element in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "<&>" in words and "a < b" in words


HOSTILE_TOKENS = [chr(c) for c in range(0x20)] + [
    "\x7f",
    "\x85",
    "\ud800",
    "a\udfffb",
    "\ufffe",
    "]]>",
    "<",
    "&",
    '"',
    "'",
]


def hostile_examples():
    """Every C0 control character, DEL, a C1 control, lone surrogates, a noncharacter and XML's markup characters,
    each one response token."""
    n = len(HOSTILE_TOKENS)
    texts = [["p0", *HOSTILE_TOKENS]]
    valid = torch.ones(1, n + 1, dtype=torch.bool)
    response = torch.ones(1, n, dtype=torch.bool)
    keep = torch.arange(n).remainder(2).eq(0).unsqueeze(0)
    return examples_from_selection(texts, valid, response, keep, torch.linspace(0, 1, n).unsqueeze(0))


def test_control_characters_and_surrogates_leave_the_svg_well_formed_and_visible(tmp_path):
    examples = hostile_examples()
    svg = render_svg(examples, title="title \x00\x1b]]>")
    root = ElementTree.fromstring(svg.encode("utf-8"))  # UTF-8 encodable, and well-formed XML 1.0
    words = [element.text for element in root.iter("{http://www.w3.org/2000/svg}text")]
    for shown in ("\\x00", "\\x01", "\\x1b", "\\x1f", "\\x7f", "\\x85", "\\ud800", "a\\udfffb", "\\ufffe"):
        assert shown in words
    assert {"↵", "→", "]]>", "<", "&", '"', "'"} <= set(words) and "title \\x00\\x1b]]>" in words
    write_figure(str(tmp_path / "figure.svg"), examples, title="\ud800")
    ElementTree.parse(tmp_path / "figure.svg")


def test_control_characters_and_surrogates_are_shown_in_the_html_page(tmp_path):
    examples = hostile_examples()
    page = render_html(examples, summarize(examples), title="<t\x00>", settings={"a\x01": "\ud800<script>"})
    page.encode("utf-8")  # no lone surrogate left to fail the write
    assert not [
        c for c in page if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F or 0xD800 <= ord(c) < 0xE000
    ]
    assert "<script>" not in page and "&lt;t\\x00&gt;" in page and "\\ud800&lt;script&gt;" in page
    shown = [span["text"] for span in parse_spans(page)][1:]
    assert shown[:3] == ["\\x00", "\\x01", "\\x02"] and shown[9:11] == ["→", "↵"]
    assert shown[-5:] == ["]]>", "<", "&", '"', "'"]
    write_report(str(tmp_path / "report.html"), examples, {"model": "\ud800"})


def test_score_colour_darkens_with_score():
    darkness = [sum(int(score_color(s)[i : i + 2], 16) for i in (1, 3, 5)) for s in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert darkness == sorted(darkness, reverse=True) and len(set(darkness)) == 5
    assert score_color(-3.0) == score_color(0.0) and score_color(7.0) == score_color(1.0)


def test_a_real_browser_renders_the_page(tmp_path):
    """Headless Chromium parses the page into the same token spans and draws it (a non-blank screenshot)."""
    from conftest import chromium_or_skip
    from tools.report_screenshot import CHROMIUM_FLAGS

    chromium = chromium_or_skip()
    texts, valid, response, keep, score, rel, attention = hand_batch()
    examples = examples_from_selection(texts, valid, response, keep, score, rel, attention)
    page = tmp_path / "report.html"
    page.write_text(render_html(examples, summarize(examples)), encoding="utf-8")
    flags = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(flags + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert [s["data-kept"] for s in parse_spans(dom) if "data-kept" in s] == ["1", "0", "1", "0", "1"]
    shot = tmp_path / "shot.png"
    subprocess.run(
        flags + [f"--screenshot={shot}", "--window-size=900,700", page.as_uri()], capture_output=True, timeout=120
    )
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (900, 700)
    assert len(data) > 10_000  # text and colours, not a blank page
