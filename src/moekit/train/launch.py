"""`moekit train --nproc N --ep E`: expert-parallel training launched through torchrun.

``moekit train --nproc 4 --ep 2 ...`` becomes torchrun's agent, in its own process, for
``torchrun --standalone --nproc-per-node 4 -m moekit.train ...``;
``torchrun --nproc-per-node 4 -m moekit.train --ep 2 ...`` works directly. Under
torchrun (WORLD_SIZE set) the run uses a (dp = world / ep, ep) mesh, gloo on
CPU and NCCL on GPUs.

Stopping: a first SIGINT or SIGTERM to any rank stops every rank after the same step
(``DistributedTrainer.agreed_stop``), each saving its part of one checkpoint, and each
exits 130 (Ctrl-C) or 143 (SIGTERM); rank 0 prints one line. Ctrl-C to the launcher
reaches the ranks through torchrun's agent, which sends them the signal it got.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from typing import NoReturn

import torch
import torch.distributed as dist

from moekit.config import check_number, check_positive_int
from moekit.distributed import CollectiveTimeoutError, init_distributed, init_mesh
from moekit.distributed.layer import DISPATCHERS, check_dedup
from moekit.distributed.mesh import DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S
from moekit.errors import exit_code
from moekit.train.interrupt import STOP_SIGNALS, InterruptFlag, StopAtBoundary, exit_status

# Signals torchrun's agent forwards to the ranks (its default list): restored after it ran
AGENT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def add_distributed_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism (torch.distributed)")
    g.add_argument("--nproc", type=int, default=1,
                   help="processes to launch on this machine through torchrun (default 1)")
    g.add_argument("--ep", type=int, default=1,
                   help="expert-parallel size; dp = world size / ep (default 1)")
    g.add_argument("--dispatcher", choices=DISPATCHERS, default="all_to_all")
    g.add_argument("--overlap-chunks", type=int, default=1,
                   help="split the all-to-all into chunks overlapped with expert compute")
    g.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help=f"collective timeout in seconds (default {DEFAULT_TIMEOUT_S:g}): a "
                        "dead rank makes the others stop with an error instead of hanging")


def check_parallel_flags(args: argparse.Namespace) -> None:
    """--nproc, --ep, --timeout and --overlap-chunks, before torchrun starts anything: a
    bad --timeout or --overlap-chunks had passed to every rank, each of which stopped
    with its own error (a traceback for --timeout) under torchrun's report."""
    for flag in ("nproc", "ep"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag}={getattr(args, flag)} is not allowed: it must be >= 1")
    check_number("--timeout", args.timeout, 0, MAX_TIMEOUT_S, low_open=True)
    check_positive_int("--overlap-chunks", args.overlap_chunks)
    # (a resumed run's capacity factor is its checkpoint's: the layer checks that one)
    check_dedup(args.dispatcher, getattr(args, "capacity_factor", None), args.overlap_chunks,
                prefix="--")


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def wants_distributed(args: argparse.Namespace) -> bool:
    return args.nproc > 1 or args.ep > 1 or under_torchrun()


def _forwarded_argv() -> list[str]:
    """This command's arguments without ``--nproc`` (and without a leading "train")."""
    argv = sys.argv[1:]
    if argv[:1] == ["train"]:
        argv = argv[1:]
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch_torchrun(args: argparse.Namespace) -> int:
    """Run this command under torchrun with ``args.nproc`` local processes, this process
    being torchrun's agent; the exit status is the ranks' when they all agree (0, 1, 2,
    130, 143), else 1 with one line naming each rank's.

    It had run torchrun as a child through ``subprocess.call``. A SIGINT or SIGTERM to the
    launcher alone (``kill``) never reached the ranks, which trained on with no parent (on
    SIGINT the launcher SIGKILLed torchrun 0.25 s later, ``Popen.wait``'s grace);
    Ctrl-C in a terminal, which signals torchrun too, stopped them with a traceback from
    each rank and one from torchrun. Here the agent sends the ranks the signal it got
    (after a second one: SIGTERM, which stops them at once), waits for them, and its
    report of the ranks becomes this function's exit status."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = ["--standalone", f"--nproc-per-node={args.nproc}", "-m", "moekit.train",
            *_forwarded_argv()]
    print("launching: torchrun", " ".join(argv), flush=True)
    torchrun_args = parse_args(argv)
    if getattr(torchrun_args, "shutdown_timeout", 0) is None and \
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ:
        # after forwarding a signal the agent SIGKILLs the ranks still running after this
        # (default 30 s), losing the checkpoint of a step or a save that takes longer; a
        # rank waits at most --timeout in any collective
        torchrun_args.shutdown_timeout = int(args.timeout) + 60
    try:
        with _quiet_agent():
            run(torchrun_args)
    except SignalException as e:  # the ranks got it too, and stopped
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        return ranks_status({rank: f.exitcode for rank, f in e.failures.items()}, args.nproc)
    return 0


@contextlib.contextmanager
def _quiet_agent() -> Iterator[None]:
    """torchrun's agent logs each signal it forwards and each rank it closes (warnings),
    and a rank's non-zero exit (an error, before its report): the ranks say what happened
    themselves, and ``ranks_status`` the rest. Its signal handlers go when it is done."""
    names = [n for n in list(logging.root.manager.loggerDict)
             if n.startswith("torch.distributed.elastic")]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    handlers = {s: signal.getsignal(s) for s in AGENT_SIGNALS}
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        for s, handler in handlers.items():
            if handler is not None:
                signal.signal(s, handler)


def ranks_status(codes: dict[int, int], nproc: int) -> int:
    """The launcher's exit status from the ranks' non-zero ones (``codes``, by rank;
    negative: killed by that signal, which a shell reports as 128 + it). Every rank
    ended alike: theirs (130 / 143: stopped after one step and saved, as rank 0 printed;
    1 or 2: an error each printed). Else 1. One line names each rank's unless every rank
    exited alike by itself."""
    shell = {rank: 128 - code if code < 0 else code for rank, code in codes.items()}
    alike = len(codes) == nproc and len(set(shell.values())) == 1
    if alike and min(codes.values()) > 0:
        return next(iter(shell.values()))
    print(f"moekit train: {'' if alike else 'error: '}" + ", ".join(
        f"rank {rank} {_status_text(code)}" for rank, code in sorted(codes.items()))
        + (f"; the other {nproc - len(codes)} exited 0" if len(codes) < nproc else ""),
        file=sys.stderr, flush=True)
    return next(iter(shell.values())) if alike else 1


def _status_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited {code}"


def _build(args: argparse.Namespace, mesh):
    from moekit.train.cli import (
        RESUME_FLAGS,
        TRAIN_FLAGS,
        configs_from_args,
        describe_model,
        picked,
        recorded_corpus,
    )
    from moekit.train.data import load_corpus
    from moekit.train.distributed import (
        DCP_PREFIX,
        DistributedTrainer,
        resumable_checkpoint,
        resume_state,
    )

    ep_kwargs = {"dispatcher": args.dispatcher, "overlap_chunks": args.overlap_chunks}
    if args.resume:  # a dcp_step_* directory, or a run directory: its newest complete one
        path = resumable_checkpoint(args.resume, mesh)
        # the corpus the run was trained on, which its checkpoint names (runs saved before
        # it did: the default corpus unless --data is given)
        source = args.data if args.data is not None else recorded_corpus(
            args.resume, resume_state(path).get("data", {}).get("corpus"))
        corpus = load_corpus(source)
        overrides = {k: v for k, v in picked(args, TRAIN_FLAGS).items() if k in RESUME_FLAGS}
        trainer = DistributedTrainer.resume_distributed(
            path, corpus, mesh, progress=not args.no_progress, ep_kwargs=ep_kwargs,
            **overrides)
        if trainer.step >= trainer.cfg.steps:
            raise ValueError(f"resume={args.resume!r} is already at step {trainer.step} of "
                             f"steps={trainer.cfg.steps}: pass a larger --steps to continue")
    else:
        corpus = load_corpus(args.data)
        model_cfg, train_cfg = configs_from_args(args)
        trainer = DistributedTrainer(model_cfg, train_cfg, corpus, args.out, mesh,
                                     progress=not args.no_progress, **ep_kwargs)
    if dist.get_rank() == 0:
        print(corpus.describe())
        print(f"model: {describe_model(full_model(trainer.mcfg), trainer.mcfg)}")
        print(f"mesh: dp={mesh.dp} x ep={mesh.ep}, backend {dist.get_backend()}, "
              f"dispatcher {args.dispatcher}, collective timeout {mesh.timeout_s:g} s")
        print(f"run directory: {trainer.out_dir} (metrics.jsonl, {DCP_PREFIX}* checkpoints)")
    return trainer


def full_model(mcfg):
    """The whole model on the meta device (no memory, no draw from the RNG): what the
    model line counts. Rank 0's own model holds its experts only; counted there, the tiny
    preset at ep=2 read "29,088 parameters, 16,800 active per token" where the model has
    41,376 and 29,088."""
    from moekit.meta import meta_device
    from moekit.models import MoETransformer
    with torch.random.fork_rng(devices=[]), meta_device():
        return MoETransformer(mcfg)


def _report(trainer, summary: dict | None) -> None:
    from moekit.models.generate import generate
    from moekit.train.data import decode, encode

    prompt = encode("def ")[None].to(trainer.cfg.device)
    new = min(120, trainer.mcfg.max_seq_len - prompt.shape[1])
    sample = generate(trainer.model, prompt, new, temperature=0.8, top_k=40)
    if summary is None:
        return
    print(f"done: step {summary['step']}, validation loss {summary['val_loss']:.3f} "
          f"nats/byte, {summary['tokens_per_s']:.0f} tokens/s in training steps (all ranks), "
          f"{summary['skipped_steps']} skipped steps")
    print(f"checkpoint: {summary['checkpoint']}")
    print("sample:\n" + decode(sample[0]))


def validate(args: argparse.Namespace, world: int) -> None:
    """Every check that needs no process group, before torchrun starts anything: one line
    naming the flag, its value and what is allowed (ValueError), nothing created."""
    from moekit.train.cli import (
        check_device_flag,
        check_new_out,
        check_resume_flags,
        check_resume_path,
        configs_from_args,
        size_flags,
        warn_unused_by_dense,
    )
    from moekit.train.memory import check_model_memory

    check_parallel_flags(args)
    check_device_flag(args)
    if world % args.ep:
        raise ValueError(f"--ep={args.ep} is not allowed with {world} processes: it must "
                         f"divide the number of processes (here one of "
                         f"{[d for d in range(1, world + 1) if world % d == 0]})")
    if args.resume:
        check_resume_path(args.resume)
        check_resume_flags(args)  # a flag that would change a saved setting is refused
        check_resume_fits(args, world)
        return
    model, train = configs_from_args(args)
    if not under_torchrun():  # the launcher, once (each rank ran this check again)
        warn_unused_by_dense(args)
    check_ep_has_experts(args.ep, model)
    if train.batch_size % world:
        raise ValueError(f"--batch-size={train.batch_size} is not allowed with {world} "
                         "processes: it must be a multiple of the number of processes")
    if not model.dense and model.num_experts % args.ep:
        raise ValueError(f"--ep={args.ep} is not allowed with {model.num_experts} experts: "
                         "it must divide the number of experts")
    check_new_out(args.out)
    # every process builds the whole model here before its experts are split
    check_model_memory(model, size_flags(args), train.device, processes=world)


def check_ep_has_experts(ep: int, model, where: str = "") -> None:
    """--ep > 1 needs experts to shard: a dense model (--dense, or one with no MoE layer)
    had been accepted, printed "mesh: dp=1 x ep=2" and trained as plain data parallelism."""
    if ep > 1 and not any(model.is_moe_layer(i) for i in range(model.num_layers)):
        what = "a dense model (--dense)" if model.dense else "a model with no MoE layer"
        raise ValueError(f"--ep={ep} is not allowed{where}: {what} has no experts to "
                         "shard; it must be 1 (use --nproc N alone for data parallelism)")


def check_resume_fits(args: argparse.Namespace, world: int) -> None:
    """The saved run against this session's processes, --ep and --steps, before torchrun
    starts: each rank had found these itself, once started, every one printing the same
    error under torchrun's failure report."""
    from moekit.models import LMConfig
    from moekit.train.distributed import resume_candidate, resume_state
    from moekit.train.trainer import TrainConfig

    state = resume_state(resume_candidate(args.resume))
    model = LMConfig.from_dict(state["model_config"])
    train = TrainConfig.from_dict(state["train_config"])
    if train.batch_size % world:
        procs = f"WORLD_SIZE={world}" if under_torchrun() else f"--nproc={world}"
        fits = [d for d in range(1, train.batch_size + 1) if train.batch_size % d == 0]
        raise ValueError(f"{procs} is not allowed with --resume={args.resume}: the number "
                         f"of processes must divide the run's batch size {train.batch_size} "
                         f"(the global batch; here one of {fits})")
    check_ep_has_experts(args.ep, model, f" with --resume={args.resume}")
    if not model.dense and model.num_experts % args.ep:
        raise ValueError(f"--ep={args.ep} is not allowed with --resume={args.resume}: it "
                         f"must divide the run's {model.num_experts} experts")
    steps = train.steps if args.steps is None else args.steps
    if state["step"] >= steps:
        raise ValueError(f"--resume={args.resume} is already at step {state['step']} of "
                         f"steps={steps}: pass a larger --steps to continue")


def run_distributed(args: argparse.Namespace) -> int:
    """Train on a (dp, ep) mesh (re-launching under torchrun when asked for --nproc)."""
    if not under_torchrun() and args.nproc == 1:
        print(f"moekit train: error: --ep={args.ep} needs several processes: add "
              "--nproc N (or launch with torchrun)", file=sys.stderr)
        return 2
    world = int(os.environ["WORLD_SIZE"]) if under_torchrun() else args.nproc
    try:  # before torchrun starts, and on every rank before the first write
        validate(args, world)
    except ValueError as e:  # CheckpointError (a --resume that cannot be read): 1
        print(f"moekit train: error: {e}", file=sys.stderr)
        return exit_code(e)
    if not under_torchrun():
        return launch_torchrun(args)
    return run_rank(args)


def run_rank(args: argparse.Namespace) -> int:
    """This rank's part of the run, under torchrun. A first SIGINT or SIGTERM, from the
    start on, stops every rank at one step boundary (it had killed a rank that got SIGTERM
    before training started, the others then failing on the dead peer); a second stops
    this rank at once."""
    with InterruptFlag() as interrupt:
        init_distributed(timeout_s=args.timeout)
        rank = dist.get_rank()
        trainer = None
        try:
            if dist.get_world_size() % args.ep:
                raise ValueError(f"--ep={args.ep} is not allowed: it must divide the world "
                                 f"size {dist.get_world_size()}")
            mesh = init_mesh(dp=dist.get_world_size() // args.ep, ep=args.ep)
            trainer = _build(args, mesh)
            trainer.resume_hint = (f"moekit train --nproc {dist.get_world_size()}"
                                   f"{f' --ep {args.ep}' if args.ep > 1 else ''} "
                                   f"--resume {trainer.out_dir}")
            summary = trainer.fit(interrupt)
            torch.manual_seed(0)  # every rank samples alike: the EP forward is collective
            _report(trainer, summary if rank == 0 else None)
        except CollectiveTimeoutError as e:
            print(f"moekit train (rank {rank}): error: {e}", file=sys.stderr, flush=True)
            _exit(1)  # the process group is broken; its destructors would wait on the peer
        except ValueError as e:  # CheckpointError is one (exit 1, a bad flag 2)
            _exit_on_error(rank, e)
        except OSError as e:  # a full disk: was this rank's traceback from its save
            if trainer is None:
                raise
            from moekit.train.cli import write_failed_text
            from moekit.train.distributed import find_resumable
            # from the disk: rank 0 completes dcp_step_N before it writes step_N, and a
            # failure there had named dcp_step_N-1 (what trainer.last_checkpoint holds)
            with contextlib.suppress(ValueError, OSError):  # CheckpointError: none yet
                trainer.last_checkpoint = find_resumable(trainer.out_dir)
            print(f"moekit train (rank {rank}): error: {write_failed_text(trainer, e)}",
                  file=sys.stderr, flush=True)
            _exit(1)  # a peer may wait in a collective on this rank: no barrier, no teardown
        except StopAtBoundary as e:  # every rank stopped after the same step and saved
            _exit_together(exit_status(e))
        except KeyboardInterrupt as e:  # a second signal
            if trainer is None and rank == 0:
                print("moekit train: interrupted before training started: nothing was "
                      "trained or saved", file=sys.stderr)
            _exit(exit_status(e))  # a peer may be inside a collective: no barrier, no teardown
    # every rank done with its collectives before any tears the group down; then out
    # without the interpreter's teardown. torch's DTensor redistribute-planner cache (a
    # module global) keeps the DeviceMesh alive, and its registry the gloo groups: their
    # threads (pt_gloo_runloop, gloo_tcp_loop: seen alive at exit) outlive
    # destroy_process_group into Python's finalization and the C++ static destructors.
    # That is the likely cause of a finished run's rare abort there ("terminate called
    # without an active exception", a thread object destroyed unjoined; a few CI runs in
    # tens). Every file this rank wrote is closed by now; _exit flushes stdout and stderr.
    dist.barrier()
    dist.destroy_process_group()
    _exit(0)


def _exit_on_error(rank: int, e: ValueError) -> NoReturn:
    """End this rank with its one-line error and ``exit_code(e)``, at once and deaf to
    SIGINT and SIGTERM. It had returned the code, leaving the stop handlers for the
    defaults while the interpreter tore down the process group: torchrun's agent, which
    SIGTERMs the ranks still running once one has exited, killed the slower rank there,
    and a corpus too short for --seq-len (found by every rank) ended the launcher with
    exit 1 and "rank 0 was killed by SIGTERM, rank 1 exited 2" instead of exit 2."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    print(f"moekit train (rank {rank}): error: {e}", file=sys.stderr)
    _exit(exit_code(e))


def _exit_together(status: int) -> NoReturn:
    """End this rank with ``status`` once every rank got here (each has saved its part of
    the checkpoint and stopped after the same step). SIGINT and SIGTERM are ignored from
    here on: torchrun's agent terminates the ranks still running once one has exited
    (SIGTERM), which would turn a peer still printing or exiting into one killed by that
    signal. No teardown of the process group (see the note at the end of run_rank)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    with contextlib.suppress(RuntimeError):  # a peer gone now: the checkpoint is whole
        dist.barrier()
    _exit(status)


def _exit(status: int) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
