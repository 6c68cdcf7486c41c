"""The model card (``README.md``) and loss-curve image of an exported model directory.

Every number in a card is read from the run's own files, never typed by hand:

* ``config.json`` (architecture) and the weights (parameter count, read from the safetensors header),
* ``training_args.json`` (the exact command and settings, written by ``scripts/train.py``),
* ``eval_results.json`` (the final validation pass of the training run),
* ``log.jsonl`` (training loss per logged step: the loss curve),
* ``evaluation.json`` (optional: ``scripts/evaluate.py --update_card`` rows, e.g. several memory lengths).

The text comes from the template ``model_card.md`` (the project root's; setup.py ships it inside the package),
rendered with Jinja2 through ``huggingface_hub.ModelCard.from_template`` (which writes the YAML metadata,
``model-index`` included). The loss curve (``loss_curve.png``: training loss and validation points against the
optimizer step, labelled axes, legend) is drawn with matplotlib on its own Agg canvas (no ``pyplot``, so no global
backend change: headless and thread-safe). A log without training-loss records gives no picture, and the card then
leaves the figure out.

The card follows the run's token unit (``training_args.json``'s ``tokenizer``: "char", the default, "byte" or
"word"; see :data:`UNITS`): the unit names in the prose and tables, the headline figure (bits per character or
per byte for character / byte models; perplexity per word for word models, every word and each line's ``<eos>``
scored, as in the paper's WikiText-103 setup), the vocabulary limitation, the tags and the loss-curve title.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any


def _template_path() -> Path:
    """``hf_txl/training/model_card.md`` in an installed package (setup.py copies it there), else the source checkout's
    top-level ``model_card.md``, the one source of the template."""
    packaged = Path(__file__).resolve().parent / "model_card.md"
    return packaged if packaged.is_file() else Path(__file__).resolve().parents[2] / "model_card.md"


#: The card template.
TEMPLATE_PATH = _template_path()
LOSS_CURVE = "loss_curve.png"
EVALUATION_FILE = "evaluation.json"
BUNDLED_DATASET = ("karpathy/tiny_shakespeare", "Tiny Shakespeare")

#: How the card names each token unit (hf_txl.tokenization_txl.token_unit) and which figure it leads with:
#: ``kind`` ("<kind>-level": prose, tags, loss-curve title), ``name`` / ``plural`` (prose and table columns),
#: ``short`` ("nats/<short>"), ``headline`` ("bpc" or "perplexity") and ``bits`` (the bpc figure's name).
UNITS: dict[str, dict[str, str]] = {
    "char": {"code": "char", "kind": "character", "name": "character", "plural": "characters", "short": "char",
             "headline": "bpc", "bits": "bits per character"},
    "byte": {"code": "byte", "kind": "byte", "name": "byte", "plural": "bytes", "short": "byte",
             "headline": "bpc", "bits": "bits per byte"},
    "word": {"code": "word", "kind": "word", "name": "word", "plural": "words", "short": "word",
             "headline": "perplexity", "bits": "bits per word"},
    "token": {"code": "token", "kind": "token", "name": "token", "plural": "tokens", "short": "token",
              "headline": "perplexity", "bits": "bits per token"},
}  # fmt: skip


def write_model_card(
    model_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    template_path: str | os.PathLike | None = None,
) -> Path:
    """Render the card into ``model_dir/README.md`` (and ``loss_curve.png`` from ``log.jsonl``); returns its path."""
    model_dir = Path(model_dir)
    facts = collect_facts(model_dir, repo_id=repo_id)
    curve = loss_curve_points(model_dir / "log.jsonl")
    if curve["train"]:
        title = f"{facts['model_name']} ({facts['tokenizer_kind']}-level): loss during training"
        write_loss_curve_png(model_dir / LOSS_CURVE, curve["train"], curve["eval"], title=title)
        facts["loss_curve"] = {"file": LOSS_CURVE, **_ranges(curve)}
    text = render_model_card(facts, license=license, template_path=template_path)
    readme = model_dir / "README.md"
    readme.write_text(text)
    return readme


# ----------------------------------------------------------------------------------------------------
# Facts from the run's files
# ----------------------------------------------------------------------------------------------------


def collect_facts(model_dir: Path, *, repo_id: str | None = None) -> dict[str, Any]:
    """Everything the template shows, read from the files of ``model_dir``."""
    config = _read_json(model_dir / "config.json")
    if config is None:
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json); pass a run's --output_dir.")
    args = _read_json(model_dir / "training_args.json") or {}
    results = _read_json(model_dir / "eval_results.json")
    evaluation = _read_json(model_dir / EVALUATION_FILE)
    repo_id = repo_id or args.get("hub_model_id")
    unit = UNITS[token_unit_of(model_dir, args, evaluation)]
    return {
        "model_name": repo_id.split("/")[-1] if repo_id else model_dir.resolve().name,
        "repo_ref": repo_id or "path/to/model_dir",
        "repo_id": repo_id,
        "num_parameters": count_parameters(model_dir),
        "config": config,
        "config_json": json.dumps(config, indent=2, sort_keys=True),
        "args": args,
        "tokenizer_kind": unit["kind"],
        "unit": unit,
        "dataset": describe_dataset(args),
        "results": results,
        "evaluation": evaluation,
        "loss_curve": None,
    }


def token_unit_of(model_dir: Path, args: dict[str, Any], evaluation: dict[str, Any] | None = None) -> str:
    """The run's token unit, a key of :data:`UNITS`: ``training_args.json``'s ``tokenizer``, else the
    ``token_unit`` that ``evaluation.json`` or ``tokenizer_config.json`` records, else "char"."""
    tokenizer_config = _read_json(model_dir / "tokenizer_config.json") or {}
    unit = args.get("tokenizer") or (evaluation or {}).get("token_unit") or tokenizer_config.get("token_unit")
    if not unit:
        return "char"
    return unit if unit in UNITS else "token"


def describe_dataset(args: dict[str, Any]) -> dict[str, str | None]:
    """Hub id (for the metadata, when there is one), display name and a sentence about the split."""
    fraction = args.get("validation_split_fraction", 0.1)
    if args.get("dataset_name"):
        config = args.get("dataset_config_name")
        name = args["dataset_name"] + (f" ({config})" if config else "")
        split = f"its validation split (or the last {fraction:.0%} of train when it has none)"
        return {"id": args["dataset_name"], "config": config, "name": name, "split": split}
    if args.get("train_file"):
        name = Path(args["train_file"]).name
        validation = args.get("validation_file")
        held_out = f"`{Path(validation).name}`" if validation else f"the last {fraction:.0%}"
        return {"id": None, "config": None, "name": name, "split": f"{held_out} held out for validation"}
    hub_id, name = BUNDLED_DATASET
    split = f"the copy bundled with hf_txl (1,115,394 characters); the last {fraction:.0%} held out"
    return {"id": hub_id, "config": None, "name": name, "split": split}


def count_parameters(model_dir: Path) -> int:
    """Number of stored parameters, from the safetensors headers (nothing is loaded)."""
    total = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with file.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def loss_curve_points(log_path: Path) -> dict[str, list[tuple[float, float]]]:
    """(step, loss) of the training log and (step, eval loss) of its evaluations (the last record per step)."""
    train: dict[int, float] = {}
    evals: dict[int, float] = {}
    if log_path.is_file():
        for line in log_path.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            if "loss" in record and math.isfinite(record["loss"]):
                train[record["step"]] = record["loss"]
            if "eval_loss" in record and math.isfinite(record["eval_loss"]):
                evals[record["step"]] = record["eval_loss"]
    return {"train": sorted(train.items()), "eval": sorted(evals.items())}


def _ranges(curve: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    points = curve["train"] + curve["eval"]
    return {
        "first_step": min(s for s, _ in points), "last_step": max(s for s, _ in points),
        "min_loss": min(v for _, v in points), "max_loss": max(v for _, v in points),
        "first_loss": curve["train"][0][1], "last_loss": curve["train"][-1][1], "has_eval": bool(curve["eval"]),
    }  # fmt: skip


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------


def render_model_card(
    facts: dict[str, Any], *, license: str = "apache-2.0", template_path: str | os.PathLike | None = None
) -> str:
    """The card text: YAML metadata (with ``model-index``) + the template rendered with ``facts``."""
    from huggingface_hub import ModelCard, ModelCardData

    template = Path(template_path or TEMPLATE_PATH)
    if not template.is_file():
        raise FileNotFoundError(
            f"model card template not found at {template}; an installed hf_txl ships it as hf_txl/model_card.md "
            "and a source checkout has it at the top level. Reinstall hf_txl or pass template_path."
        )
    dataset = facts["dataset"]
    data = ModelCardData(
        license=license,
        library_name="transformers",
        tags=["hf_txl", "transformer-xl", "text-generation", f"{facts['tokenizer_kind']}-level", "custom_code"],
        datasets=[dataset["id"]] if dataset["id"] else None,
        pipeline_tag="text-generation",
        model_name=facts["model_name"],
        eval_results=eval_results(facts) or None,
    )
    card = ModelCard.from_template(data, template_path=str(template), **facts)
    return str(card)


def eval_results(facts: dict[str, Any]) -> list:
    """``model-index`` entries: the training run's final validation figures, then any evaluate.py rows."""
    from huggingface_hub import EvalResult

    dataset = facts["dataset"]
    common = dict(
        task_type="text-generation", task_name="Language modelling", dataset_type=dataset["id"] or "text",
        dataset_name=dataset["name"], dataset_config=dataset["config"], dataset_split="validation",
    )  # fmt: skip
    unit = facts.get("unit") or UNITS["char"]
    if unit["headline"] == "bpc":  # character / byte level: bits per character (byte) first
        metrics = (("bpc", unit["bits"].capitalize()), ("perplexity", "Perplexity"), ("loss", "Loss"))
    else:  # word level: perplexity per word (<eos> included), the paper's WikiText-103 figure
        metrics = (("perplexity", f"Perplexity per {unit['name']}"), ("loss", f"Loss (nats/{unit['short']})"))
    headline, headline_label = metrics[0]
    entries = []
    results = facts["results"]
    if results:
        setting = f"eval tgt_len={results.get('eval_tgt_len')}, mem_len={results.get('eval_mem_len')}"
        for metric, label in metrics:
            entries.append(EvalResult(**common, metric_type=metric, metric_value=round(results[metric], 4),
                                      metric_name=f"{label} ({setting})"))  # fmt: skip
    for row in (facts["evaluation"] or {}).get("rows", []):
        setting = f"eval tgt_len={row['tgt_len']}, mem_len={row['mem_len']}, clamp_len={row['clamp_len']}"
        setting += ", same_length" if row.get("same_length") else ""
        entries.append(EvalResult(**common, metric_type=headline, metric_value=round(row[headline], 4),
                                  metric_name=f"{headline_label} ({setting})"))  # fmt: skip
    return entries


# ----------------------------------------------------------------------------------------------------
# The loss curve (matplotlib, Agg canvas: no pyplot, no global backend change)
# ----------------------------------------------------------------------------------------------------

TRAIN_LABEL, EVAL_LABEL = "training loss", "validation loss"
X_LABEL, Y_LABEL = "optimizer step", "loss (nats per token)"
_TRAIN_COLOUR, _EVAL_COLOUR = "tab:blue", "tab:orange"


def loss_curve_figure(
    train: list[tuple[float, float]],
    evals: list[tuple[float, float]] = (),
    *,
    title: str | None = None,
    width: int = 800,
    height: int = 450,
    dpi: int = 100,
):
    """A ``matplotlib.figure.Figure`` of the training loss (blue line) and validation loss (orange squares).

    The figure has its own Agg canvas (``pyplot`` and the global backend are left alone), so this works headless
    and from any thread. ``width`` x ``height`` are pixels at ``dpi``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not train:
        raise ValueError("no training-loss points to plot (log.jsonl has no 'loss' records)")
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    _plot_train(ax, train)
    if evals:
        _plot_evals(ax, evals)
    _style_axes(ax, title or "Training loss")
    _widen_short_step_range(ax, [step for step, _ in list(train) + list(evals)])
    return fig


def write_loss_curve_png(
    path: str | os.PathLike,
    train: list[tuple[float, float]],
    evals: list[tuple[float, float]] = (),
    *,
    title: str | None = None,
    width: int = 800,
    height: int = 450,
    dpi: int = 100,
) -> None:
    """Draw :func:`loss_curve_figure` into the PNG file ``path`` (``width`` x ``height`` pixels)."""
    fig = loss_curve_figure(train, evals, title=title, width=width, height=height, dpi=dpi)
    fig.savefig(path, format="png", dpi=dpi)


def _plot_train(ax, train: list[tuple[float, float]]) -> None:
    """The training loss as a line (with a marker when there is a single point, which a line alone would hide)."""
    steps, losses = zip(*train)
    marker = "o" if len(train) == 1 else None
    ax.plot(steps, losses, color=_TRAIN_COLOUR, linewidth=1.4, marker=marker, label=TRAIN_LABEL, zorder=2)


def _plot_evals(ax, evals: list[tuple[float, float]]) -> None:
    """The validation losses (periodic and final) as squares on top of the line."""
    steps, losses = zip(*evals)
    ax.plot(steps, losses, linestyle="none", marker="s", markersize=7, color=_EVAL_COLOUR,
            markeredgecolor="black", markeredgewidth=0.6, label=EVAL_LABEL, zorder=3)  # fmt: skip


def _widen_short_step_range(ax, steps: list[float]) -> None:
    """At least one step either side when the log spans under two steps, so the x ticks stay whole steps."""
    first, last = min(steps), max(steps)
    if last - first < 2:
        ax.set_xlim(first - 1, last + 1)


def _style_axes(ax, title: str) -> None:
    """Labels, title, integer step ticks, a light grid and the legend."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(Y_LABEL)
    ax.set_title(title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, color="0.88", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.legend(loc="best", framealpha=0.9)
