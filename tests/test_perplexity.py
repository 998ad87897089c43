"""`moekit perplexity`: the negative log-likelihood of a text in chunks.

Oracle: transformers' own forward of the original model (float64 log-softmax of its
logits at the scored positions), on the tokenizers library's ids of the text.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from moekit.cli import main as cli_main
from moekit.inference.perplexity import chunk_ids, read_ids, score
from moekit.inference.text import ByteText, TokenizerText
from tests import test_generate_tokenizer as tg

TEXT = "".join(tg.CORPUS[:12]) + "déjà vu: naïve café\n" * 3


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    tok, model = tg.convert_random_qwen3(root, seed=0, max_positions=64, moe_ffn=32)
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    return tok, model, root


def _reference(model, ids: list[int], context: int, first: int) -> list[float]:
    """Per-token NLLs of the scored positions, from transformers' logits in float64."""
    out = []
    for c in range(len(ids) // context):
        chunk = torch.tensor([ids[c * context:(c + 1) * context]])
        with torch.no_grad():
            logp = model(chunk).logits[0].double().log_softmax(-1)
        out += [-float(logp[t - 1, chunk[0, t]]) for t in range(first, context)]
    return out


def _gpt2_bytes(tok, ids: list[int]) -> bytes:
    """The bytes ``ids`` spell, from their vocabulary strings through GPT-2's published
    byte-to-character table (bytes_to_unicode in openai/gpt-2's encoder.py)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}
    return bytes(table[c] for i in ids for c in tok.id_to_token(i))


def test_scored_bytes_are_the_scored_tokens_own_bytes():
    """Bits per byte divide by the bytes the scored tokens hold. A byte-level model's
    token is one byte, so they are as many as the tokens, where a chunk's edge cuts a
    character in two (a decode of the scored ids spelled each piece as U+FFFD, 3 bytes:
    172 bytes for 160 tokens of this text at --context 16)."""
    from moekit.models import MoETransformer, preset

    torch.manual_seed(0)
    ids = list(("héllo wörld, ça va? " * 14).encode())
    chunks = chunk_ids(ids, 16)
    assert any(b >= 0x80 for b in chunks[:, 8].tolist())  # a cut inside a character
    got = score(MoETransformer(preset("tiny")), chunks, token_bytes=ByteText().token_bytes)
    assert got.tokens == 8 * len(chunks) and got.scored_bytes == got.tokens
    assert got.bits_per_byte == pytest.approx(got.nll / math.log(2) / got.tokens, rel=1e-12)


def test_scores_are_transformers_log_likelihoods(converted, capsys):
    tok, model, root = converted
    from moekit.quant.io import load_model

    ids = tok.encode(TEXT).ids
    assert len(ids) >= 3 * 32
    want = _reference(model, ids, 32, 16)
    text = TokenizerText(root / "lm" / "tokenizer")
    got = score(load_model(root / "lm"), chunk_ids(ids, 32), token_bytes=text.token_bytes)
    assert (got.tokens, got.chunks, got.score_from) == (len(want), len(ids) // 32, 16)
    assert got.nll == pytest.approx(sum(want), rel=1e-5)
    n, mean = len(want), sum(want) / len(want)
    sd = math.sqrt(sum((x - mean) ** 2 for x in want) / (n - 1))
    assert got.perplexity == pytest.approx(math.exp(mean), rel=1e-5)
    assert got.stderr == pytest.approx(math.exp(mean) * sd / math.sqrt(n), rel=1e-4)
    scored = sum(len(_gpt2_bytes(tok, ids[c * 32 + 16:(c + 1) * 32]))
                 for c in range(len(ids) // 32))
    assert got.bits_per_byte == pytest.approx(sum(want) / math.log(2) / scored, rel=1e-5)
    # the command: the same numbers from the checkpoint's own tokenizer, other chunking
    assert cli_main(["perplexity", "--checkpoint", str(root / "lm"), "--text",
                     str(root / "text.txt"), "--context", "24", "--score-from", "4",
                     "--chunks", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    want = _reference(model, ids[:48], 24, 4)
    assert (r["tokens"], r["chunks"]) == (40, 2)
    assert r["perplexity"] == pytest.approx(math.exp(sum(want) / 40), rel=1e-5)
    assert cli_main(["perplexity", "--checkpoint", str(root / "lm"), "--text",
                     str(root / "text.txt"), "--context", "32"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("perplexity ") and "bits/byte" in line and "scoring the last 16" in line


def test_quantized_checkpoints_score_close_to_the_float_model(converted, tmp_path, capsys):
    """int8 and int4 directories run through the same command (their prefill path);
    their perplexity is near the float model's on this random model (a smoke bound: the
    oracle test above holds the arithmetic)."""
    _, _, root = converted
    got = {}
    for bits in ("8", "4"):
        out = tmp_path / f"q{bits}"
        group = ["--group-size", "32"] if bits == "4" else []
        assert cli_main(["quantize", str(root / "lm"), "--bits", bits, *group,
                         "--out", str(out)]) == 0
        capsys.readouterr()
        for src in (out, root / "lm"):
            assert cli_main(["perplexity", "--checkpoint", str(src), "--text",
                             str(root / "text.txt"), "--context", "32", "--json"]) == 0
            got[src.name] = json.loads(capsys.readouterr().out)["perplexity"]
    assert got["q8"] == pytest.approx(got["lm"], rel=0.01)
    assert got["q4"] == pytest.approx(got["lm"], rel=0.1)


def test_kl_divergence_and_top_token_agreement_against_a_base(converted, tmp_path, capsys):
    """--against: KL(base || model) summed over the scored positions, as torch's kl_div
    of the two models' float64 log-probabilities gives it, and their argmax agreement;
    a model against itself: 0 and 100%."""
    tok, _, root = converted
    from moekit.models import MoETransformer, preset
    from moekit.quant.io import load_model

    assert cli_main(["quantize", str(root / "lm"), "--bits", "8", "--out",
                     str(tmp_path / "q8")]) == 0
    base, q8 = load_model(root / "lm"), load_model(tmp_path / "q8")
    chunks = chunk_ids(tok.encode(TEXT).ids, 32)
    kl, same = 0.0, 0
    with torch.no_grad():
        for chunk in chunks:
            lq = q8(chunk[None]).logits[0, 15:31].double().log_softmax(-1)
            lb = base(chunk[None]).logits[0, 15:31].double().log_softmax(-1)
            kl += float(torch.nn.functional.kl_div(lq, lb, log_target=True, reduction="sum"))
            same += int((lq.argmax(-1) == lb.argmax(-1)).sum())
    got = score(q8, chunks, base=base)
    # float64 as the oracle (it was float32 log-probabilities: 3% off an int8 model's KL,
    # hidden by an absolute tolerance larger than the KL)
    assert kl > 0 and got.kl == pytest.approx(kl, rel=1e-9)
    assert got.top1_same == same
    alone = score(base, chunks, base=base)
    assert alone.kl == pytest.approx(0, abs=1e-12 * alone.tokens) and alone.top1_agreement == 1
    capsys.readouterr()
    assert cli_main(["perplexity", "--checkpoint", str(tmp_path / "q8"), "--text",
                     str(root / "text.txt"), "--context", "32", "--against",
                     str(root / "lm")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith(f"against {root / 'lm'}: KL divergence ")
    assert f"{100 * same / got.tokens:.2f}% of {got.tokens:,} positions" in out[1]
    with pytest.raises(ValueError, match="base has vocab_size=256, which is not allowed"):
        score(q8, chunks, base=MoETransformer(preset("tiny")))


@pytest.mark.parametrize("kv", ["bfloat16", "int8"])
def test_a_small_kv_cache_scores_what_decoding_over_it_predicts(converted, capsys, kv):
    """--kv-cache-dtype: each chunk's logits are those of teacher-forced decode steps over
    a cache of that dtype (the decode kernel, one token a step), at fp32 tolerance; they
    differ from the plain forward's; against the same checkpoint the KL is small but not
    zero. A bf16 checkpoint asked for a float32 cache is refused by name."""
    tok, _, root = converted
    from moekit.models.transformer import StaticKVCache
    from moekit.quant.io import load_model

    model = load_model(root / "lm").eval()
    chunks = chunk_ids(tok.encode(TEXT).ids, 32)[:2]
    got = score(model, chunks, kv_cache_dtype=kv)
    want = 0.0
    with torch.inference_mode():
        for chunk in chunks:
            cache = StaticKVCache.for_model(model, 1, 32, kv)
            cache.reset()
            steps = [model.infer(chunk[t:t + 1][None], cache)[0] for t in range(31)]
            logp = torch.stack(steps[15:31]).double().log_softmax(-1)
            want -= float(logp.gather(1, chunk[16:32, None])[:, 0].sum())
    assert got.nll == pytest.approx(want, rel=1e-5)
    plain = score(model, chunks)
    assert got.nll != plain.nll
    against = score(model, chunks, base=model, kv_cache_dtype=kv)
    assert 0 < against.kl_mean < 1e-2
    capsys.readouterr()
    assert cli_main(["perplexity", "--checkpoint", str(root / "lm"), "--text",
                     str(root / "text.txt"), "--context", "32", "--chunks", "2",
                     "--kv-cache-dtype", kv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nll"] == pytest.approx(got.nll, rel=1e-6)
    # the printed KL in significant digits (a KL under 5e-7 had printed as 0.000000)
    assert cli_main(["perplexity", "--checkpoint", str(root / "lm"), "--text",
                     str(root / "text.txt"), "--context", "32", "--chunks", "2",
                     "--kv-cache-dtype", kv, "--against", str(root / "lm")]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    printed = float(line.split("KL divergence ")[1].split(" ")[0])
    assert printed == pytest.approx(against.kl_mean, rel=1e-3)
    assert cli_main(["perplexity", "--checkpoint", str(root / "lm"), "--dtype", "bf16",
                     "--kv-cache-dtype", "float32"]) == 2
    assert "kv_cache_dtype='float32' is not allowed" in capsys.readouterr().err


@pytest.mark.parametrize("flags,words", [
    (["--context", "0"], "--context=0 is not allowed"),
    (["--context", "65"], "--context=65 is not allowed: it must be <= the model's "
                          "max_seq_len=64"),
    (["--context", "16", "--score-from", "16"], "--score-from=16 is not allowed"),
    (["--chunks", "-1"], "--chunks=-1 is not allowed"),
    # was "score_from=0 is not allowed: it must be an int in [1, context=1)"
    (["--context", "1"], "--context=1 is not allowed: it must be at least 2"),
    # was "checkpoint='nope': no state.json or LATEST there"
    (["--against", "nope"], "--against='nope' is not allowed: it must be a checkpoint dir"),
    (["--text", "/nonexistent.txt"], "--text='/nonexistent.txt' is not allowed: no such file"),
    # was "text='4 tokens' is not allowed", naming neither flag
    (["--context", "64", "--text", "SHORT"], "is not allowed: it holds 4 tokens, fewer than "
                                             "one chunk of --context=64"),
])
def test_bad_flags_are_named(converted, capsys, tmp_path, flags, words):
    _, _, root = converted
    if "SHORT" in flags:
        (tmp_path / "short.txt").write_text("def f")
        flags = [f if f != "SHORT" else str(tmp_path / "short.txt") for f in flags]
    assert cli_main(["perplexity", "--checkpoint", str(root / "lm"), *flags]) == 2
    assert words in capsys.readouterr().err


def test_an_against_that_is_no_checkpoint_is_a_runtime_failure(converted, capsys):
    """A directory that holds no checkpoint: 1, as --checkpoint of one gives (its
    CheckpointError had been wrapped in a plain ValueError: 2, a usage error's code)."""
    _, _, root = converted
    assert cli_main(["perplexity", "--checkpoint", str(root / "lm"), "--against", "."]) == 1
    assert "--against='.' is not allowed: checkpoint='.': no state.json" in \
        capsys.readouterr().err


def test_more_chunks_than_the_text_holds_says_how_many_it_scored(converted, capsys):
    """--chunks 100000 scored the text's whole chunks without a word: now it says so."""
    _, _, root = converted
    args = ["perplexity", "--checkpoint", str(root / "lm"), "--text", str(root / "text.txt"),
            "--context", "16", "--json"]
    assert cli_main([*args, "--chunks", "0"]) == 0
    every = json.loads(capsys.readouterr().out)["chunks"]
    assert every >= 2
    assert cli_main([*args, "--chunks", "100000"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["chunks"] == every
    assert (f"--chunks=100000, but the text holds {every} whole chunks of 16 tokens: "
            f"scoring those {every}") in out.err
    assert cli_main([*args, "--chunks", str(every)]) == 0
    assert capsys.readouterr().err == ""
    # no --chunks (32, more than this text holds): no word of a flag nobody typed
    assert every < 32 and cli_main(args) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["chunks"] == every and out.err == ""


def _run_text(root, capsys, text: str, *flags: str) -> tuple[int, str]:
    code = cli_main(["perplexity", "--checkpoint", str(root / "lm"), "--text", text, *flags])
    return code, capsys.readouterr().err


def test_a_text_that_is_no_readable_file_is_one_line_naming_the_flag(converted, capsys,
                                                                      tmp_path):
    """Usage errors (2): a text typed where the path belongs (it was a raw "File name too
    long", exit 1), a directory (was "no such file"), an empty file, a byte that is not
    UTF-8 (told with its offset). A file the process may not read: 1, by the flag."""
    _, _, root = converted
    typed = "the quick brown fox " * 20
    code, err = _run_text(root, capsys, typed)
    assert code == 2 and err.count("\n") == 1
    assert "--text='the quick brown fox the quick brown fox '... (400 characters) is not " \
        "allowed: no file can have this name (too long); --text takes a file's path" in err
    code, err = _run_text(root, capsys, str(tmp_path))
    assert code == 2 and f"--text={str(tmp_path)!r} is not allowed: it is a directory" in err
    (tmp_path / "empty.txt").write_bytes(b"")
    code, err = _run_text(root, capsys, str(tmp_path / "empty.txt"), "--context", "8")
    assert code == 2 and "it holds 0 tokens, fewer than one chunk of --context=8" in err
    (tmp_path / "latin1.txt").write_bytes("café au lait ".encode() * 9 + b"caf\xe9")
    code, err = _run_text(root, capsys, str(tmp_path / "latin1.txt"), "--context", "8")
    assert code == 2 and "it is not UTF-8 text (byte 0xe9 at offset 129)" in err
    if os.geteuid() != 0:  # root reads whatever the mode says
        (tmp_path / "secret.txt").write_text(TEXT)
        (tmp_path / "secret.txt").chmod(0)
        code, err = _run_text(root, capsys, str(tmp_path / "secret.txt"))
        assert code == 1 and "could not be read: Permission denied" in err


def test_only_the_scored_part_of_a_text_is_read(converted, tmp_path):
    """--chunks N reads as much of the file as N chunks take (a 440 MB file had cost 4.6
    GB: read, decoded and tokenized whole; now 0.4 GB): what follows is never looked at
    (a byte that is not UTF-8 there is no error), and the ids are those the tokenizers
    library gives the whole text, where the read is cut inside a word."""
    tok, _, root = converted
    whole = TEXT * 300  # 143 KB: the reads stop well before its end
    (tmp_path / "t.txt").write_bytes(whole.encode() + b"\xff")
    want = tok.encode(whole).ids
    text = TokenizerText(root / "lm" / "tokenizer")
    for n in (1, 100, 1500, 3000):
        got = read_ids(str(tmp_path / "t.txt"), text.encode, n)
        assert got[:n] == want[:n]
    with pytest.raises(ValueError, match="not UTF-8 text"):
        read_ids(str(tmp_path / "t.txt"), text.encode, None)
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + "déjà".encode())
    assert read_ids(str(tmp_path / "bom.txt"), ByteText().encode, None) == \
        list("déjà".encode())


def test_tokens_per_second_time_the_model_not_the_base():
    """tokens/s is the model's forwards: a base that takes 0.3 s a chunk leaves it be (its
    time had been counted: an --against run reported about half the model's speed)."""
    import time

    from moekit.models import MoETransformer, preset

    torch.manual_seed(0)
    model = MoETransformer(preset("tiny"))

    class SlowBase(torch.nn.Module):
        config = model.config

        def forward(self, ids):
            time.sleep(0.3)
            return model(ids)

    chunks = chunk_ids(list(b"the quick brown fox jumps over the lazy dog" * 2), 32)
    got = score(model, chunks, base=SlowBase())
    assert got.chunks == 2 and got.kl == pytest.approx(0, abs=1e-12)
    assert got.seconds < 0.3 and got.tokens_per_s == 2 * 32 / got.seconds


def test_a_tokenizer_or_base_that_does_not_fit_the_model_is_named(converted, capsys,
                                                                  tmp_path):
    """A --tokenizer whose ids pass the model's vocabulary (the Qwen tokenizer's 300 ids
    on a byte model of 256) and a --context past the --against model's max_seq_len had
    failed mid-run with messages of internals ("ids_BL has values in [11, 277]",
    "sequence length 48 is not allowed"); both are usage errors named by flag."""
    import moekit.quant.io as qio
    from moekit.models import MoETransformer, preset
    from moekit.quant import quantize

    tok, _, root = converted
    torch.manual_seed(0)
    byte_model = qio.save_quantized(quantize(MoETransformer(preset("tiny")).eval(), bits=8),
                                    tmp_path / "bytes")
    top = max(tok.encode(TEXT).ids[:64])
    assert top >= 256
    code, err = _run_text(root, capsys, str(root / "text.txt"), "--context", "32",
                          "--chunks", "2")  # the model's own tokenizer: fine
    assert code == 0
    assert cli_main(["perplexity", "--checkpoint", str(byte_model), "--tokenizer",
                     str(root / "lm" / "tokenizer"), "--text", str(root / "text.txt"),
                     "--context", "32", "--chunks", "2"]) == 2
    assert (f"--tokenizer={str(root / 'lm' / 'tokenizer')!r} is not allowed: it gives ids "
            f"up to {top}, beyond the model's vocab_size=256") in capsys.readouterr().err
    assert cli_main(["perplexity", "--checkpoint", str(byte_model), "--text",
                     str(root / "text.txt"), "--context", "32", "--against",
                     str(root / "lm")]) == 2  # was "base has vocab_size=320, which ..."
    assert (f"--against={str(root / 'lm')!r} is not allowed: its vocab_size=320 is not the "
            "model's, 256; it must share its vocabulary") in capsys.readouterr().err
    short = tmp_path / "short_base"
    short.mkdir()
    tg.convert_random_qwen3(short, seed=1, max_positions=32, moe_ffn=32)
    capsys.readouterr()  # transformers' progress bars
    code, err = _run_text(root, capsys, str(root / "text.txt"), "--context", "48",
                          "--against", str(short / "lm"))
    assert code == 2 and err.count("\n") == 1
    assert "--context=48 is not allowed: it must be <= the --against model's " \
        "max_seq_len=32" in err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_a_named_pipe_scores_as_the_file_does(converted, capsys, tmp_path):
    """--text of a pipe (``<(cmd)``, a mkfifo) is read once, as it streams: the file's
    numbers (its path had been opened and closed to check it, then opened again)."""
    import threading

    _, _, root = converted
    argv = ["perplexity", "--checkpoint", str(root / "lm"), "--context", "32", "--chunks",
            "2", "--json", "--text"]
    assert cli_main([*argv, str(root / "text.txt")]) == 0
    want = json.loads(capsys.readouterr().out)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(TEXT, encoding="utf-8"))
    writer.start()
    assert cli_main([*argv, str(fifo)]) == 0
    writer.join(timeout=10)
    got = json.loads(capsys.readouterr().out)
    assert (got["tokens"], got["nll"]) == (want["tokens"], want["nll"])


@pytest.fixture(scope="module")
def byte_runs(tmp_path_factory):
    """(model, its run, a base model, its run, a text file): random tiny byte-level
    models of two seeds."""
    from moekit.models import MoETransformer, preset
    from moekit.train.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("ppl_bytes")
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = MoETransformer(preset("tiny")).eval()
        save_checkpoint(root / f"run{seed}", model, torch.optim.SGD(model.parameters(),
                                                                     lr=0.0),
                        {"step": 0, "model_config": model.config.to_dict()})
        out += [model, root / f"run{seed}"]
    (root / "t.txt").write_text("the quick brown fox jumps over the lazy dog\n")
    return (*out, root / "t.txt")


def _kl_reference(model, base, ids: list[int], context: int, first: int) -> list[float]:
    """Per-token KL(base || model) at the scored positions: torch's kl_div of the two
    models' float64 log-probabilities."""
    out = []
    with torch.no_grad():
        for c in range(len(ids) // context):
            chunk = torch.tensor([ids[c * context:(c + 1) * context]])
            lm = model(chunk).logits[0, first - 1:context - 1].double().log_softmax(-1)
            lb = base(chunk).logits[0, first - 1:context - 1].double().log_softmax(-1)
            out += torch.nn.functional.kl_div(lm, lb, log_target=True,
                                              reduction="none").sum(-1).tolist()
    return out


@pytest.mark.parametrize("flags,n", [
    (["--context", "2", "--chunks", "1"], 1),  # one scored token: no standard error
    (["--context", "2", "--chunks", "2"], 2),  # one in each of two chunks
    (["--context", "3", "--chunks", "1", "--score-from", "1"], 2),
    (["--context", "4", "--chunks", "1", "--score-from", "1"], 3),
])
def test_the_standard_error_of_one_two_and_three_tokens(byte_runs, capsys, flags, n):
    """The standard errors are the sample standard deviation (statistics.stdev) of the
    scored tokens' NLLs (float64 log-softmax of the model's logits) and KLs over
    sqrt(n), the perplexity's through exp; with one scored token there is none:
    "unavailable" and null (they were 0, as if the perplexity of one token were exact)."""
    import statistics

    model, run, base, base_run, path = byte_runs
    argv = ["perplexity", "--checkpoint", str(run), "--text", str(path), *flags,
            "--against", str(base_run)]
    context, chunks = int(flags[1]), int(flags[3])
    first = int(flags[5]) if "--score-from" in flags else context // 2
    ids = list(path.read_bytes())[:chunks * context]
    want = _reference(model, ids, context, first)
    kl = _kl_reference(model, base, ids, context, first)
    assert cli_main([*argv, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tokens"] == len(want) == len(kl) == n
    assert r["perplexity"] == pytest.approx(math.exp(statistics.fmean(want)), rel=1e-6)
    assert r["kl_mean"] == pytest.approx(statistics.fmean(kl), rel=1e-6)
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    if n == 1:
        assert r["stderr"] is None and r["kl_stderr"] is None
        assert "+- unavailable over 1 token (1 chunk of 2," in out, out
        assert f"KL divergence {r['kl_mean']:.4g} +- unavailable nats/token" in out, out
        return
    assert r["stderr"] == pytest.approx(
        r["perplexity"] * statistics.stdev(want) / math.sqrt(n), rel=1e-6)
    assert r["kl_stderr"] == pytest.approx(statistics.stdev(kl) / math.sqrt(n), rel=1e-6)
    assert r["stderr"] > 0 and r["kl_stderr"] > 0
    assert f"+- {r['stderr']:.4f} over {n} tokens ({chunks} chunk" in out, out


def test_a_whole_texts_ids_are_compact_and_score_as_a_list_of_them_did(byte_runs, converted,
                                                                       capsys, tmp_path):
    """--chunks 0 holds every id of the text: a uint8 tensor (byte-level) or int32
    (a tokenizer's), not a Python list (8 bytes an id, 36 past 256). The sums are exactly
    those of the ids as a list made into int64 chunks (the command's way before)."""
    import tracemalloc

    from moekit.inference.perplexity import _text_ids
    from moekit.quant.io import load_model

    model, run, _, _, _ = byte_runs
    _, _, root = converted
    path = root / "text.txt"
    for checkpoint, text, want_dtype in [
            (run, ByteText(), torch.uint8),
            (root / "lm", TokenizerText(root / "lm" / "tokenizer"), torch.int32)]:
        ids = text.encode(TEXT)
        got = _text_ids(str(path), text.encode_tensor, 16, 0)
        assert got.dtype == want_dtype and got.tolist() == ids
        assert cli_main(["perplexity", "--checkpoint", str(checkpoint), "--text", str(path),
                         "--context", "16", "--chunks", "0", "--json"]) == 0
        r = json.loads(capsys.readouterr().out)
        n = len(ids) // 16
        before = score(model if checkpoint == run else load_model(checkpoint),
                       torch.tensor(ids[:n * 16], dtype=torch.long).view(n, 16),
                       token_bytes=text.token_bytes)
        assert (r["chunks"], r["tokens"], r["scored_bytes"], r["nll"], r["nll_sq"]) == \
            (n, before.tokens, before.scored_bytes, before.nll, before.nll_sq)
    # 2 MB of text: the file's bytes, its str (2 bytes a character: é) and the uint8
    # ids, 4 bytes a byte; with a list of ids 11
    big = tmp_path / "big.txt"
    big.write_text(TEXT * (2_000_000 // len(TEXT.encode())))
    size = big.stat().st_size
    tracemalloc.start()
    try:
        got = _text_ids(str(big), ByteText().encode_tensor, 16, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.numel() == size and peak < 6 * size, (peak, size)
