"""Probe for issue 4: can the frozen SmolLM2-135M answer easy-vqa's yes/no questions when it
is told exactly what the image shows, in words?

Each yes/no question of an image gets the image's description, "The image shows a red
circle." (from its colour and shape answers), in place of the image, optionally after NP
trained soft-prompt embeddings. Training uses easy-vqa's train split, 4 questions from each
(plain/negated, answer) cell per step, the answer read as the larger of the "yes" and "no"
logits; the test is the yes/no questions of the first NTEST test images, as they come.

Usage: python benchmarks/probes/text_soft_prompt.py NP STEPS NTEST [LR]

Runs recorded in issue 4's notes and docs/default-model.md (2 threads, NTEST = 200, 924
questions):
  0 0 200      no soft prompt: 49.4% (the LLM answers "no" to almost everything)
  16 200 200   16 soft-prompt embeddings, 200 steps (9 min): 98.7%
"""

import collections
import random
import sys
import time

import torch

from prumerge.data.easy_vqa import is_negated, load_easy_vqa, question_type
from prumerge.models.default import load_language_model

torch.set_num_threads(2)
torch.manual_seed(0)
random.seed(0)
llm, tok = load_language_model()
for p in llm.parameters():
    p.requires_grad_(False)
NP = int(sys.argv[1])
STEPS = int(sys.argv[2])
NTEST = int(sys.argv[3])


def items(split, n=None):
    ids, turns, _ = load_easy_vqa(split)
    out = []
    for i in ids[:n]:
        c = s = None
        for _q, a in turns[i]:
            t = question_type(a)
            if t == "color":
                c = a
            if t == "shape":
                s = a
        if c is None or s is None:
            continue
        for q, a in turns[i]:
            if question_type(a) == "yes/no":
                out.append((f"The image shows a {c} {s}.", q, a))
    return out


train = items("train")
test = items("test", NTEST)
cells = collections.defaultdict(list)
for d, q, a in train:
    cells[(is_negated(q), a)].append((d, q, a))
print({k: len(v) for k, v in cells.items()}, len(test))
emb = llm.get_input_embeddings()
soft = torch.nn.Parameter(emb.weight[torch.randint(0, 49152, (NP,))].clone())
YES = tok.encode("yes", add_special_tokens=False)[0]
NO = tok.encode("no", add_special_tokens=False)[0]
pre = tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"]


def batch(rows):
    seqs = []
    for d, q, a in rows:
        post = tok(f"{d}\n{q}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)[
            "input_ids"
        ]
        seqs.append((post, YES if a == "yes" else NO))
    L = max(len(p) for p, _ in seqs)
    E = []
    M = []
    for post, _ in seqs:
        pad = L - len(post)
        e = torch.cat(
            [emb(torch.tensor([tok.pad_token_id or 0] * pad + pre)), soft, emb(torch.tensor(post))]
        )
        E.append(e)
        M.append([0] * pad + [1] * (len(pre) + NP + len(post)))
    # left padding: pad tokens before the prefix
    return torch.stack(E), torch.tensor(M), torch.tensor([y for _, y in seqs])


def logits(rows):
    E, M, y = batch(rows)
    pos = (M.cumsum(1) - 1).clamp_min(0)
    out = llm(inputs_embeds=E, attention_mask=M, position_ids=pos).logits[:, -1]
    return out[:, [NO, YES]], (y == YES).long()


opt = torch.optim.AdamW([soft], lr=float(sys.argv[4]) if len(sys.argv) > 4 else 3e-2)
t0 = time.time()
for step in range(STEPS):
    rows = [random.choice(cells[k]) for k in cells for _ in range(4)]
    lg, y = logits(rows)
    loss = torch.nn.functional.cross_entropy(lg.float(), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 20 == 0:
        print(step, round(loss.item(), 4), round(time.time() - t0), flush=True)
right = collections.Counter()
tot = collections.Counter()
with torch.no_grad():
    for i in range(0, len(test), 32):
        rows = test[i : i + 32]
        lg, y = logits(rows)
        for (_d, q, a), p in zip(rows, lg.argmax(1), strict=True):
            k = ("neg" if is_negated(q) else "plain", a)
            tot[k] += 1
            right[k] += int(p.item()) == (a == "yes")
print({f"{k[0]}/{k[1]}": f"{right[k]}/{tot[k]}" for k in sorted(tot)})
print(
    "yes/no",
    sum(right.values()),
    "/",
    sum(tot.values()),
    round(sum(right.values()) / sum(tot.values()), 4),
)
