"""Bad input to `moekit generate`, GenerationConfig and Engine.generate: a one-line error
naming the argument, its value and what is allowed, before anything runs."""

from __future__ import annotations

import argparse

import pytest
import torch

from moekit.cli import main as cli_main
from moekit.inference.engine import Engine, GenerationConfig
from moekit.inference.text import ByteText
from moekit.models import MoETransformer, preset
from moekit.train import generate_cli


@pytest.fixture
def run_dir(tmp_path):
    from moekit.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = MoETransformer(preset("tiny")).eval()
    save_checkpoint(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 0, "model_config": model.config.to_dict()})
    return tmp_path / "run"


def _fails(run_dir, capsys, argv, *needles):
    threads = torch.get_num_threads()
    rc = cli_main(["generate", "--checkpoint", str(run_dir), "--max-new-tokens", "3",
                   "--temperature", "0", *argv])
    out = capsys.readouterr()
    err = out.err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert out.out == ""  # nothing generated
    for needle in needles:
        assert needle in err, err
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("value", ["0", "-2"])
def test_threads_not_positive(run_dir, capsys, value):
    _fails(run_dir, capsys, ["--threads", value], f"--threads={value}", "positive int")


def test_bad_prompt_does_not_set_threads(run_dir, capsys):
    _fails(run_dir, capsys, ["--threads", "1" if torch.get_num_threads() > 1 else "2",
                             "--prompt", ""], "empty")


@pytest.mark.parametrize("seed", [2**64, -1])
def test_seed_out_of_range(run_dir, capsys, seed):
    with pytest.raises(ValueError, match=f"seed={seed} is not allowed"):
        GenerationConfig(seed=seed)
    _fails(run_dir, capsys, ["--seed", str(seed)], f"seed={seed}", "[0, 9223372036854775807]")


def test_seed_out_of_range_allocates_nothing():
    engine = Engine(MoETransformer(preset("tiny")).eval())
    with pytest.raises(ValueError, match="seed="):
        engine.generate([[1, 2]], GenerationConfig(max_new_tokens=2, seed=2**64))
    assert engine.cache is None


def _stops(*stops: str) -> tuple[tuple[int, ...], ...]:
    args = argparse.Namespace(max_new_tokens=3, temperature=0.0, top_k=None, top_p=None,
                              seed=0, stop=list(stops))
    return generate_cli._config(args, ByteText())[0].stop_sequences


@pytest.mark.parametrize("typed,want", [
    ("é\\n", "é\n"),  # was 'Ã©\n': the stop never matched
    ("€\\t", "€\t"),
    ("\\u00e9", "é"),
    ("a\\\\b", "a\\b"),
    ("\\n", "\n"),
    ("é", "é"),
])
def test_stop_escapes_keep_non_ascii_text(typed, want):
    assert _stops(typed) == (tuple(want.encode("utf-8")),)


@pytest.mark.parametrize("typed", ["\\", "ab\\", "\\x4"])
def test_stop_bad_escape_names_the_flag(run_dir, capsys, typed):
    _fails(run_dir, capsys, ["--stop", typed], f"--stop={typed!r}", "escape")


def test_prompts_file_not_utf8_names_the_flag(run_dir, tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café\n".encode("latin-1"))
    _fails(run_dir, capsys, ["--prompts-file", str(path)], f"--prompts-file={str(path)!r}",
           "UTF-8")


@pytest.mark.parametrize("kwargs,name", [
    (dict(generator=42), "generator=42"),  # was a TypeError from multinomial after the prefill
    (dict(config={"max_new_tokens": 2}), "config="),
])
def test_engine_bad_generator_or_config(kwargs, name):
    engine = Engine(MoETransformer(preset("tiny")).eval())
    with pytest.raises(ValueError, match=name):
        engine.generate([[1, 2]], **kwargs)
    assert engine.cache is None  # rejected before the cache is made


def test_no_cache_rejects_stop(run_dir, capsys):  # --stop was silently ignored
    _fails(run_dir, capsys, ["--no-cache", "--stop", "x"], "--stop='x'", "--no-cache")


def test_no_cache_runs(run_dir, capsys):
    assert cli_main(["generate", "--checkpoint", str(run_dir), "--max-new-tokens", "3",
                     "--temperature", "0", "--no-cache", "--prompt", "ab"]) == 0
    assert capsys.readouterr().out.startswith("ab")


@pytest.mark.parametrize("kwargs,name", [
    (dict(stop_ids=(1, 300)), "stop_ids="),  # were silently never hit (vocab 256)
    (dict(stop_sequences=((65,), (66, 256))), r"stop_sequences\[1\]="),
])
def test_engine_stop_ids_past_the_vocabulary(kwargs, name):
    engine = Engine(MoETransformer(preset("tiny")).eval())
    with pytest.raises(ValueError, match=name):
        engine.generate([[1, 2]], GenerationConfig(max_new_tokens=2, **kwargs))
    assert engine.cache is None


def test_expert_memory_on_a_dense_checkpoint_is_named(tmp_path, capsys):
    """--expert-memory on a `moekit train --dense` run: one line naming the flag, not
    "max() arg is an empty sequence"."""
    from moekit.train.checkpoint import save_checkpoint

    model = MoETransformer(preset("tiny").replace(dense=True))
    save_checkpoint(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 0, "model_config": model.config.to_dict()})
    _fails(tmp_path / "run", capsys, ["--expert-memory", "24KiB"],
           "--expert-memory: expert_memory='24KiB' is not allowed", "dense")


def test_prompts_file_directory_is_named_as_one(run_dir, tmp_path, capsys):
    """A directory was refused as 'no such file'."""
    _fails(run_dir, capsys, ["--prompts-file", str(tmp_path)],
           f"--prompts-file={str(tmp_path)!r} is not allowed: it is a directory")


def test_prompts_file_reads_a_named_pipe(run_dir, tmp_path, capsys):
    """A named pipe (what ``<(cmd)`` gives) was refused as 'no such file'; its prompts
    generate as a regular file's do."""
    import os
    import threading

    fifo, plain = tmp_path / "fifo", tmp_path / "plain.txt"
    plain.write_text("ab\ncd\n")
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_text, args=("ab\ncd\n",), daemon=True)
    writer.start()
    argv = ["generate", "--checkpoint", str(run_dir), "--max-new-tokens", "3",
            "--temperature", "0", "--prompts-file"]
    rc = cli_main([*argv, str(fifo)])
    writer.join(timeout=10)
    if writer.is_alive():  # the command never opened the pipe: free the blocked writer
        fifo.read_bytes()
        writer.join()
    piped = capsys.readouterr().out
    assert rc == 0
    assert cli_main([*argv, str(plain)]) == 0
    assert piped == capsys.readouterr().out and "ab" in piped and "cd" in piped


def test_prompts_file_that_does_not_exist(run_dir, tmp_path, capsys):
    path = tmp_path / "absent.txt"
    _fails(run_dir, capsys, ["--prompts-file", str(path)],
           f"--prompts-file={str(path)!r} is not allowed: no such file")


@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf"])  # empty; a UTF-8 BOM alone
def test_prompts_file_without_a_prompt(run_dir, tmp_path, capsys, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    _fails(run_dir, capsys, ["--prompts-file", str(path)],
           f"--prompts-file={str(path)!r} holds no prompt: it must have one prompt per line")


@pytest.mark.parametrize("flags", [["--samples", "0"], ["--batch", "0"], ["--samples", "-3"]])
def test_samples_and_batch_must_be_positive(run_dir, capsys, flags):
    _fails(run_dir, capsys, ["--prompt", "hi", *flags], f"{flags[0]}={flags[1]}",
           "both must be >= 1")
