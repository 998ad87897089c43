"""Quality of a quantized `moekit train` model: validation loss and greedy agreement
with the fp32 model, for every weight quantized (``scope="all"``, the default) and
for the routed experts alone (``--scopes all experts``); ``--float-embeddings`` adds
scope all with an untied embedding table kept float; ``--a8`` adds int8 and int4
with int8 activations (``activations="int8"``, scope all), measured on the kernels.

Validation loss: the trainer's own ``evaluate`` (fixed held-out windows, here
``--eval-batches`` of 16 x 128 bytes), the same windows for every variant.
Greedy agreement: over ``--bytes`` held-out bytes (windows of the model's
context), the fraction of positions where the quantized model's argmax next byte
equals the fp32 model's (teacher-forced on the same text), and the length of
free-running greedy generation from a prompt before the first differing byte.

    PYTHONPATH=src python benchmarks/quant_quality.py --checkpoint runs/train

A quickly trained model to run it on (~60 min with the 2-core box loaded 9-15):

    PYTHONPATH=src python -m moekit.cli train --steps 200 --batch-size 8 --seq-len 128 \
        --eval-every 200 --eval-batches 2 --out /tmp/run200
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os

import torch

from moekit.experts import backends
from moekit.functions import decode
from moekit.quant import quantize
from moekit.quant.io import load_model
from moekit.train.data import encode, load_corpus
from moekit.train.trainer import TrainConfig, evaluate


def agreement(a, b, data_N, n_bytes: int, ctx: int) -> float:
    same = total = 0
    for start in range(0, n_bytes, ctx):
        ids = data_N[start:start + min(ctx, n_bytes - start)][None].long()
        same += int((a(ids).logits.argmax(-1) == b(ids).logits.argmax(-1)).sum())
        total += ids.numel()
    return same / total


def free_run(model, prompt: str, n: int) -> torch.Tensor:
    ids = encode(prompt)[None]
    for _ in range(n):
        window = ids[:, -model.config.max_seq_len:]
        ids = torch.cat([ids, model(window).logits[:, -1:].argmax(-1)], 1)
    return ids[0]


@contextlib.contextmanager
def on_kernels(enable: bool):
    """Every row of quantized projections on the decode kernels (which alone round
    activations to int8): past their row limits the model dequantizes and runs
    float activations, so an int8-activation model must be measured with them off."""
    saved = backends.QUANT_KERNEL_MAX_ROWS, decode.QUANT_LINEAR_MAX_ROWS
    if enable:
        backends.QUANT_KERNEL_MAX_ROWS = decode.QUANT_LINEAR_MAX_ROWS = 1 << 30
    try:
        yield
    finally:
        backends.QUANT_KERNEL_MAX_ROWS, decode.QUANT_LINEAR_MAX_ROWS = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--bytes", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--groups", type=int, nargs="+", default=[64])
    p.add_argument("--scopes", nargs="+", default=["all", "experts"],
                   help="what to quantize: all (experts + dense projections), experts")
    p.add_argument("--float-embeddings", action="store_true",
                   help="also scope all with an untied embedding table kept float "
                   "(embeddings=False): what quantizing the table costs")
    p.add_argument("--a8", action="store_true",
                   help="also int8 and int4 with int8 activations (scope all), every row on "
                   "the kernels")
    p.add_argument("--free-run", type=int, default=100, help="greedy bytes from 'def '")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    fp32 = load_model(args.checkpoint)
    corpus = load_corpus()
    # the trainer's evaluation windows, cut to what the model was built for (a tiny
    # preset's max_seq_len=64 is shorter than TrainConfig's default seq_len of 128)
    default = TrainConfig()
    cfg = TrainConfig(eval_batches=args.eval_batches,
                      seq_len=min(default.seq_len, fp32.config.max_seq_len))
    variants = {"fp32": fp32}
    for scope in args.scopes:
        tag = "" if scope == "all" else f"-{scope}"
        variants[f"int8{tag}"] = quantize(copy.deepcopy(fp32), bits=8, scope=scope)
        variants.update({f"int4-g{g}{tag}": quantize(copy.deepcopy(fp32), bits=4, group_size=g,
                                                     scope=scope) for g in args.groups})
    if args.float_embeddings:
        variants["int8-float-table"] = quantize(copy.deepcopy(fp32), bits=8, embeddings=False)
        variants.update({f"int4-g{g}-float-table": quantize(copy.deepcopy(fp32), bits=4,
                                                            group_size=g, embeddings=False)
                         for g in args.groups})
    if args.a8:
        variants["int8a8"] = quantize(copy.deepcopy(fp32), bits=8, activations="int8")
        variants.update({f"int4a8-g{g}": quantize(copy.deepcopy(fp32), bits=4, group_size=g,
                                                  activations="int8") for g in args.groups})
    ctx = fp32.config.max_seq_len
    rows = {}
    with torch.inference_mode():
        base_run = free_run(fp32, "def ", args.free_run)
        for name, model in variants.items():
            with on_kernels("a8" in name):
                loss = evaluate(model, corpus.val, cfg)
                agree = agreement(fp32, model, corpus.val, args.bytes, ctx)
                run = free_run(model, "def ", args.free_run)
            diff = (run != base_run).nonzero()
            first = int(diff[0]) - 4 if diff.numel() else args.free_run
            rows[name] = {"val_loss": loss, "greedy_agreement": agree,
                          "free_run_identical_bytes": first}
            print(name, rows[name], flush=True)
    base = rows["fp32"]["val_loss"]
    print(f"checkpoint {args.checkpoint}  {args.eval_batches} x {cfg.batch_size} x "
          f"{cfg.seq_len} validation bytes  "
          f"agreement over {args.bytes} bytes  load {os.getloadavg()[0]:.2f}")
    print(f"{'weights':>18} {'val loss':>9} {'vs fp32':>8} {'greedy agree':>12} "
          f"{'free-run same':>13}  (of {args.free_run})")
    for name, r in rows.items():
        print(f"{name:>18} {r['val_loss']:>9.4f} {100 * (r['val_loss'] / base - 1):>+7.2f}% "
              f"{100 * r['greedy_agreement']:>11.1f}% {r['free_run_identical_bytes']:>13}")
    if args.out:
        from harness import write_json  # benchmarks/harness.py, beside this file

        write_json(args.out, rows, indent=1)


if __name__ == "__main__":
    main()
