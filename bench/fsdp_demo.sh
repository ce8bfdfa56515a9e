#!/bin/bash
# FSDP as a new user meets it (issue 21's "Done when"), on 2 CPU ranks with gloo:
# WideMLP's states do not fit a 30 MiB per-rank budget under DDP but fit sharded; a sharded
# run killed with kill -9 resumes bit-identically, continues on one rank, exports a plain
# state_dict; strategy auto picks ddp for a small model and fsdp for WideMLP, saying why.
#     bash bench/fsdp_demo.sh            (from the repository root, redline installed)
set -u
T=$(pwd)/tests/tasks/memgpt.py
cd "$(mktemp -d)" && echo "working in $(pwd)"
COMMON="--no-progress --no-report --set train.batch_size=4 --set train.effective_batch_size=16 --set checkpoint.every=10 --set train.eval_every=0"
echo "== 1. ddp under a 30 MiB per-rank budget"
timeout 600 redline train $T:WideMLP --nproc 2 --steps 30 --memory-budget 30MiB $COMMON --run-dir ddp --set distributed.strategy=ddp 2>&1 | grep -v "^W[0-9]\{4\} \|^\*\*\*" | tail -4; echo "exit=${PIPESTATUS[0]}"
echo "== 2. fsdp, uninterrupted reference"
timeout 600 redline train $T:WideMLP --nproc 2 --steps 30 --memory-budget 30MiB $COMMON --run-dir ref --set distributed.strategy=fsdp 2>&1 | grep -v "^W[0-9]\{4\} \|^\*\*\*" | tail -4
echo "== 3. fsdp killed -9 after step 20's checkpoint, then resumed"
(timeout 600 redline train $T:WideMLP --nproc 2 --steps 30 --memory-budget 30MiB $COMMON --run-dir fsdp --set distributed.strategy=fsdp > kill.log 2>&1 &)
for i in $(seq 1 600); do [ -d fsdp/checkpoints/step-00000020 ] && break; sleep 0.1; done
pkill -9 -f "run-dir fsdp"; sleep 2; ls fsdp/checkpoints
timeout 600 redline train $T:WideMLP --nproc 2 --steps 30 --memory-budget 30MiB $COMMON --run-dir fsdp --set distributed.strategy=fsdp --resume 2>&1 | grep -v "^W[0-9]\{4\} \|^\*\*\*" | tail -3
echo "== 4. export both and compare"
redline export ref --to ref.pt && redline export fsdp --to fsdp.pt
python -c "
import torch
a=torch.load('ref.pt',weights_only=True); b=torch.load('fsdp.pt',weights_only=True)
print('bit-identical after kill -9 + resume:', all(torch.equal(a[k],b[k]) for k in a), len(a), 'tensors')
import sys; sys.path.insert(0,'$(dirname $T)'); from memgpt import WideMLP
m=WideMLP().build_model(); m.load_state_dict(a); print('loads into the bare model: ok')"
echo "== 5. resume at one rank (the budget one rank needs)"
timeout 600 redline train $T:WideMLP --steps 40 --memory-budget 64MiB $COMMON --run-dir fsdp --set distributed.strategy=fsdp --resume 2>&1 | tail -4
echo "== 6. auto: small model, then WideMLP under 30 MiB"
timeout 600 redline train $T:MemGPT --nproc 2 --steps 4 --memory-budget 64MiB $COMMON --run-dir auto-small --set distributed.strategy=auto --set task_args.seq=64 2>&1 | grep -i "auto\|strategy\|trained" | head -4
timeout 600 redline train $T:WideMLP --nproc 2 --steps 4 --memory-budget 30MiB $COMMON --run-dir auto-wide --set distributed.strategy=auto 2>&1 | grep -i "auto\|strategy\|trained" | head -4
