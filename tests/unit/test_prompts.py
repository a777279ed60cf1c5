"""Prompt files: comments skipped, batches cycle, bad files are errors naming them."""

import pytest

from quantgate.errors import ConfigFileError
from quantgate.prompts import PromptSet
from tests.conftest import REPO


def test_the_gate_prompt_set_has_eight_prompts():
    prompts = PromptSet.load(REPO / "fixtures" / "prompts" / "gate.txt")
    assert len(prompts.prompts) == 8 and not any(p.startswith("#") for p in prompts.prompts)


def test_take_cycles_through_the_prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# comment\nfirst\n\n  second  \n")
    assert PromptSet.load(path).take(5) == ["first", "second", "first", "second", "first"]


def test_an_empty_file_is_an_error(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# only a comment\n\n")
    with pytest.raises(ConfigFileError, match="holds no prompts"):
        PromptSet.load(path)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"fine\nbad \xff byte\n")
    with pytest.raises(ConfigFileError, match=r"p.txt:2: not valid UTF-8"):
        PromptSet.load(path)


def test_the_visual_inspection_set_has_fifty_prompts():
    prompts = PromptSet.load(REPO / "fixtures" / "prompts" / "inspect.txt")
    assert len(prompts.prompts) == 50 and len(set(prompts.prompts)) == 50
