"""`python -m moekit.train ...` = `moekit train ...` (so torchrun can launch it)."""

import argparse
import sys

from moekit.train import cli

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m moekit.train",
                                     description="train the MoE language model")
    cli.add_arguments(parser)
    sys.exit(cli.run(parser.parse_args()))
