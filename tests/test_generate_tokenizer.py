"""`moekit generate` on a converted checkpoint speaks its tokenizer's text.

`moekit convert` copies a transformers directory's tokenizer files into the run
(RUN/tokenizer), `moekit quantize` and `convert --to hf` carry them on, and `moekit
generate` encodes the prompt, stops at the end-of-sequence id and writes the text with
them. Oracle: transformers' own greedy generate() of the original model on the
tokenizers library's ids, decoded by the same library.
"""

from __future__ import annotations

import json

import pytest
import torch

from moekit.cli import main as cli_main
from tests import hf_models

transformers = hf_models.transformers
tokenizers = pytest.importorskip("tokenizers")

CORPUS = ["def hello(world):\n    return world + 1\n", "the quick brown fox jumps over",
          "import torch\nx = torch.zeros(3)\n"] * 20


# ChatML as Qwen's templates write it, with the environment's extras (a namespace, loop
# controls, tojson of non-ASCII text, raise_exception, a special token by name)
CHAT = """{%- set ns = namespace(n=0) -%}
{%- for m in messages -%}
{%- if m.role not in ["system", "user", "assistant"] -%}
{{ raise_exception("unknown role " ~ m.role) }}
{%- endif -%}
{%- if m.content == "skip" -%}{% continue %}{%- endif -%}
{%- set ns.n = ns.n + 1 -%}
<|im_start|>{{ m.role }}
{{ m.content }} {{ {"n": ns.n, "t": "é"} | tojson }}<|im_end|>{{ eos_token }}
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}"""


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def convert_random_qwen3(root, seed: int, max_positions: int, moe_ffn: int,
                         chat: bool = False):
    """(tokenizer, model): a random Qwen3-MoE of this module's tokenizer (no
    end-of-sequence id) saved with it under root/hf, with the CHAT template where
    ``chat``, and converted to root/lm."""
    tok = _tokenizer()
    torch.manual_seed(seed)
    cfg = transformers.Qwen3MoeConfig(**{**hf_models.COMMON, "vocab_size": 320,
                                         "eos_token_id": None, "bos_token_id": None,
                                         "max_position_embeddings": max_positions},
                                      intermediate_size=48, moe_intermediate_size=moe_ffn,
                                      num_experts=8, num_experts_per_tok=2)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    model.save_pretrained(root / "hf")
    tok.save(str(root / "hf" / "tokenizer.json"))
    if chat:
        (root / "hf" / "tokenizer_config.json").write_text(json.dumps(
            {"chat_template": CHAT, "eos_token": "end", "bos_token": None}))
    assert cli_main(["convert", str(root / "hf"), str(root / "lm")]) == 0
    return tok, model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(tokenizer, transformers model, its directory, the converted run). The
    end-of-sequence id is the 5th token the model generates after "import torch", so
    that prompt's sequence stops early."""
    root = tmp_path_factory.mktemp("tok")
    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(**{**hf_models.COMMON, "vocab_size": 320,
                                         "eos_token_id": None, "bos_token_id": None,
                                         "max_position_embeddings": 256},
                                      intermediate_size=48, moe_intermediate_size=16,
                                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    ids = tok.encode("import torch").ids
    new = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)[0, len(ids):]
    assert new[4] not in new[:4]
    model.config.eos_token_id = model.generation_config.eos_token_id = int(new[4])
    model.save_pretrained(root / "hf")
    tok.save(str(root / "hf" / "tokenizer.json"))
    (root / "hf" / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHAT, "eos_token": "end", "bos_token": None}))
    assert cli_main(["convert", str(root / "hf"), str(root / "lm")]) == 0
    return tok, model, root


def _want(tok, model, prompt: str, n: int) -> str:
    ids = tok.encode(prompt).ids
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return prompt + tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def test_generate_streams_the_tokenizers_text(converted, capsys):
    tok, model, root = converted
    assert (root / "lm" / "tokenizer" / "tokenizer.json").is_file()
    assert (root / "lm" / "tokenizer" / "generation_config.json").is_file()
    prompt = "def hello(world"
    assert cli_main(["generate", "--checkpoint", str(root / "lm"), "--prompt", prompt,
                     "--temperature", "0", "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out == _want(tok, model, prompt, 16) + "\n"


def test_generate_batches_and_stops_at_the_end_of_sequence_id(converted, capsys, tmp_path):
    """Two prompts in one batch, each as transformers generates it alone; one that ends
    at the end-of-sequence id says so."""
    tok, model, root = converted
    prompts = ["import torch", "the quick brown"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    assert cli_main(["generate", "--checkpoint", str(root / "lm"), "--prompts-file",
                     str(tmp_path / "prompts.txt"), "--temperature", "0",
                     "--max-new-tokens", "40"]) == 0
    out = capsys.readouterr().out
    for i, p in enumerate(prompts):
        assert f"--- {i} (" in out
        assert _want(tok, model, p, 40) + "\n" in out
    # the end-of-sequence id ended the first sequence after 5 tokens (the fixture)
    assert "--- 0 (stop, 5 tokens)" in out


def test_quantized_and_transformers_directories_keep_the_tokenizer(converted, tmp_path, capsys):
    tok, model, root = converted
    assert cli_main(["quantize", str(root / "lm"), "--bits", "8", "--out",
                     str(tmp_path / "q8")]) == 0
    assert (tmp_path / "q8" / "tokenizer" / "tokenizer.json").is_file()
    outs = []
    for extra in ([], ["--tokenizer", str(root / "hf")]):  # its own copy, or the original
        capsys.readouterr()
        assert cli_main(["generate", "--checkpoint", str(tmp_path / "q8"), "--prompt",
                         "def hello(world", "--temperature", "0", "--max-new-tokens", "8",
                         *extra]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("def hello(world")
    assert cli_main(["convert", "--to", "hf", str(root / "lm"), str(tmp_path / "back")]) == 0
    for name in ("tokenizer.json", "generation_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (root / "hf" / name).read_bytes()


def test_a_directory_without_tokenizer_json_is_named(converted, tmp_path, capsys):
    _, _, root = converted
    assert cli_main(["generate", "--checkpoint", str(root / "lm"), "--tokenizer",
                     str(tmp_path), "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert f"--tokenizer={str(tmp_path)!r}" in err and "tokenizer.json" in err


def test_chat_prompts_are_rendered_as_transformers_renders_them(converted, capsys):
    """--chat: the user message in the tokenizer's template, rendered as transformers'
    apply_chat_template renders it, then generated as transformers generates from it."""
    from moekit.inference.text import TokenizerText, render_chat

    tok, model, root = converted
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(root / "hf" / "tokenizer.json"), chat_template=CHAT, eos_token="end")
    messages = [{"role": "user", "content": "def hello(world"}]
    want = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert render_chat(CHAT, messages, eos_token="end") == want
    assert '{"n": 1, "t": "é"}<|im_end|>end' in want  # the extras took part
    ids = TokenizerText(root / "lm" / "tokenizer").encode_chat("def hello(world")
    assert ids == tok.encode(want, add_special_tokens=False).ids
    assert cli_main(["generate", "--checkpoint", str(root / "lm"), "--chat", "--prompt",
                     "def hello(world", "--temperature", "0", "--max-new-tokens", "10"]) == 0
    out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)
    reply = tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
    assert capsys.readouterr().out == "def hello(world\n" + reply + "\n"
    with pytest.raises(ValueError, match="unknown role tool"):
        render_chat(CHAT, [{"role": "tool", "content": "x"}])
    # --system: a system message first
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    want = hf_tok.apply_chat_template(with_system, add_generation_prompt=True, tokenize=False)
    assert want.startswith("<|im_start|>system\nBe brief.")
    ids = TokenizerText(root / "lm" / "tokenizer").encode_chat("def hello(world", "Be brief.")
    assert ids == tok.encode(want, add_special_tokens=False).ids


def test_interactive_chat_answers_each_line_with_the_conversation_so_far(converted, capsys,
                                                                        monkeypatch):
    """--interactive: each stdin line a user message; the second turn's prompt is the
    template of [user, the first reply (without its end-of-sequence id), user] as
    transformers' apply_chat_template renders it, and each reply is what transformers'
    generate() gives from that prompt."""
    import io

    tok, model, root = converted
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(root / "hf" / "tokenizer.json"), chat_template=CHAT, eos_token="end")
    eos = model.generation_config.eos_token_id
    messages, want = [], ""
    for line in ("def hello(world", "import torch"):
        messages.append({"role": "user", "content": line})
        prompt = hf_tok.apply_chat_template(messages, add_generation_prompt=True,
                                            tokenize=False)
        ids = tok.encode(prompt, add_special_tokens=False).ids
        new = model.generate(torch.tensor([ids]), max_new_tokens=12,
                             do_sample=False)[0, len(ids):].tolist()
        want += tok.decode(new, skip_special_tokens=True) + "\n"
        content = new[:-1] if new[-1] == eos else new
        messages.append({"role": "assistant", "content": tok.decode(content)})
    assert any(m["role"] == "assistant" and m["content"] for m in messages)
    monkeypatch.setattr("sys.stdin", io.StringIO("def hello(world\n\nimport torch\n"))
    capsys.readouterr()
    assert cli_main(["generate", "--checkpoint", str(root / "lm"), "--chat", "--interactive",
                     "--temperature", "0", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr()
    assert out.out == want
    assert "prompt tokens held in the cache from earlier turns" in out.err  # turn 2 reused
    # a conversation longer than the context (256) loses its oldest exchange, said so
    monkeypatch.setattr("sys.stdin", io.StringIO("def hello(world\nimport torch\n"))
    assert cli_main(["generate", "--checkpoint", str(root / "lm"), "--chat", "--interactive",
                     "--temperature", "0", "--max-new-tokens", "150"]) == 0
    assert "oldest exchange is dropped" in capsys.readouterr().err
    for bad in (["--interactive"], ["--chat", "--interactive", "--samples", "2"]):
        assert cli_main(["generate", "--checkpoint", str(root / "lm"), *bad]) == 2
        assert "--interactive is not allowed" in capsys.readouterr().err


def test_a_stop_string_is_found_in_the_text_not_in_its_ids_alone(converted, capsys):
    """--stop with a tokenizer: the sequence ends at the token whose text completes the
    string's first occurrence, also where the string spans two tokens and ends inside
    the second (its own ids, encoded alone, are not what was generated)."""
    tok, model, root = converted
    prompt = "def hello(world"
    ids = tok.encode(prompt).ids
    new = model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False,
                         eos_token_id=None)[0, len(ids):].tolist()
    pieces = [tok.decode(new[:k + 1]) for k in range(len(new))]
    # a string from the last character of one token's text into the next token's text
    k = next(k for k in range(2, len(new)) if len(pieces[k]) - len(pieces[k - 1]) >= 2
             and pieces[k - 1] and pieces[k].startswith(pieces[k - 1]))
    stop = pieces[k][len(pieces[k - 1]) - 1:len(pieces[k - 1]) + 1]
    first = next(j for j in range(len(new)) if stop in pieces[j])
    ids_alone = tok.encode(stop, add_special_tokens=False).ids
    assert new[first + 1 - len(ids_alone):first + 1] != ids_alone  # id matching misses it
    assert cli_main(["generate", "--checkpoint", str(root / "lm"), "--prompt", prompt,
                     "--temperature", "0", "--max-new-tokens", "30", "--stop", stop]) == 0
    # the text ends with the string: what the completing token adds after it is cut
    text = pieces[first][:pieces[first].index(stop) + len(stop)]
    assert len(text) < len(pieces[first])  # the case the cut is for
    assert capsys.readouterr().out == prompt + text + "\n"
    # a batch: each sequence's text cut alike, one without the string kept whole
    other = "the quick"
    rest = model.generate(torch.tensor([tok.encode(other).ids]), max_new_tokens=30,
                          do_sample=False, eos_token_id=None)[0, len(tok.encode(other).ids):]
    rest_text = tok.decode(rest.tolist())
    assert stop not in rest_text
    (root / "two.txt").write_text(f"{prompt}\n{other}\n")
    assert cli_main(["generate", "--checkpoint", str(root / "lm"), "--prompts-file",
                     str(root / "two.txt"), "--temperature", "0", "--max-new-tokens", "30",
                     "--stop", stop]) == 0
    out = capsys.readouterr().out
    assert f"--- 0 (stop, {first + 1} tokens)\n{prompt}{text}\n" in out
    assert f"--- 1 (length, 30 tokens)\n{other}{rest_text}\n" in out


@pytest.mark.parametrize("keep_stop", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("stops", [("ab",), ("b", "abc"), ("cab", "x"), ("a",), ("zz",),
                                   ("abab", "ba")])
def test_streamed_text_is_cut_at_the_first_stop_string(stops, keep_stop):
    """cut_stream over any split of a text into pieces writes the text up to the end
    (keep_stop) or the start of the stop string occurrence that ends first (a plain
    search of the whole text), nothing after it, and never text it takes back (what it
    wrote is a prefix of the answer at every piece); cut_text the same of the whole
    text."""
    import random

    from moekit.inference.text import cut_stream, cut_text

    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("abcx") for _ in range(rng.randint(0, 12)))
        spans = [(text.find(s), text.find(s) + len(s)) for s in stops if s in text]
        first = min(spans, key=lambda span: span[1]) if spans else None
        want = text if first is None else text[:first[1] if keep_stop else first[0]]
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text) + 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        it = iter(pieces)
        emit = cut_stream(lambda t, it=it: next(it, ""), stops, keep_stop)
        written = ""
        for _ in pieces:
            written += emit(0)
            assert want.startswith(written)
        assert written + emit(None) == want
        assert cut_text(text, stops, keep_stop) == want


def test_chat_needs_a_tokenizer_with_a_template(converted, tmp_path, capsys):
    from moekit.models import MoETransformer, preset
    from moekit.train.checkpoint import save_checkpoint

    lm = MoETransformer(preset("tiny"))
    save_checkpoint(tmp_path / "bytes", lm, torch.optim.SGD(lm.parameters(), lr=0.0),
                    {"step": 0, "model_config": lm.config.to_dict()})
    assert cli_main(["generate", "--checkpoint", str(tmp_path / "bytes"), "--chat"]) == 2
    assert "--chat is not allowed here: the checkpoint has no tokenizer" in capsys.readouterr().err
    # a checkpoint path that does not exist is named as such, not as a missing tokenizer
    assert cli_main(["generate", "--checkpoint", str(tmp_path / "nope"), "--chat"]) == 1
    err = capsys.readouterr().err
    assert f"--checkpoint={str(tmp_path / 'nope')!r} is not allowed: no such directory" in err
    assert "no tokenizer" not in err
    _, _, root = converted
    assert cli_main(["generate", "--checkpoint", str(root / "lm"), "--system", "x"]) == 2
    assert "--system='x' is not allowed without --chat" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "tokenizer.json").write_bytes(
        (root / "hf" / "tokenizer.json").read_bytes())
    assert cli_main(["generate", "--checkpoint", str(root / "lm"), "--chat", "--tokenizer",
                     str(tmp_path / "plain")]) == 2
    assert "has no chat template" in capsys.readouterr().err


# streamed text: characters of 2, 3 and 4 UTF-8 bytes, spaces at the ends and in runs
TEXTS = ["def hello(world):\n    return world + 1\n", "naïve café, déjà vu — ÀÉÎõü",
         "中文字符：你好，世界！", "emoji 🙂👍🏽 and 🇫🇷 flags", " leading  and trailing ",
         "mixed 中 é 🙂 x\n\tend", "😀"]
SPECIALS = ["<|im_end|>", "<|endoftext|>"]


def _text(tok, directory):
    """``tok`` as moekit reads it (a directory holding its tokenizer.json)."""
    from moekit.inference.text import TokenizerText

    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return TokenizerText(directory)


def _streamed(text, ids) -> list[str]:
    emit = text.stream()
    return [emit(t) for t in ids] + [emit(None)]


def _with_specials(tok, ids: list[int], seed: int) -> list[int]:
    """``ids`` with special tokens put in at random places (inside a character's bytes
    too) and at both ends, and an id outside the vocabulary."""
    import random

    rng = random.Random(seed)
    specials = [tok.token_to_id(s) for s in SPECIALS]
    out = [specials[0]]
    for t in ids:
        out.append(t)
        if rng.random() < 0.3:
            out.extend(rng.choice(specials) for _ in range(rng.randint(1, 3)))
    return [*out, tok.get_vocab_size() + 7, specials[1]]


def _check_stream(text, tok, ids: list[int]) -> list[str]:
    """The pieces add up to the tokenizer's own decode of all the ids; none holds a
    replacement character the full text does not."""
    want = tok.decode(ids, skip_special_tokens=True)
    pieces = _streamed(text, ids)
    assert "".join(pieces) == want
    if "\ufffd" not in want:
        assert not any("\ufffd" in p for p in pieces)
    return pieces


def _byte_level_multilingual():
    """A byte-level BPE trained on TEXTS too, so that tokens hold parts of characters
    (the last bytes of one and the first of the next)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS + TEXTS * 5, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.mark.parametrize("trained", ["ascii", "multilingual"])
def test_streamed_text_is_the_whole_decode_with_multibyte_and_special_tokens(
        trained, tmp_path):
    tok = _tokenizer() if trained == "ascii" else _byte_level_multilingual()
    tok.add_special_tokens(SPECIALS)
    text = _text(tok, tmp_path / "tok")
    # the ids hold characters cut in two: into single bytes, or (multilingual) across
    # tokens that also hold a whole character
    pieces = [tok.decode([t]) for t in tok.encode("".join(TEXTS)).ids]
    if trained == "ascii":
        assert any(p == "\ufffd" for p in pieces)
    else:
        assert any(len(p) > 1 and "\ufffd" in p for p in pieces)
    for i, s in enumerate(TEXTS):
        ids = tok.encode(s).ids
        _check_stream(text, tok, ids)
        _check_stream(text, tok, _with_specials(tok, ids, seed=i))
    # a character cut short at the end: the last piece writes it as the full decode does
    ids = tok.encode("ok 🙂👍🏽").ids
    cut = ids[:max(k for k in range(len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))]
    assert _check_stream(text, tok, cut)[-1].endswith("\ufffd")
    # a stray byte of a character in the middle: written as the full decode writes it
    stray = next(i for i in range(tok.get_vocab_size()) if tok.decode([i]) == "\ufffd")
    _check_stream(text, tok, [*tok.encode("a").ids, stray, *tok.encode("b 中").ids])
    # special tokens only: no text at all
    assert _streamed(text, [tok.token_to_id(SPECIALS[0])] * 3) == [""] * 4


def _metaspace(decoder: str):
    """A SentencePiece-style BPE ("▁" for a space, prepended to the text) trained on
    ASCII text: with the Metaspace decoder (which drops the first token's "▁"), or as
    Llama's tokenizer.json writes it (bytes of other characters as <0xXX> tokens,
    decoded by Replace, ByteFallback, Fuse and a Strip of one leading space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS + [" leading  and trailing "], trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", *SPECIALS]))
    if decoder == "metaspace":
        return tok
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = json.loads(decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0)]).__getstate__())
    return Tokenizer.from_str(json.dumps(spec))


@pytest.mark.parametrize("decoder", ["metaspace", "byte_fallback"])
def test_streamed_text_keeps_sentencepiece_spaces(decoder, tmp_path):
    """A decoder that drops the leading space of what it decodes: the streamed text keeps
    each later word's space, drops the first one's as the full decode does."""
    tok = _metaspace(decoder)
    text = _text(tok, tmp_path / "tok")
    assert tok.decode(tok.encode("the fox").ids) == "the fox"
    assert tok.decode(tok.encode("the fox").ids[1:]) == "fox"  # the space a window loses
    if decoder == "byte_fallback":
        assert "<0xE4>" in tok.encode("中").tokens
    for i, s in enumerate([*TEXTS, "the quick brown fox", "x   y", "  two spaces first"]):
        ids = tok.encode(s).ids
        assert _check_stream(text, tok, ids)[0] != " "  # the first word's space dropped
        _check_stream(text, tok, _with_specials(tok, ids, seed=i))
        _check_stream(text, tok, ids[1:])  # starting at any token
    # a lone "▁" first, then a word: the full decode drops the space
    space = tok.token_to_id("▁")
    _check_stream(text, tok, [space, *tok.encode("fox").ids[1:]])


@pytest.mark.parametrize("decoder", ["metaspace", "byte_fallback", "byte_level"])
def test_text_after_a_prompt_keeps_the_first_words_space(decoder, tmp_path):
    """Generated ids after a prompt's: streamed and batch text are what the full decode of
    prompt + generation adds to the prompt's decode, the first generated word's space
    included (SentencePiece decoders drop the space of a text's first token: "the" then
    "▁fox" came out as "thefox")."""
    tok = _byte_level_multilingual() if decoder == "byte_level" else _metaspace(decoder)
    text = _text(tok, tmp_path / "tok")
    the, fox = tok.encode("the").ids, tok.encode("the fox").ids[len(tok.encode("the").ids):]
    assert "".join(_streamed_after(text, the, fox)) == " fox"
    assert text.decode_after(the, fox) == " fox"
    for s in [*TEXTS, "the quick brown fox jumps over the lazy dog"]:
        ids = tok.encode(s).ids
        for k in range(1, len(ids)):
            prompt, new = ids[:k], ids[k:]
            base, full = tok.decode(prompt), tok.decode(ids)
            if not full.startswith(base):  # a character split between the two
                continue
            want = full[len(base):]
            assert text.decode_after(prompt, new) == want, (s, k)
            assert "".join(_streamed_after(text, prompt, new)) == want, (s, k)


@pytest.mark.parametrize("decoder", ["byte_fallback", "byte_level"])
def test_token_bytes_spell_the_text(decoder, tmp_path):
    """token_bytes of each id, concatenated, are the UTF-8 bytes of the decoded text,
    also where a token is part of a character (a <0xE4> byte-fallback token, a
    byte-level piece of a multi-byte character); token_label names those by bytes."""
    from moekit.inference.text import token_label

    tok = _byte_level_multilingual() if decoder == "byte_level" else _metaspace(decoder)
    text = _text(tok, tmp_path / "tok")
    partial = 0
    for s in [*TEXTS, "中文 naïve café ✓"]:
        ids = tok.encode(s).ids
        raw = [text.token_bytes(t) for t in ids]
        joined = b"".join(raw).decode("utf-8")
        # byte fallback's decoder strips one leading space (of the "▁" it prepends)
        assert (joined[1:] if decoder == "byte_fallback" else joined) == tok.decode(ids)
        for r in raw:
            try:
                assert token_label(r) == r.decode("utf-8")
            except UnicodeDecodeError:
                partial += 1
                assert token_label(r) == "bytes:" + "".join(f"\\x{b:02x}" for b in r)
    assert partial  # tokens that are parts of characters were there


def _streamed_after(text, prompt, ids) -> list[str]:
    emit = text.stream(prompt)
    return [emit(t) for t in ids] + [emit(None)]


def test_streaming_decodes_a_few_ids_per_id(tmp_path, monkeypatch):
    """The ids decoded for a generation of n ids grow as n, not n^2 (each decode of the
    whole generation so far)."""
    tok = _byte_level_multilingual()
    tok.add_special_tokens(SPECIALS)
    text = _text(tok, tmp_path / "tok")
    ids: list[int] = []
    while len(ids) < 2000:
        ids += _with_specials(tok, tok.encode(" ".join(TEXTS)).ids, seed=len(ids))
    decoded = []

    class Counting:
        """The tokenizer, counting the ids it is asked to decode."""

        def __init__(self, inner):
            self.inner = inner

        def decode(self, ids, **kw):
            decoded.append(len(ids))
            return self.inner.decode(ids, **kw)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(text, "tokenizer", Counting(text.tokenizer))
    _check_stream(text, tok, ids)
    assert sum(decoded) < 20 * len(ids) and max(decoded) < 50


def _disk_fills_copying_the_tokenizer(monkeypatch) -> None:
    """The disk fills while tokenizer.json is copied (after the model files are written)."""
    import shutil

    from moekit.inference import text

    real = shutil.copyfile

    def copyfile(src, dst, *args, **kwargs):
        if str(src).endswith("tokenizer.json"):
            with open(dst, "wb") as f:
                f.write(b'{"half')
            raise OSError(28, "No space left on device")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(text.shutil, "copyfile", copyfile)


def test_quantize_that_fails_copying_the_tokenizer_keeps_the_output_there_before(
        converted, tmp_path, monkeypatch, capsys):
    """The tokenizer was copied after the new output was swapped in: a failed copy left
    the new model without it (the old output's deleted), and `moekit generate` decoded its
    ids as bytes (a ValueError). Now the old output, tokenizer and all, stays as it was."""
    _, _, root = converted
    out = tmp_path / "q"
    assert cli_main(["quantize", str(root / "lm"), "--bits", "8", "--out", str(out)]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert "tokenizer/tokenizer.json" in map(str, before)
    _disk_fills_copying_the_tokenizer(monkeypatch)
    assert cli_main(["quantize", str(root / "lm"), "--bits", "8", "--scope", "experts",
                     "--out", str(out), "--overwrite"]) == 1
    monkeypatch.undo()
    assert "No space left on device" in capsys.readouterr().err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} \
        == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_convert_that_fails_copying_the_tokenizer_leaves_no_run(converted, tmp_path,
                                                                monkeypatch, capsys):
    """The tokenizer was copied after the checkpoint: a failed copy left a run without it
    (generate decoded its ids as bytes) that a second `moekit convert` refused to replace."""
    _, _, root = converted
    dest = tmp_path / "lm"
    _disk_fills_copying_the_tokenizer(monkeypatch)
    assert cli_main(["convert", str(root / "hf"), str(dest)]) == 1  # a failed write: 1
    monkeypatch.undo()
    assert "No space left on device" in capsys.readouterr().err
    assert not (dest / "LATEST").exists() and not list(dest.glob("step_*"))
    assert cli_main(["convert", str(root / "hf"), str(dest)]) == 0  # the retry is allowed
    assert (dest / "tokenizer" / "tokenizer.json").read_bytes() \
        == (root / "hf" / "tokenizer.json").read_bytes()


def test_convert_that_fails_writing_the_checkpoint_leaves_no_tokenizer(converted, tmp_path,
                                                                       monkeypatch, capsys):
    """A tokenizer left in a directory without a checkpoint would be taken up by a later
    run trained there (bytes model, BPE text)."""
    import moekit.train.checkpoint as ckpt_mod
    _, _, root = converted
    dest = tmp_path / "lm"

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_stream", full)
    assert cli_main(["convert", str(root / "hf"), str(dest)]) == 1  # a failed write: 1
    monkeypatch.undo()
    assert "No space left on device" in capsys.readouterr().err
    assert not dest.exists() or list(dest.iterdir()) == []
