"""Running the Python examples of a page of docs/ (its ```python blocks)."""

from __future__ import annotations

import pathlib
import re

import torch

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def run_doc_examples(page: str) -> None:
    """Execute every ```python block of docs/<page>, in order, each in a
    fresh namespace after torch.manual_seed(0); their assertions must hold.
    Fails if the page has none."""
    text = (DOCS / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"docs/{page} has no python example"
    for code in blocks:
        torch.manual_seed(0)
        exec(compile(code, f"docs/{page}", "exec"), {})
