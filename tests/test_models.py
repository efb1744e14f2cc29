"""The dual encoder: shapes, tokenizer pairing, and a clear, immediate error when weights are not cached."""
import time

import pytest
import torch

from clipstudy.models import SmallResNet, WeightsUnavailable, build_model


def test_demo_encoder_shapes_and_tokenizer(demo_data_dir):
    model, tokenizer = build_model(image_encoder="small_resnet", text_encoder="small_distilbert",
                                   embed_dim=16, tokenizer_path=str(demo_data_dir / "tokenizer"),
                                   pretrained=False, small_resnet_widths=(8, 16), small_resnet_blocks=(1, 1),
                                   text_dim=32, text_layers=1)
    tokens = tokenizer(["a small red circle", "a big blue square in the top left"], padding="max_length",
                       truncation=True, max_length=12, return_tensors="pt")
    text = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    image = model.encode_image(torch.randn(2, 3, 32, 32))
    assert text.shape == image.shape == (2, 16)
    # [CLS] pooling: padding beyond the mask does not change the feature
    longer = tokenizer(["a small red circle"], padding="max_length", truncation=True, max_length=20,
                       return_tensors="pt")
    model.eval()
    with torch.no_grad():
        a = model.encode_text(tokens["input_ids"][:1], tokens["attention_mask"][:1])
        b = model.encode_text(longer["input_ids"], longer["attention_mask"])
    assert torch.allclose(a, b, atol=1e-5)


def test_group_norm_variant_has_no_batchnorm():
    m = SmallResNet((8, 16), (1, 1), norm="group")
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())
    with pytest.raises(ValueError, match="norm"):
        SmallResNet(norm="layer")


def test_paper_weights_missing_fail_at_once_with_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("CLIPSTUDY_RESNET50_WEIGHTS", raising=False)
    monkeypatch.delenv("CLIPSTUDY_DISTILBERT", raising=False)
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailable) as err:
        build_model()
    assert time.perf_counter() - start < 20
    assert "fetch-weights" in str(err.value) and "CLIPSTUDY_RESNET50_WEIGHTS" in str(err.value)
    monkeypatch.setenv("CLIPSTUDY_RESNET50_WEIGHTS", str(tmp_path / "missing.pth"))
    with pytest.raises(WeightsUnavailable, match="missing.pth"):
        build_model()


def test_resnet50_loads_local_weights(tmp_path, monkeypatch):
    """The paper image tower reads a local state dict (here a random one saved to disk)."""
    from torchvision.models import resnet50
    from clipstudy.models import resnet50_trunk

    reference = resnet50(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r50.pth")
    monkeypatch.setenv("CLIPSTUDY_RESNET50_WEIGHTS", str(tmp_path / "r50.pth"))
    trunk = resnet50_trunk(pretrained=True).eval()
    reference.fc = torch.nn.Identity()
    reference.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(trunk(x), reference(x))
    assert trunk(x).shape == (1, 2048)
