"""Write a routing analysis: routing.json, report.md and PNG plots."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from moekit.analysis.stats import token_label
from moekit.config import check_out_dir, reject
from moekit.train.rundir import ReplacedError, write_files

JSON_FILE, REPORT_FILE, TOKENS_CSV = "routing.json", "report.md", "tokens.csv"
LOAD_PNG, COACT_PNG = "load_heatmap.png", "coactivation.png"
OUTPUT_FILES = (JSON_FILE, REPORT_FILE, TOKENS_CSV, LOAD_PNG, COACT_PNG)
PLOT_HINT = 'pip install "moekit[plot]" for the plots'


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def expert_ticks(ax, num_experts: int, y: bool = False) -> None:
    """A labelled tick per expert up to 32 (matplotlib's own had labelled 0, 2, 4, 6 of 8
    experts, leaving the odd ones to count off)."""
    if num_experts <= 32:
        ax.set_xticks(range(num_experts))
        if y:
            ax.set_yticks(range(num_experts))


def load_figure(layers: list[dict[str, Any]]):
    """Each expert's load / uniform load per layer, white at 1.0 (balanced)."""
    from moekit.train.plots import centred_norm
    plt = _pyplot()
    rel = [[s * layer["num_experts"] for s in layer["load_share"]] for layer in layers]
    # at least 5 x 2.4 in: one MoE layer (--moe-every 2 on the tiny preset) had made it
    # 4 x 1.45 in, the colour bar's label cut at the edge and the title over the bar
    width = max(5.0, 0.35 * max(len(r) for r in rel) + 2)
    fig, ax = plt.subplots(figsize=(width, max(2.4, 1.0 + 0.45 * len(rel))),
                           layout="constrained")
    im = ax.imshow(rel, aspect="auto", cmap="coolwarm",
                   norm=centred_norm([v for r in rel for v in r]))
    ax.set_xlabel("expert")
    expert_ticks(ax, max(len(r) for r in rel))
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(len(rel)), [layer["name"] for layer in layers], fontsize=7)
    ax.set_title("expert load / uniform load (1.0 = balanced)")
    fig.colorbar(im, ax=ax, label="load / uniform load")
    return fig


def over_chance_matrix(layer: dict[str, Any]) -> list[list[float]]:
    """tokens routed to both i and j / the count expected by chance; NaN on the diagonal
    (an expert with itself is not a pair) and where nothing is expected (top-1)."""
    co, expected = layer["coactivation"], layer["coactivation_expected"]
    E = len(co)
    return [[co[i][j] / expected[i][j] if i != j and expected[i][j] > 0 else float("nan")
             for j in range(E)] for i in range(E)]


def coactivation_figure(layers: list[dict[str, Any]]):
    """Co-activation over chance per layer on one colour scale for every panel, white
    at 1.0 (as often as random routing at these loads would pair them)."""
    from moekit.train.plots import centred_norm
    plt = _pyplot()
    n = len(layers)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 1.0, 3.0 * rows),
                             squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.axis("off")
    ratios = [over_chance_matrix(layer) for layer in layers]
    norm = centred_norm([v for r in ratios for row in r for v in row if v == v])
    # the diagonal (an expert with itself) is not a pair: drawn in black
    cmap = plt.get_cmap("coolwarm").with_extremes(bad="black")
    im = None
    for ax, layer, ratio in zip(axes.flat, layers, ratios, strict=False):
        ax.set_title(f"{layer['name']}", fontsize=8)
        if all(v != v for row in ratio for v in row):  # top-1: a panel all black had
            ax.axis("off")                               # read as data, with a colour bar
            ax.text(0.5, 0.5, "top-1 routing:\nno expert pairs", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9)
            continue
        im = ax.imshow(ratio, cmap=cmap, norm=norm)
        ax.set_xlabel("expert j")
        ax.set_ylabel("expert i")
        expert_ticks(ax, len(ratio), y=True)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), label="tokens to both / chance")
    fig.suptitle("expert pairs: tokens routed to both / chance\n(1.0 = as random routing at "
                 "these loads;\nblack: the diagonal, or a pair with an unused expert)",
                 fontsize=9)
    return fig


def plot_load(layers: list[dict[str, Any]], path: Path) -> None:
    fig = load_figure(layers)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


def plot_coactivation(layers: list[dict[str, Any]], path: Path) -> None:
    fig = coactivation_figure(layers)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def fmt_items(items: list[dict[str, Any]], n: int = 4) -> str:
    """`item` +tokens beyond chance (lift, share of its occurrences routed here); an older
    routing.json, without ``excess``, shows the lift and routed share alone."""
    text = ", ".join(f"`{it['item']}` "
                     + (f"+{it['excess']:.0f} " if "excess" in it else "")
                     + f"x{it['lift']:.1f} ({it['routed']:.0%})" for it in items[:n])
    return text.replace("|", "\\|") or "-"


def router_entropy(layer: dict[str, Any]) -> str:
    if layer["router_entropy_nats"] is None:
        return "n/a (hash: no scores)"
    return (f"{layer['router_entropy_nats']:.3f} nats "
            f"({layer['router_entropy_normalised']:.0%})")


def summary_table(layers: list[dict[str, Any]]) -> list[str]:
    lines = ["| layer | E | K | load max/mean | CV | starved | dropped | router entropy "
             "(of max) | token MI (bits) | pattern MI (bits) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for layer in layers:
        imb, spec = layer["imbalance"], layer["specialisation"]
        pattern = spec.get("pattern_mutual_information_bits")
        lines.append(
            f"| {layer['name']} | {layer['num_experts']} | {layer['top_k']} | "
            f"{imb['max_over_mean']:.2f} | {imb['coefficient_of_variation']:.2f} | "
            f"{imb['starved_experts']} | {layer['dropped_fraction']:.2%} | "
            f"{router_entropy(layer)} | {spec['token_mutual_information_bits']:.3f} | "
            f"{'-' if pattern is None else f'{pattern:.3f}'} |")
    return lines


def _chance(p: dict[str, Any]) -> str:
    return "-" if p["over_chance"] is None else f"{p['over_chance']:.2f}x"


def _count(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"  # 0.0004 expected is not "0"


def frequent_pairs(layer: dict[str, Any], n: int = 3) -> str:
    """The n pairs routed together most often (ties: lower expert ids first)."""
    pairs = [p for p in layer["coactivation_pairs"] if p["tokens"] > 0][:n]
    return ", ".join(f"{i}+{j} ({p['tokens']} tokens, {p['share']:.1%}; {_chance(p)} chance)"
                     for p in pairs for i, j in [p["experts"]]) or "-"


def over_chance_pairs(layer: dict[str, Any], n: int = 3) -> str:
    """The n pairs with the most tokens beyond chance (tokens - expected): a pair seen
    twice cannot out-rank one seen thousands of times, as a ranking by lift let it."""
    pairs = sorted((p for p in layer["coactivation_pairs"] if p["excess"] > 0),
                   key=lambda p: (-p["excess"], p["experts"]))[:n]
    return ", ".join(f"{i}+{j} (+{p['excess']:.0f} tokens: {p['tokens']} vs "
                     f"{_count(p['expected'])} expected, {_chance(p)} chance)"
                     for p in pairs for i, j in [p["experts"]]) or "-"


def layer_section(layer: dict[str, Any]) -> list[str]:
    lines = [f"### {layer['name']}", "",
             f"Expert pairs routed together most often: {frequent_pairs(layer)}.", "",
             f"Most over-represented pairs (tokens beyond chance): "
             f"{over_chance_pairs(layer)}.", "",
             "| expert | load share | tokens it receives beyond chance (+tokens, lift, routed) | "
             "byte patterns (previous>current class) |", "|---|---|---|---|"]
    for item in layer["specialisation"]["experts"]:
        e = item["expert"]
        lines.append(f"| {e} | {layer['load_share'][e]:.1%} | {fmt_items(item['tokens'])} | "
                     f"{fmt_items(item.get('patterns', []), 3)} |")
    return [*lines, ""]


def forward_lines(meta: dict[str, Any]) -> list[str]:
    """How many tokens were routed together (what capacity and expert choice depend on)."""
    if "tokens_per_forward" not in meta:  # an analyze_model result given its own meta
        return []
    line = (f"- routed {meta['tokens_per_forward']:,} tokens per forward pass "
            f"(batch size {meta['batch_size']})")
    last = meta.get("last_forward_tokens")
    if last is not None and last != meta["tokens_per_forward"]:
        line += f", {last:,} in the last"
    if meta.get("train_tokens_per_forward"):
        line += f"; training routed {meta['train_tokens_per_forward']:,}"
    if meta.get("routing_depends_on_batch"):
        line += (" (this router's capacity or expert choice is a fraction of them: drops "
                 "and picks depend on it)")
    return [line]


def group_note(meta: dict[str, Any]) -> str:
    """A sentence for group-limited routing, whose chance baseline does not know the
    groups: a --groups 2 --topk-groups 1 run's in-group pairs read 8x chance, its
    cross-group pairs 0x, by construction rather than by anything the router learned."""
    cfg = meta.get("model_config") or {}
    G, picked = cfg.get("num_groups", 1), cfg.get("topk_groups", 1)
    if G <= 1 or picked >= G:
        return ""
    return (f" This model routes each token within {picked} of {G} expert groups, which "
            "the chance count does not know: pairs across groups are rarer than chance "
            "and pairs within a group more common by construction.")


def markdown(result: dict[str, Any], plots: bool = True) -> str:
    meta = result["meta"]
    lines = [
        "# moekit routing analysis", "",
        # a quantized output from before its float checkpoint was recorded: no step
        f"- checkpoint: `{meta['checkpoint']}` "
        f"(step {'unknown' if meta['step'] is None else meta['step']})",
        f"- text: {meta['source']}, {meta['tokens']:,} tokens in {meta['sequences']} "
        f"sequences of {meta['seq_len']}",
        f"- model: {meta['model']}",
        *([f"- weights: {meta['weights_line']}"] if meta.get("weights_line") else []),
        *forward_lines(meta), "",
        "Load is counted before any capacity drop, in (token, expert) pairs; load share = "
        "an expert's pairs / all pairs. Summary: load max/mean = the busiest expert's load "
        "/ the mean load; CV = the standard deviation of the loads / their mean; starved = "
        "experts with less than 10% of the mean load; dropped = the fraction of pairs the "
        "capacity removed (expert choice: of tokens no expert took); router entropy = the "
        "mean over tokens of the entropy of the router's distribution over the experts "
        "(sigmoid: the scores normalised to sum to 1), in nats and as a share of its "
        "maximum ln E. Per expert, items rank by tokens beyond "
        "chance: +N = count - expected, expected = the item's occurrences x the expert's "
        "share of the text's tokens (its pairs / all tokens), so an item seen a few times "
        "cannot lead on its ratio alone; xL = lift = count / expected (share at the expert "
        "/ share in the text); in brackets, the fraction of the item's occurrences routed "
        "to that expert. "
        "MI = mutual information between the token (or byte pattern) and the chosen expert. "
        "Expert pairs: tokens routed to both experts; chance = the count expected if every "
        "token drew its K experts at random with these per-expert loads (the "
        "maximum-entropy routing with them; expert choice: experts picking tokens "
        "independently); 1.5x chance = 1.5 times that count. "
        "Over-represented pairs rank by tokens - chance, so a rare pair cannot lead on "
        "its ratio alone." + group_note(meta),
        "", "## Summary", "", *summary_table(result["layers"]), "",
        *([f"![expert load]({LOAD_PNG})", "", f"![co-activation]({COACT_PNG})"] if plots
          else [f"(no plots: matplotlib is not installed; {PLOT_HINT})"]), "",
        "## Per layer", ""]
    for layer in result["layers"]:
        lines += layer_section(layer)
    return "\n".join(lines)


def tokens_csv(layers: list[dict[str, Any]]) -> str | None:
    """One row per (layer, token, expert) that occurred: layer, token_id, token (a byte as
    Python writes it, a tokenizer's token as its text, else the id), expert, count
    (pairs), occurrences (of the token in the text), routed (count / occurrences). None
    for layers without token counts."""
    if not all("token_counts" in layer for layer in layers):
        return None
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer", "token_id", "token", "expert", "count", "occurrences", "routed"])
    for layer in layers:
        text = layer.get("token_text", {})  # a tokenizer's (analyze of a converted run)
        for v, e, c, n in layer["token_counts"]:
            label = text.get(str(v)) or token_label(v, layer.get("vocab_size", math.inf))
            w.writerow([layer["name"], v, label, e, c, n, f"{c / n:.6g}"])
    return buf.getvalue()


META_KEYS = ("checkpoint", "step", "source", "tokens", "sequences", "seq_len", "model")


def check_result(result: Any, source: str | None = None) -> None:
    """``result`` is what ``analyze_checkpoint`` returns: {"meta": {...}, "layers": [...]}
    with the meta keys the report prints (analyze_model's list alone has no meta) and the
    layer keys it reads; ``source`` names the file it was read from, if any."""
    if not isinstance(result, dict) or not isinstance(result.get("meta"), dict) \
            or not isinstance(result.get("layers"), list):
        what = sorted(result, key=str) if isinstance(result, dict) else type(result).__name__
        reject("result", what, 'it must be a dict {"meta": dict, "layers": list of '
               "analyze_model's layer summaries}")
    missing = [k for k in META_KEYS if k not in result["meta"]]
    if missing:
        reject("result['meta']", sorted(result["meta"], key=str),
               f"it lacks {missing} (the report prints {', '.join(META_KEYS)})")
    check_layer_keys(result, source)


# what the report reads per layer beyond analyze_model's first routing.json: the expert
# pairs against chance (an older file had raised KeyError: 'coactivation_pairs')
LAYER_KEYS = ("coactivation_pairs", "coactivation_expected")


def check_layer_keys(result: dict[str, Any], source: str | None = None) -> None:
    """One line naming the file (or the checkpoint) when a layer lacks what the report
    reads: a routing.json written before those keys existed."""
    for layer in result["layers"]:
        missing = [k for k in LAYER_KEYS if not isinstance(layer, dict) or k not in layer]
        if missing:
            where = source or f"the routing.json of checkpoint {result['meta']['checkpoint']!r}"
            name = layer.get("name", "?") if isinstance(layer, dict) else "?"
            raise ValueError(
                f"{where} is not allowed: its layer {name!r} lacks {', '.join(missing)} "
                "(written by an older moekit analyze); re-run `moekit analyze "
                f"{result['meta']['checkpoint']}` to rewrite it")


def remove_stale(out: Path, written: set[str]) -> None:
    """Remove the analysis files of an earlier run in ``out`` that this one did not
    write: a compare.json (or plots) left from an earlier ``--compare`` run stayed beside
    the new routing.json and report.md, describing other checkpoints and tokens.
    Called once the new files are in place, so a failure is a ``ReplacedError`` (an
    error message must not say that what was there before is unchanged)."""
    from moekit.analysis.compare import COMPARE_FILE
    for name in sorted({*OUTPUT_FILES, COMPARE_FILE} - written):
        try:
            (out / name).unlink(missing_ok=True)
        except OSError as e:
            raise ReplacedError(e, f"the new report is in place, but the earlier run's "
                                f"{name} could not be removed") from e


def comparison_beside(routing_json: Path, result: dict[str, Any]) -> dict[str, Any] | None:
    """The compare.json in ``routing_json``'s directory where it was written with it
    (``moekit analyze --compare``: its "before" side is ``result``'s checkpoint, routing
    the same number of tokens), else None. A re-rendered report had lost its "Compared
    with" section although compare.json stayed beside routing.json. One that cannot be
    read as a comparison is refused, naming it, before anything is written."""
    from moekit.analysis.compare import COMPARE_FILE, compare_section
    path = routing_json.parent / COMPARE_FILE
    if not path.is_file():
        return None
    try:
        comparison = json.loads(path.read_text())
        before, tokens = comparison["meta"]["before"]["checkpoint"], comparison["meta"]["tokens"]
        compare_section(comparison)  # what the report reads of it
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"compare.json {str(path)!r} is not allowed beside {routing_json}: "
                         "it cannot be read as the comparison `moekit analyze --compare` "
                         f"writes ({type(e).__name__}: {e}); move it away to re-render "
                         "without it") from None
    same = (before, tokens) == (result["meta"]["checkpoint"], result["meta"]["tokens"])
    return comparison if same else None


def write_report(result: dict[str, Any] | str | Path, out_dir: str | Path,
                 comparison: dict[str, Any] | None = None, *,
                 new_run: bool = False) -> dict[str, Path]:
    """routing.json and report.md always; the PNGs where matplotlib is installed.
    ``result``: the dict ``analyze_checkpoint`` returns, or the path of a routing.json.
    ``comparison``: what ``analysis.compare.compare`` returns, written as compare.json
    and as a section at the end of report.md. ``new_run`` (``moekit analyze``): this
    is a new analysis replacing whatever was in ``out_dir``, so the analysis files it
    did not write are removed (``remove_stale``); by default they stay, as when a
    routing.json is re-rendered in place: a compare.json beside it was deleted. A
    routing.json given without ``comparison`` brings the compare.json written with it
    (``comparison_beside``): the re-rendered report keeps its "Compared with" section.

    Both texts are made before anything is written: a bad ``result`` leaves an existing
    report as it was (a result without "meta" overwrote routing.json, then a KeyError).
    Every file is written under a temporary name and renamed into place only once all
    are complete (``rundir.write_files``): written in place, a full disk had left a cut
    routing.json where a good one was.
    """
    source = path = None
    if isinstance(result, (str, Path)):  # a routing.json written before
        source, path = f"routing.json {str(result)!r}", Path(result)
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{source} is not allowed: it cannot be read as JSON "
                             f"({e})") from None
    check_result(result, source)
    if path is not None and comparison is None:
        comparison = comparison_beside(path, result)
    check_out_dir("out_dir", out_dir)  # a file, "" (the current directory): refused
    try:
        json_text = json.dumps(result, indent=1)
    except (TypeError, ValueError) as e:  # a tensor, a circular reference: not JSON
        reject("result", type(result).__name__, f"it must hold JSON values only ({e})")
    plots = have_matplotlib()
    texts = {JSON_FILE: json_text, REPORT_FILE: markdown(result, plots)}
    csv_text = tokens_csv(result["layers"])
    if csv_text is not None:
        texts[TOKENS_CSV] = csv_text
    if comparison is not None:
        from moekit.analysis.compare import COMPARE_FILE, compare_section

        texts[COMPARE_FILE] = json.dumps(comparison, indent=1)
        texts[REPORT_FILE] += "\n\n" + "\n".join(compare_section(comparison))
    writers = {name: (lambda path, text=text: path.write_text(text))
               for name, text in texts.items()}
    if plots:
        writers[LOAD_PNG] = lambda path: plot_load(result["layers"], path)
        writers[COACT_PNG] = lambda path: plot_coactivation(result["layers"], path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_files(out, writers)
    if new_run:
        remove_stale(out, set(writers))
    keys = {JSON_FILE: "json", REPORT_FILE: "report", TOKENS_CSV: "tokens",
            LOAD_PNG: "load", COACT_PNG: "coactivation"}
    return {keys.get(name, "compare"): out / name for name in writers}

