"""A `--metric` for `trl-sstoken compare` on the task data of `make_task_data.py`: exact match of the answer.

The answer is the text after the first `Answer:`, up to a newline or ` Ref:`, stripped of spaces and a final `.`
(the quality benchmark's rule): boilerplate before it or a code tail after it is not penalised, a wrong answer is.

    trl-sstoken compare ... --metric answer_metric:exact_match     # with examples/compare on PYTHONPATH
"""


def extract_answer(text: str) -> str | None:
    if "Answer:" not in text:
        return None
    rest = text.split("Answer:", 1)[1]
    for stop in ("\n", " Ref:", "Ref:"):
        rest = rest.split(stop, 1)[0]
    return rest.strip().rstrip(".").strip()


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of generations whose answer equals the reference's answer."""
    hits = [
        extract_answer(p) is not None and extract_answer(p) == extract_answer(r)
        for p, r in zip(predictions, references, strict=True)
    ]
    return sum(hits) / len(hits)
