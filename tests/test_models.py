"""The dual encoder: shapes, tokenizer pairing, and a clear, immediate error when weights are not cached."""

import socket

import pytest
import torch

from clipstudy.core.models import SmallResNet, WeightsUnavailable, build_model


def forbid_network(monkeypatch):
    """Missing weights must fail "at once": from the local caches only, with no download attempted (which would
    hang or retry on a compute node without internet). Any connection attempt fails the test."""
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail(f"network access: {a[1:]}"))


def test_demo_encoder_shapes_and_tokenizer(demo_data_dir):
    model, tokenizer = build_model(
        image_encoder="small_resnet",
        text_encoder="small_distilbert",
        embed_dim=16,
        tokenizer_path=str(demo_data_dir / "tokenizer"),
        pretrained=False,
        small_resnet_widths=(8, 16),
        small_resnet_blocks=(1, 1),
        text_dim=32,
        text_layers=1,
    )
    tokens = tokenizer(
        ["a small red circle", "a big blue square in the top left"],
        padding="max_length",
        truncation=True,
        max_length=12,
        return_tensors="pt",
    )
    text = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    image = model.encode_image(torch.randn(2, 3, 32, 32))
    assert text.shape == image.shape == (2, 16)
    # [CLS] pooling: padding beyond the mask does not change the feature
    longer = tokenizer(
        ["a small red circle"], padding="max_length", truncation=True, max_length=20, return_tensors="pt"
    )
    model.eval()
    with torch.no_grad():
        a = model.encode_text(tokens["input_ids"][:1], tokens["attention_mask"][:1])
        b = model.encode_text(longer["input_ids"], longer["attention_mask"])
    assert torch.allclose(a, b, atol=1e-5)


def test_group_norm_variant_normalises_each_image_alone():
    """What the group-norm variant is for (N processes x B/N equal 1 x B): in training mode an image's
    features do not depend on the other images of its batch; with batch norm they do."""
    torch.manual_seed(0)
    images = torch.randn(4, 3, 16, 16)
    for norm, independent in (("group", True), ("batch", False)):
        m = SmallResNet((8, 16), (1, 1), norm=norm).train()
        norms = [x for x in m.modules() if isinstance(x, (torch.nn.BatchNorm2d, torch.nn.GroupNorm))]
        assert len(norms) == 6 and {type(x) for x in norms} == {
            torch.nn.GroupNorm if independent else torch.nn.BatchNorm2d
        }
        with torch.no_grad():
            whole, halves = m(images), torch.cat([m(images[:2]), m(images[2:])])
        assert torch.allclose(whole, halves, atol=1e-5) == independent, norm
    with pytest.raises(ValueError, match="norm"):
        SmallResNet(norm="layer")


def test_paper_weights_missing_fail_at_once_with_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("CLIPSTUDY_RESNET50_WEIGHTS", raising=False)
    monkeypatch.delenv("CLIPSTUDY_DISTILBERT", raising=False)
    forbid_network(monkeypatch)
    with pytest.raises(WeightsUnavailable) as err:
        build_model()
    assert "fetch-weights" in str(err.value) and "CLIPSTUDY_RESNET50_WEIGHTS" in str(err.value)
    monkeypatch.setenv("CLIPSTUDY_RESNET50_WEIGHTS", str(tmp_path / "missing.pth"))
    with pytest.raises(WeightsUnavailable, match="missing.pth"):
        build_model()


def test_resnet50_loads_local_weights(tmp_path, monkeypatch):
    """The paper image tower reads a local state dict (here a random one saved to disk)."""
    from torchvision.models import resnet50

    from clipstudy.core.models import resnet50_trunk

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


def _empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CLIPSTUDY_RESNET50_WEIGHTS", raising=False)
    import huggingface_hub.constants  # reads HF_HUB_CACHE at import, before this test set it

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


def _timm_reference():
    import timm

    torch.manual_seed(0)
    reference = timm.create_model("resnet50", pretrained=False)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    reference.reset_classifier(0)
    return reference.eval(), state


def test_timm_weights_missing_fail_at_once_naming_them(tmp_path, monkeypatch):
    _empty_caches(tmp_path, monkeypatch)
    forbid_network(monkeypatch)
    with pytest.raises(WeightsUnavailable) as err:
        build_model(image_weights="timm-a1")
    message = str(err.value)
    assert "resnet50.a1_in1k" in message and "fetch-weights" in message and "CLIPSTUDY_RESNET50_WEIGHTS" in message


def test_timm_resnet50_loads_a_local_state_dict(tmp_path, monkeypatch):
    from clipstudy.core.models import resnet50_trunk

    _empty_caches(tmp_path, monkeypatch)
    reference, state = _timm_reference()
    torch.save(state, tmp_path / "r50-timm.pth")
    monkeypatch.setenv("CLIPSTUDY_RESNET50_WEIGHTS", str(tmp_path / "r50-timm.pth"))
    trunk = resnet50_trunk(pretrained=True, weights="timm-a1").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(trunk(x), reference(x))
    assert trunk(x).shape == (2, 2048) and trunk.out_dim == 2048


def test_timm_resnet50_loads_from_the_hugging_face_cache_layout(tmp_path, monkeypatch):
    """What `fetch-weights` leaves: HF_HUB_CACHE/models--timm--resnet50.a1_in1k/snapshots/<rev>/model.safetensors."""
    from safetensors.torch import save_file

    from clipstudy.core.models import resnet50_cache_path, resnet50_trunk

    _empty_caches(tmp_path, monkeypatch)
    assert resnet50_cache_path("timm-a1") is None
    reference, state = _timm_reference()
    repo = tmp_path / "hf" / "hub" / "models--timm--resnet50.a1_in1k"
    revision = "0" * 40
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    save_file({k: v.contiguous() for k, v in state.items()}, repo / "snapshots" / revision / "model.safetensors")
    assert resnet50_cache_path("timm-a1") == repo / "snapshots" / revision / "model.safetensors"
    trunk = resnet50_trunk(pretrained=True, weights="timm-a1").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(trunk(x), reference(x))


def test_both_resnet50_backbones_give_2048_d_pooled_features():
    from clipstudy.core.models import resnet50_trunk

    x = torch.randn(2, 3, 64, 64)
    for weights in ("timm-a1", "torchvision"):
        trunk = resnet50_trunk(pretrained=False, weights=weights).eval()
        with torch.no_grad():
            assert trunk(x).shape == (2, 2048)
        assert trunk.out_dim == 2048
    with pytest.raises(ValueError, match="image_weights"):
        resnet50_trunk(pretrained=False, weights="resnet50.a2_in1k")


def test_fetch_weights_fetches_what_the_profile_loads():
    from clipstudy.core.models import weights_needed
    from clipstudy.engine.config import make_config

    assert weights_needed(make_config("paper")) == {"resnet50": "timm-a1", "distilbert": True}
    assert weights_needed(make_config("paper", image_weights="torchvision"))["resnet50"] == "torchvision"
    assert weights_needed(make_config("paper", pretrained=False)) == {"resnet50": None, "distilbert": False}
