"""The hand-written SmolLM2 examples both exploration scripts score (run as scripts, so they import this by name)."""

EXAMPLES = [
    ("What is 12 + 7?", [("bp", "Sure! Here is the answer:"), ("ans", " 19")]),
    (
        "Reverse the list: apple, pear, fig.",
        [("bp", "Sure! Here is the reversed list:"), ("ans", " fig, pear, apple")],
    ),
    (
        "Table: red=4, blue=17, gold=2. What is blue?",
        [("bp", "Sure! Here is what you asked for."), ("ans", " blue=17")],
    ),
    ("What is the capital of France?", [("bp", "The capital of France is"), ("ans", " Paris.")]),
    ("Replace cat with owl in: ant, cat, fox.", [("ans", "ant, owl, fox"), ("rnd", " ref: k12 k07 k33")]),
]


def build(tok, prompt, parts):
    """(ids, kinds) of one chat: the user prompt as context, then the response parts and `<|im_end|>`."""
    chat = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    ids = tok(chat, add_special_tokens=False)["input_ids"]
    kinds = ["ctx"] * len(ids)
    for kind, text in parts:
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids += t
        kinds += [kind] * len(t)
    ids.append(tok.convert_tokens_to_ids("<|im_end|>"))
    kinds.append("eos")
    return ids, kinds
