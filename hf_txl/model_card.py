"""The model card (``README.md``) and loss-curve image of an exported model directory.

Every number in a card is read from the run's own files, never typed by hand:

* ``config.json`` (architecture) and the weights (parameter count, read from the safetensors header),
* ``training_args.json`` (the exact command and settings, written by ``scripts/train.py``),
* ``eval_results.json`` (the final validation pass of the training run),
* ``log.jsonl`` (training loss per logged step: the loss curve),
* ``evaluation.json`` (optional: ``scripts/evaluate.py --update_card`` rows, e.g. several memory lengths).

The text comes from the template ``model_card.md`` at the project root, rendered with Jinja2 through
``huggingface_hub.ModelCard.from_template`` (which writes the YAML metadata, ``model-index`` included). The loss
curve is a PNG drawn here with zlib (no plotting dependency).
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

#: The card template (top level of the project).
TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "model_card.md"
LOSS_CURVE = "loss_curve.png"
EVALUATION_FILE = "evaluation.json"
BUNDLED_DATASET = ("karpathy/tiny_shakespeare", "Tiny Shakespeare")


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
        write_loss_curve_png(model_dir / LOSS_CURVE, curve["train"], curve["eval"])
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
    return {
        "model_name": repo_id.split("/")[-1] if repo_id else model_dir.resolve().name,
        "repo_ref": repo_id or "path/to/model_dir",
        "repo_id": repo_id,
        "num_parameters": count_parameters(model_dir),
        "config": config,
        "config_json": json.dumps(config, indent=2, sort_keys=True),
        "args": args,
        "tokenizer_kind": "byte" if args.get("tokenizer") == "byte" else "character",
        "dataset": describe_dataset(args),
        "results": results,
        "evaluation": evaluation,
        "loss_curve": None,
    }


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
            f"model card template not found at {template}; it ships at the top of the hf_txl source tree "
            "(model_card.md). Run from a source checkout or pass template_path."
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
    entries = []
    results = facts["results"]
    if results:
        setting = f"eval tgt_len={results.get('eval_tgt_len')}, mem_len={results.get('eval_mem_len')}"
        for metric, label in (("bpc", "Bits per character"), ("perplexity", "Perplexity"), ("loss", "Loss")):
            entries.append(EvalResult(**common, metric_type=metric, metric_value=round(results[metric], 4),
                                      metric_name=f"{label} ({setting})"))  # fmt: skip
    for row in (facts["evaluation"] or {}).get("rows", []):
        setting = f"eval tgt_len={row['tgt_len']}, mem_len={row['mem_len']}, clamp_len={row['clamp_len']}"
        setting += ", same_length" if row.get("same_length") else ""
        entries.append(EvalResult(**common, metric_type="bpc", metric_value=round(row["bpc"], 4),
                                  metric_name=f"Bits per character ({setting})"))  # fmt: skip
    return entries


# ----------------------------------------------------------------------------------------------------
# The loss curve as a PNG (no plotting library)
# ----------------------------------------------------------------------------------------------------

_WHITE, _GRID, _AXIS = (255, 255, 255), (225, 225, 225), (60, 60, 60)
_TRAIN, _EVAL = (31, 119, 180), (255, 127, 14)


def write_loss_curve_png(
    path: str | os.PathLike,
    train: list[tuple[float, float]],
    evals: list[tuple[float, float]] = (),
    *,
    width: int = 640,
    height: int = 360,
) -> None:
    """Training loss (blue line) and evaluation loss (orange squares) against the step, on a light grid.

    The axes are linear; x spans the first to the last step, y the lowest to the highest loss (the card's
    caption states both ranges in numbers, since the image carries no text).
    """
    if not train:
        raise ValueError("no training-loss points to plot (log.jsonl has no 'loss' records)")
    points = list(train) + list(evals)
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)
    left, right, top, bottom = 40, width - 20, 20, height - 30
    pixels = bytearray(bytes(_WHITE) * (width * height))

    def put(x: int, y: int, colour: tuple[int, int, int]) -> None:
        if 0 <= x < width and 0 <= y < height:
            i = 3 * (y * width + x)
            pixels[i : i + 3] = bytes(colour)

    def to_px(step: float, loss: float) -> tuple[int, int]:
        return (round(left + (step - x0) / (x1 - x0) * (right - left)),
                round(bottom - (loss - y0) / (y1 - y0) * (bottom - top)))  # fmt: skip

    for k in range(5):  # grid: quarters of each axis
        gx = left + k * (right - left) // 4
        gy = top + k * (bottom - top) // 4
        for y in range(top, bottom + 1):
            put(gx, y, _GRID)
        for x in range(left, right + 1):
            put(x, gy, _GRID)
    for x in range(left - 4, right + 1):
        put(x, bottom + 1, _AXIS)
    for y in range(top, bottom + 5):
        put(left - 1, y, _AXIS)
    pixel_points = [to_px(*p) for p in train]
    for (ax, ay), (bx, by) in zip(pixel_points, pixel_points[1:] or pixel_points):
        for x, y in _line(ax, ay, bx, by):
            for dx, dy in ((0, 0), (1, 0), (0, 1)):
                put(x + dx, y + dy, _TRAIN)
    for step, loss in evals:
        cx, cy = to_px(step, loss)
        for dx in range(-3, 4):
            for dy in range(-3, 4):
                put(cx + dx, cy + dy, _EVAL)
    Path(path).write_bytes(_png(width, height, pixels))


def _line(ax: int, ay: int, bx: int, by: int):
    """Bresenham's line from (ax, ay) to (bx, by), both ends included."""
    dx, dy = abs(bx - ax), -abs(by - ay)
    sx, sy = (1 if ax < bx else -1), (1 if ay < by else -1)
    err = dx + dy
    while True:
        yield ax, ay
        if ax == bx and ay == by:
            return
        e2 = 2 * err
        if e2 >= dy:
            err, ax = err + dy, ax + sx
        if e2 <= dx:
            err, ay = err + dx, ay + sy


def _png(width: int, height: int, rgb: bytes | bytearray) -> bytes:
    """An 8-bit RGB PNG (filter 0 on every row)."""
    stride = 3 * width
    raw = b"".join(b"\x00" + bytes(rgb[y * stride : (y + 1) * stride]) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
