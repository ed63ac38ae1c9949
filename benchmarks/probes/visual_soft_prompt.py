"""Probe for issue 4: can a learned prompt make the frozen SmolLM2-135M compare an easy-vqa
yes/no question with the image?

Soft-prompt embeddings (NP of them) sit just before the shipped projector's 256 visual tokens.
They train on easy-vqa's yes/no questions, balanced so that yes and no are equally frequent
among plain and among negated questions (`balanced_keep_rates`), 4 train images per step, the
LLM in bfloat16. Every 100 steps the script prints greedy first-token accuracy per
(plain/negated, answer) cell on the yes/no questions of the first NTEST test images
(unbalanced, as the test split comes). Optionally the projector trains too (JOINT = its
learning rate), and a penalty (weight NORM_L) pushes the visual tokens' norms under NORM_T.

It uses the projector-only training helpers of `prumerge.models.train` as they were at commit
a34c537, before training moved to `prumerge.train` with reduction in the loop; run it from that
commit (`git worktree add /tmp/probe a34c537`), where its recorded figures were measured.

Usage:
  python benchmarks/probes/visual_soft_prompt.py NP STEPS NTEST LR [THREADS [JOINT [NORM_T NORM_L]]]

Runs recorded in issue 4's notes and docs/default-model.md (1 thread each, 30 test images,
196 yes/no questions; the shipped model scores 85.6% on them by answering the prior, plain
"no" and negated "yes"; accuracy at steps 100 / 200 / 300 / 400):
  16 400 30 1e-2 1           soft prompt only: 49.5 / 75.3 (plain/yes 4/12, negated/no 0/16),
                             stopped at 220
  16 400 30 1e-2 1 3e-4      soft prompt + projector: 52.1 / 61.3 / 85.6 / 81.4; at 400 the
                             minority cells are right (plain/yes 12/12, negated/no 16/16)
  0 400 30 0 1 1e-3 4 1.0    projector + norm penalty, no prompt: 46.9 / 46.4, stopped at 220
  0 300 30 0 1 3e-4          projector only: stopped at step 80 for CPU, loss still at chance
"""

import collections
import random
import sys
import time

import torch

from prumerge.models import train as T
from prumerge.models.default import (
    build_default_model,
    load_projector_state,
    shipped_projector_path,
)

torch.set_num_threads(int(sys.argv[5]) if len(sys.argv) > 5 else 2)
torch.manual_seed(0)
NP, STEPS, NTEST, LR = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
model, proc = build_default_model(projector=load_projector_state(shipped_projector_path()))
for p in model.parameters():
    p.requires_grad_(False)
lm = model.model.language_model
lm.to(torch.bfloat16)
model.lm_head.to(torch.bfloat16)
N = model.config.image_seq_length
emb = lm.embed_tokens.weight
soft = torch.nn.Parameter(emb[torch.randint(0, 49152, (NP,))].float().clone())
proj = model.model.multi_modal_projector
JOINT = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
NORM_T = float(sys.argv[7]) if len(sys.argv) > 7 else 1e9
NORM_L = float(sys.argv[8]) if len(sys.argv) > 8 else 0.0
if JOINT:
    ids0, _, paths0 = T.load_easy_vqa("train")
    f0 = T.compute_patch_features(model, proc, [paths0[i] for i in ids0[:64]], desc=None).flatten(
        0, 1
    )
    sp = T.StandardizedProjector(proj, f0.mean(0), f0.std(0).clamp_min(1e-6))
    sp.load_folded(load_projector_state(shipped_projector_path()))
    for p in proj.parameters():
        p.requires_grad_(True)
    proj_fn = sp
else:
    proj_fn = proj


class P(torch.nn.Module):
    def forward(self, f):
        v = proj_fn(f)
        global NORMPEN
        NORMPEN = ((v.norm(dim=-1) / NORM_T - 1).clamp_min(0) ** 2).mean()
        return torch.cat([soft.to(v.dtype).expand(v.shape[0], -1, -1), v], 1) if NP else v


P = P()


def data(split, n, balanced):
    ids, turns, paths = T.load_easy_vqa(split)
    ids = ids[:n] if n else ids
    rates = {}
    if balanced:
        allt = [t for i in ids for t in turns[i]]
        rates = T.balanced_keep_rates([q for q, _ in allt], [a for _, a in allt])
    rng = random.Random(0)
    out = []
    for i in ids:
        ts = [
            (q, a)
            for q, a in turns[i]
            if a in ("yes", "no") and (not rates or rng.random() < rates[(T.is_negated(q), a)])
        ]
        if ts:
            out.append((paths[i], ts))
    return out


train = data("train", 4000, True)
test = data("test", NTEST, False)


def enc(ts):
    return T.encode_isolated_turns(proc, ts, N + NP)


trs = [enc(ts) for _, ts in train]
tes = [enc(ts) for _, ts in test]
memo = {}


def feats(rows, split):
    miss = [p for p, _ in rows if p not in memo]
    if miss:
        for p, f in zip(miss, T.compute_patch_features(model, proc, miss, desc=None), strict=True):
            memo[p] = f
    return torch.stack([memo[p] for p, _ in rows])


def evaluate():
    right = collections.Counter()
    tot = collections.Counter()
    with torch.no_grad():
        for k in range(0, len(test), 4):
            rows = test[k : k + 4]
            seqs = tes[k : k + 4]
            # reuse projector_loss internals: compute per-token argmax at answer starts
            ids, lab, pos, seg = [list(c) for c in zip(*seqs, strict=True)]
            L = max(len(x) for x in ids)
            B = len(ids)
            tokens = torch.zeros(B, L, dtype=torch.long)
            S = torch.full((B, L), -1)
            Pp = torch.zeros(B, L, dtype=torch.long)
            Y = torch.full((B, L), -100)
            for b in range(B):
                tokens[b, : len(ids[b])] = ids[b]
                S[b, : len(seg[b])] = seg[b]
                Pp[b, : len(pos[b])] = pos[b]
                Y[b, : len(lab[b])] = lab[b]
            e = lm.embed_tokens(tokens)
            m = (tokens == model.config.image_token_id).unsqueeze(-1).expand_as(e)
            e = e.masked_scatter(m, P(feats(rows, "test")).to(e.dtype))
            h = lm(
                inputs_embeds=e, attention_mask=T.isolation_mask(S), position_ids=Pp
            ).last_hidden_state
            pred = model.lm_head(h).argmax(-1)
            for b, (_, ts) in enumerate(rows):
                starts = [t for t in range(1, L) if Y[b, t] != -100 and Y[b, t - 1] == -100]
                for (q, a), t in zip(ts, starts, strict=False):
                    c = ("neg" if T.is_negated(q) else "plain", a)
                    tot[c] += 1
                    right[c] += int(pred[b, t - 1] == Y[b, t])
    r = {f"{k[0]}/{k[1]}": f"{right[k]}/{tot[k]}" for k in sorted(tot)}
    return r, round(sum(right.values()) / sum(tot.values()), 4)


print("before", evaluate(), flush=True)
if NP or JOINT:
    opt = torch.optim.AdamW(
        ([{"params": [soft], "lr": LR}] if NP else [])
        + ([{"params": list(proj.parameters()), "lr": JOINT}] if JOINT else []),
        weight_decay=0.0,
    )
    rng = random.Random(1)
    t0 = time.time()
    run = []
    for step in range(STEPS):
        idx = [rng.randrange(len(train)) for _ in range(4)]
        loss, _ = T.projector_loss(
            model,
            P,
            feats([train[i] for i in idx], "train"),
            *[list(c) for c in zip(*(trs[i] for i in idx), strict=True)],
        )
        if NORM_L:
            loss = loss + NORM_L * NORMPEN
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.append(loss.item())
        if (step + 1) % 20 == 0:
            print(
                step + 1,
                round(sum(run) / len(run), 4),
                "pen",
                round(float(NORMPEN), 4),
                round(time.time() - t0),
                flush=True,
            )
            run = []
        if (step + 1) % 100 == 0:
            print("eval", evaluate(), flush=True)
