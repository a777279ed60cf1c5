"""Side-by-side sample grids: per prompt, the reference and every scheme, one PNG per model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def sample_grid(columns: Mapping[str, Sequence[np.ndarray]], prompts: Sequence[str], path: str | Path,
                cell: int = 256) -> Path:
    """Write a grid: one row per prompt, one labelled column per image set (reference first)."""
    from PIL import Image, ImageDraw

    names = list(columns)
    rows = min(len(v) for v in columns.values())
    label_h, pad = 18, 4
    width = len(names) * (cell + pad) + pad
    height = label_h + rows * (cell + pad + label_h) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(names):
        draw.text((pad + c * (cell + pad), 3), name, fill="black")
    for r in range(rows):
        top = label_h + r * (cell + pad + label_h)
        draw.text((pad, top + 2), prompts[r][: width // 7], fill="#444444")
        for c, name in enumerate(names):
            pixels = np.clip(np.rint(np.asarray(columns[name][r]) * 255.0), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels, "RGB").resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(image, (pad + c * (cell + pad), top + label_h))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    import io

    from quantgate.atomic import atomic_write_bytes

    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=True)
    return atomic_write_bytes(path, buffer.getvalue())
