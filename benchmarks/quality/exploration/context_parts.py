"""Exploration (issue 13): which context parts (sink, system prompt, user words, template) SmolLM2 response
tokens attend to, per layer, from the scored token's own query (self) and from the query that predicts it (pred).

    python benchmarks/quality/exploration/context_parts.py
"""

import torch
from examples import EXAMPLES
from examples import build as build_example
from tools.real_models import real_model_path
from transformers import AutoModelForCausalLM, AutoTokenizer


torch.set_num_threads(2)
path = real_model_path("smollm2")
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
EX = EXAMPLES


def build(prompt, parts):
    return build_example(tok, prompt, parts)


L = model.config.num_hidden_layers
acc = {}
for prompt, parts in EX:
    ids, kinds = build(prompt, parts)
    T = len(ids)
    toks = [tok.decode([i]) for i in ids]
    # context parts: sink=0; system = 1..index of 2nd <|im_start|>; user content = after 'user\n' up to its <|im_end|>; template = rest of ctx
    starts = [i for i, t in enumerate(toks) if t == "<|im_start|>"]
    part = ["tmpl"] * T
    part[0] = "sink"
    for i in range(3, starts[1] - 2):
        part[i] = "sys"
    for i in range(starts[1] + 3, starts[2] - 2):
        part[i] = "user"
    for i, k in enumerate(kinds):
        if k != "ctx":
            part[i] = "resp"
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_attentions=True)
    fr = kinds.index(next(k for k in kinds if k != "ctx"))
    for layer in range(L):
        w = out.attentions[layer][0].double()  # H,T,T
        for t in range(fr, T):
            for align, q in (("self", t), ("pred", t - 1)):
                wq = w[:, q, : q + 1]
                shares = {
                    p: wq[:, [i for i in range(q + 1) if part[i] == p]].sum(-1)
                    for p in ("sink", "sys", "user", "tmpl", "resp")
                }
                nonsink = 1 - shares["sink"]
                pooled_sf_ctx = (shares["sys"] + shares["user"] + shares["tmpl"]).sum() / nonsink.sum()
                pooled_user = shares["user"].sum() / nonsink.sum()
                a = acc.setdefault((layer, align, kinds[t]), [])
                a.append(
                    [shares[p].mean().item() for p in ("sink", "sys", "user", "tmpl", "resp")]
                    + [pooled_sf_ctx.item(), pooled_user.item()]
                )
print(
    "shares of attention of response-token queries (head mean). pooled sink-free ctx = sum_h ctx_nonsink / sum_h (1-sink)"
)
print(
    f"{'L':>2} {'align':>5} {'kind':>4} {'sink':>5} {'sys':>5} {'user':>5} {'tmpl':>5} {'resp':>5} | {'sfctx':>5} {'sfuser':>6}"
)
for layer in [0, 4, 8, 12, 15, 18, 21, 24, 27, 29]:
    for align in ("self", "pred"):
        for kind in ("bp", "ans", "rnd", "eos"):
            v = acc[(layer, align, kind)]
            m = [sum(x[i] for x in v) / len(v) for i in range(7)]
            print(
                f"{layer:>2} {align:>5} {kind:>4} "
                + " ".join(f"{x:5.2f}" for x in m[:5])
                + f" | {m[5]:5.2f} {m[6]:6.2f}"
            )
