"""`moekit generate`: one prompt and seed give one text however it is run (streamed alone,
first line of a prompts file, --jsonl, --no-cache, the Python engine), and a prompts
file's lines are split at newlines only.

The references are the engine's ``generate`` with a generator seeded by hand (the seed
itself for sequence 0, ``(seed + 1) * 1_000_003 + i`` for sequence i, written out here) and
the bytes decoded with Python's own UTF-8 decoder.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from moekit.cli import main as cli_main
from moekit.inference.engine import ContextLengthError, Engine, GenerationConfig
from moekit.models import MoETransformer, preset
from moekit.train.checkpoint import save_checkpoint

NEW, SEED = 10, 7


def _run(tmp_path):
    torch.manual_seed(0)
    model = MoETransformer(preset("tiny")).eval()
    save_checkpoint(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 0, "model_config": model.config.to_dict()})
    return model, ["generate", "--checkpoint", str(tmp_path / "run"), "--max-new-tokens",
                   str(NEW), "--temperature", "0.9", "--top-p", "0.95", "--seed", str(SEED)]


def _engine_text(model, prompt: str, seed: int) -> str:
    (g,), _ = Engine(model).generate([list(prompt.encode())], GenerationConfig(
        max_new_tokens=NEW, temperature=0.9, top_p=0.95), generator=torch.Generator()
        .manual_seed(seed))
    return bytes(g.tokens).decode("utf-8", errors="replace")


def test_a_prompt_draws_one_text_however_it_is_run(tmp_path, capsys):
    model, base = _run(tmp_path)
    texts = ["def f(", "class A:", "x"]
    want = [_engine_text(model, t, SEED if i == 0 else (SEED + 1) * 1_000_003 + i)
            for i, t in enumerate(texts)]
    assert cli_main([*base, "--prompt", texts[0]]) == 0  # streamed
    assert capsys.readouterr().out == texts[0] + want[0] + "\n"
    (tmp_path / "p.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "one.txt").write_text(texts[0] + "\n")
    for prompts, n in (("p.txt", 3), ("one.txt", 1)):
        out = tmp_path / "out.jsonl"
        assert cli_main([*base, "--prompts-file", str(tmp_path / prompts), "--jsonl",
                         str(out)]) == 0
        capsys.readouterr()
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["text"] for r in records] == want[:n]  # the first had drawn another text
    assert cli_main([*base, "--prompts-file", str(tmp_path / "p.txt")]) == 0
    printed = capsys.readouterr().out
    assert printed == "".join(f"--- {i} (length, {NEW} tokens)\n{t}{w}\n"
                              for i, (t, w) in enumerate(zip(texts, want, strict=True)))
    # the slow reference: the same texts (one generator for every prompt had drawn others)
    assert cli_main([*base, "--prompts-file", str(tmp_path / "p.txt"), "--no-cache"]) == 0
    assert capsys.readouterr().out == "".join(
        f"--- {i}\n{t}{w}\n" for i, (t, w) in enumerate(zip(texts, want, strict=True)))


def test_prompts_file_lines_split_at_newlines_only(tmp_path, capsys):
    """CRLF and LF endings, a final newline, a byte-order mark, and characters
    str.splitlines splits at (form feed, U+2028, \\x1c, \\x85) inside a line."""
    _, base = _run(tmp_path)
    raw = "\ufeffa\x0cb\r\nc\u2028d\n e\x1cf\x85\n".encode()
    (tmp_path / "p.txt").write_bytes(raw)
    out = tmp_path / "out.jsonl"
    assert cli_main([*base, "--temperature", "0", "--prompts-file", str(tmp_path / "p.txt"),
                     "--jsonl", str(out)]) == 0
    capsys.readouterr()
    # JSON lines end at "\n" (json.dumps writes U+2028 and \x85 as they are)
    lines = out.read_text(encoding="utf-8").split("\n")[:-1]
    prompts = [json.loads(line)["prompt"] for line in lines]
    assert prompts == ["a\x0cb", "c\u2028d", " e\x1cf\x85"]
    (tmp_path / "q.txt").write_bytes(b"a\r\n\r\nb\r\n")  # an empty CRLF line is named
    assert cli_main([*base, "--prompts-file", str(tmp_path / "q.txt")]) == 2
    assert "line 2 of --prompts-file is empty" in capsys.readouterr().err


def test_a_prompt_past_the_context_is_named_by_its_line(tmp_path, capsys):
    """The tiny preset's context is 64: line 3 (of 4, two samples each) is 70 bytes."""
    _, base = _run(tmp_path)
    (tmp_path / "p.txt").write_text("ab\nc\n" + "a" * 70 + "\nd\n")
    assert cli_main([*base, "--prompts-file", str(tmp_path / "p.txt"), "--samples", "2"]) == 2
    err = capsys.readouterr().err
    assert "line 3 of --prompts-file: prompt of 70 tokens is too long" in err, err
    assert cli_main([*base, "--prompt", "a" * 60]) == 2  # 60 + 10 new > 64
    err = capsys.readouterr().err
    assert "--prompt: prompt of 60 tokens + max_new_tokens=10 is not allowed" in err, err
    with pytest.raises(ContextLengthError, match=r"prompts\[1\]: prompt of 70 tokens") as e:
        Engine(MoETransformer(preset("tiny"))).generate([[1], [2] * 70])
    # the index as data (the CLI read it back out of the message with a regex)
    assert e.value.prompt == 1
    assert str(e.value) == "prompts[1]: " + e.value.detail
    copy = pickle.loads(pickle.dumps(e.value))  # e.g. from a worker process
    assert (copy.prompt, str(copy)) == (1, str(e.value))


@pytest.mark.parametrize("flag,value,shown", [
    ("--max-new-tokens", "0", "max_new_tokens=0"), ("--temperature", "-1", "temperature=-1.0"),
    ("--top-k", "0", "top_k=0"), ("--top-p", "1.5", "top_p=1.5")])
def test_a_bad_sampling_flag_is_named_as_the_flag(tmp_path, capsys, flag, value, shown):
    _, base = _run(tmp_path)
    assert cli_main([*base, "--prompt", "ab", flag, value]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith(
        f"moekit generate: error: {flag}: {shown} is not allowed"), out.err


def test_the_samples_of_two_small_seeds_share_no_generator():
    """--seed 0 --samples 4 and --seed 1 --samples 4 (and every pair of seeds below 200,
    200 samples each) draw from distinct generators: seed * 1_000_003 + i had given
    --seed 0's sequence 1 the generator of --seed 1's sequence 0."""
    from moekit.inference.batcher import sequence_seed
    seeds = [sequence_seed(s, i) for s in range(200) for i in range(200)]
    assert len(set(seeds)) == len(seeds)
    assert sequence_seed(7, 0) == 7 and sequence_seed(7, 3) == 8 * 1_000_003 + 3


def test_the_stats_line_counts_one_sequence_in_the_singular(tmp_path, capsys):
    """stderr's stats line had said "1 sequences" for one prompt, a sequence's header
    "1 tokens"."""
    _, base = _run(tmp_path)
    (tmp_path / "p.txt").write_text("a\nb\n")
    for more, count in (([], "1 sequence (batch <= 1)"),
                        (["--prompts-file", str(tmp_path / "p.txt")], "2 sequences (batch <= 8)"),
                        (["--no-cache"], "1 sequence (batch <= 1)")):
        assert cli_main([*base, "--prompt", "x", *more]) == 0
        assert capsys.readouterr().err.startswith(f"moekit generate: {count}, ")
    # a sequence's header too ("(length, 1 tokens)")
    assert cli_main([*base, "--prompts-file", str(tmp_path / "p.txt"),
                     "--max-new-tokens", "1"]) == 0
    assert "--- 0 (length, 1 token)\n" in capsys.readouterr().out
