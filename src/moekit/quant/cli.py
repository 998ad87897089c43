"""`moekit quantize`: int8 / int4 weights of a trained checkpoint, saved with safetensors."""

from __future__ import annotations

import argparse
import sys

from moekit.config import flag_message
from moekit.quant.tensor import ACTIVATIONS, QuantizationError

# an error about a field leads with the flag that sets it (group_size=64 was refused for a
# run the user had not given --group-size)
FLAGS = {"group_size": "--group-size", "bits": "--bits", "scope": "--scope", "out": "--out"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="run directory (uses its LATEST) or a step_* directory")
    p.add_argument("--bits", type=int, required=True, help="8 (per output channel) or 4")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4 group size along the input: 32, 64 (default) or 128")
    p.add_argument("--scope", choices=("all", "experts"), default="all",
                   help="all: experts + attention, LM head, dense FFNs, shared experts "
                   "(default); experts: routed experts only")
    p.add_argument("--activations", choices=ACTIVATIONS, default="float",
                   help="int8: the decode kernels also round activations to int8 (int4: "
                   "kernels ~2x, a batch-1 step ~1.45x weight-only int4's; int8: batch-16 "
                   "steps 1.1-1.4x weight-only int8's, on AVX-512 VNNI CPUs; batch 1 1.3x "
                   "on AVX2 ones); float: weight-only (default)")
    p.add_argument("--float-embeddings", action="store_true",
                   help="keep an embedding table that is not the LM head's in floating point "
                   "(scope all quantizes it like the head: lookups read only their rows, "
                   "so this costs memory, not speed)")
    p.add_argument("--out", required=True, help="directory to write, new or empty (moekit "
                   "generate --checkpoint DIR loads it)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier `moekit quantize` output in --out (whole: it "
                   "stays as it was until the new one is complete); without it that is "
                   "refused, as `moekit convert` refuses a destination holding a checkpoint")


def run(args: argparse.Namespace) -> int:
    from moekit.errors import exit_code
    from moekit.quant.io import quantize_checkpoint
    from moekit.train.checkpoint import CheckpointError
    from moekit.train.rundir import left_by

    try:
        out = quantize_checkpoint(args.checkpoint, args.out, args.bits, args.group_size,
                                  args.scope, args.activations, not args.float_embeddings,
                                  overwrite=args.overwrite)
    except (QuantizationError, CheckpointError, ValueError) as e:
        print(f"moekit quantize: error: {flag_message(e, FLAGS)}", file=sys.stderr)
        return exit_code(e)  # the checkpoint: 1; a flag's value: 2
    except OSError as e:  # a full disk, a read-only --out: was a traceback from the write
        print(f"moekit quantize: error: could not write out={args.out!r}: "
              f"{e.strerror or e}; {left_by(e)}", file=sys.stderr)
        return 1
    a = ", activations=int8" if args.activations == "int8" else ""
    print(f"wrote {out} (bits={args.bits}, scope={args.scope}{a})")
    return 0
