"""Exploration (issue 13, step 1): what the context-attention statistic measures on SmolLM2."""

import os
import sys

import torch
from examples import EXAMPLES
from examples import build as build_example
from tools.real_models import real_model_path
from transformers import AutoModelForCausalLM, AutoTokenizer


torch.set_num_threads(2)
path = real_model_path(sys.argv[1] if len(sys.argv) > 1 else "smollm2")
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
EX = EXAMPLES


def build(prompt, parts):
    return build_example(tok, prompt, parts)


if os.environ.get("SHOW"):
    ids, kinds = build(*EX[0])
    print([tok.decode([i]) for i in ids])
    print(kinds)
L = model.config.num_hidden_layers
stats = {}  # (layer, kind) -> lists
rows = []
for prompt, parts in EX:
    ids, kinds = build(prompt, parts)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_attentions=True)
    T = len(ids)
    ctx = torch.tensor([k == "ctx" for k in kinds])
    first_resp = kinds.index(next(k for k in kinds if k != "ctx"))
    for layer in range(L):
        w = out.attentions[layer][0].double()  # (H, T, T)
        for q in range(first_resp, T):
            wq = w[:, q, : q + 1]  # (H, q+1)
            cm = (wq * ctx[: q + 1]).sum(-1)  # per head
            sink = wq[:, 0]
            nonsink_ctx = (wq[:, 1:] * ctx[1 : q + 1]).sum(-1)
            sf = nonsink_ctx / (1 - sink).clamp_min(1e-12)
            nctx, nvis = ctx[1 : q + 1].sum().item(), q
            pc_ratio = sf / (nctx / nvis)
            # top key besides pos 0
            mean_w = wq.mean(0)
            top2 = mean_w[1:].argmax().item() + 1
            stats.setdefault((layer, kinds[q]), []).append(
                (
                    cm.mean().item(),
                    sink.mean().item(),
                    (sink / cm.clamp_min(1e-12)).mean().item(),
                    sf.mean().item(),
                    pc_ratio.mean().item(),
                    q - first_resp,
                    mean_w[top2].item(),
                    top2,
                )
            )
print(
    f"{'layer':>5} {'kind':>4} {'n':>3} {'ctxmass':>7} {'sinkmass':>8} {'sink/ctx':>8} {'sinkfree':>8} {'pc_ratio':>8} {'2nd-key w':>9}"
)
for layer in list(range(0, L, 3)) + [L - 1]:
    for kind in ("bp", "ans", "rnd", "eos"):
        v = stats.get((layer, kind))
        if not v:
            continue
        m = [sum(x[i] for x in v) / len(v) for i in range(7)]
        print(
            f"{layer:>5} {kind:>4} {len(v):>3} {m[0]:7.3f} {m[1]:8.3f} {m[2]:8.3f} {m[3]:8.3f} {m[4]:8.3f} {m[6]:9.3f}"
        )
# what else (besides pos 0) takes mass in last layer, over all response queries: key position mean weight
layer = L - 1
for prompt, parts in EX[:2]:
    ids, kinds = build(prompt, parts)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_attentions=True)
    w = out.attentions[layer][0].double().mean(0)
    fr = kinds.index(next(k for k in kinds if k != "ctx"))
    col = w[fr:].mean(0)
    top = col.argsort(descending=True)[:6].tolist()
    print(
        "last layer, mean attention received over response queries:",
        [(p, tok.decode([ids[p]]), round(col[p].item(), 3)) for p in top],
    )
    # per-head sink share on last layer
    wh = out.attentions[layer][0].double()[:, fr:]
    print("per-head sink share (mean over resp queries):", [round(x, 2) for x in wh[:, :, 0].mean(-1).tolist()])
    # per query: tokens, ctx mass, sinkfree, ratio
    ctx = torch.tensor([k == "ctx" for k in kinds])
    for q in range(fr, len(ids)):
        wq = w[q, : q + 1]
        cm = (wq * ctx[: q + 1]).sum().item()
        s = wq[0].item()
        sf = (wq[1:] * ctx[1 : q + 1]).sum().item() / max(1 - s, 1e-12)
        print(
            f"   {kinds[q]:>4} {tok.decode([ids[q]])!r:>12} ctx {cm:.3f} sink {s:.3f} sinkfree {sf:.3f} ratio {sf / (ctx[1 : q + 1].sum().item() / q):.3f}"
        )
