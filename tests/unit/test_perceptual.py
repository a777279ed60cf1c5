"""LPIPS and CLIP score: local-weights resolution, exact skip reasons, and the CLIP plumbing.

The plumbing test scores images with a tiny CLIP made here with random weights. That checks
how quantgate loads a local checkpoint and calls torchmetrics; its numbers mean nothing and
are never reported as a CLIP score (the suite only scores with a resolved real checkpoint).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from quantgate.quality import perceptual


def test_lpips_names_the_exact_checkpoint_to_provide(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert perceptual.lpips_checkpoint("alex") == expected
    problem = perceptual.lpips_problem("alex")
    assert problem is not None
    if importlib.util.find_spec("torchvision") is None:
        assert "torchvision" in problem
    else:
        assert str(expected) in problem and "never downloads" in problem


def test_lpips_rejects_an_unknown_backbone():
    with pytest.raises(ValueError, match="unknown LPIPS backbone 'resnet'"):
        perceptual.lpips_checkpoint("resnet")


def test_clip_names_the_missing_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    problem = perceptual.clip_problem("openai/clip-vit-base-patch32")
    assert "openai/clip-vit-base-patch32" in problem and "not in the Hugging Face cache" in problem
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    problem = perceptual.clip_problem(str(partial))
    assert "lacks" in problem and "model.safetensors or pytorch_model.bin" in problem and "vocab.json" in problem


def _tiny_clip(directory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from quantgate.models.tokenizers import build_clip_bpe

    torch.manual_seed(0)
    build_clip_bpe(directory, vocab_size=1000, model_max_length=77)
    config = CLIPConfig(text_config={"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64,
                                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77,
                                     "eos_token_id": 999},
                        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                        projection_dim=16)
    CLIPModel(config).save_pretrained(directory)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=CLIPTokenizer.from_pretrained(directory))
    processor.save_pretrained(directory)


def test_clip_plumbing_on_a_tiny_local_checkpoint(tmp_path):
    _tiny_clip(tmp_path)
    assert perceptual.clip_problem(str(tmp_path)) is None
    scorer = perceptual.ClipScorer(str(tmp_path))
    rng = np.random.default_rng(0)
    images = rng.random((2, 48, 48, 3))
    prompts = ["a red fox in the snow", "a lighthouse in a storm"]
    values = scorer.cosines(images, prompts)
    assert len(values) == 2 and all(-1.0 <= v <= 1.0 for v in values)
    assert scorer.cosines(images[:1], prompts[:1])[0] == pytest.approx(values[0], abs=1e-6)
    assert scorer.mean(images, prompts) == pytest.approx(sum(values) / 2)
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        scorer.cosines(images, prompts[:1])
