"""`python -m moekit.train ...` = `moekit train ...` (so torchrun can launch it)."""

import argparse
import sys
import warnings

from moekit.cli import warning_format
from moekit.train import cli

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m moekit.train",
                                     description="train the MoE language model")
    cli.add_arguments(parser)
    # moekit's warnings in the house style, as under `moekit train` (the ranks of an
    # --nproc run start here: theirs had printed as Python's file:line reports)
    warnings.formatwarning = warning_format("train")
    sys.exit(cli.run(parser.parse_args()))
