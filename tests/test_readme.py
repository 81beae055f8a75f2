"""Every ```python block of README.md runs as written.

The blocks run in order in one namespace, as a reader following the page would run them (a later block may
use ``lm`` or ``input_ids`` from an earlier one), inside a temporary working folder. Model loading is
redirected to a tiny random Llama with a byte-level tokenizer: ``depthkv.models.load_model`` and the
``transformers`` ``from_pretrained`` entry points return it, so no snippet downloads anything.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.test_cli import tiny_lm

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in FENCE.finditer(text)]


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_blocks_are_found():
    assert len(BLOCKS) >= 2
    assert python_blocks("text\n```python\nx = 1\n```\n```bash\nls\n```\n") == [(2, "x = 1\n")]


class Reader:
    """Runs the README's blocks in order, each at most once, in one shared namespace."""

    def __init__(self):
        self.namespace: dict = {"__name__": "readme"}
        self.done = 0

    def run_through(self, index: int) -> None:
        while self.done <= index:
            line, code = BLOCKS[self.done]
            self.done += 1  # a failing block is not retried by the next test
            exec(compile(code, f"README.md:{line}", "exec"), self.namespace)


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import depthkv.models
    import depthkv.models.loader

    lm = tiny_lm()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest

    def load_model(name, *args, **kwargs):
        return lm

    with pytest.MonkeyPatch.context() as mp:
        for module in (depthkv.models, depthkv.models.loader):
            mp.setattr(module, "load_model", load_model)
        mp.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(lambda cls, *a, **k: lm.model))
        mp.setattr(AutoTokenizer, "from_pretrained", classmethod(lambda cls, *a, **k: lm.tokenizer))
        mp.chdir(tmp_path_factory.mktemp("readme"))
        yield Reader()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"line{line}" for line, _ in BLOCKS])
def test_readme_block_runs(reader, index, capsys):
    reader.run_through(index)
    capsys.readouterr()
