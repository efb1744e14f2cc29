"""Tests of clipstudy.engine.evaluate against brute-force references and hand-worked cases."""

from __future__ import annotations

import importlib.util
import itertools
import math
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipstudy.core.metrics import retrieval_ranks
from clipstudy.engine.evaluate import (
    chance_levels,
    evaluate_all,
    evaluate_retrieval,
    evaluate_zeroshot,
    extract_image_features,
    extract_text_features,
    retrieval_metrics,
    zeroshot_classifier,
    zeroshot_metrics,
)

RECALL_KEYS = ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"]


def _load_original_eval():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "original_eval.py"
    spec = importlib.util.spec_from_file_location("original_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------
# Brute-force reference: explicit loops, one sort per query
# --------------------------------------------------------------------------


def brute_force_metrics(sim: torch.Tensor, txt2img) -> dict[str, float]:
    """Ranks by sorting each query's candidates, wrong ones first at equal score."""
    scores = sim.float().tolist()
    txt2img = [int(i) for i in txt2img]
    n_images, n_texts = len(scores), len(scores[0])
    text_ranks = []
    for i in range(n_images):
        correct = {t for t in range(n_texts) if txt2img[t] == i}
        if not correct:
            continue
        order = sorted(range(n_texts), key=lambda t: (-scores[i][t], t in correct))
        text_ranks.append(1 + next(pos for pos, t in enumerate(order) if t in correct))
    image_ranks = []
    for t in range(n_texts):
        order = sorted(range(n_images), key=lambda i: (-scores[i][t], i == txt2img[t]))
        image_ranks.append(1 + order.index(txt2img[t]))
    out = {}
    for prefix, ranks in (("txt", text_ranks), ("img", image_ranks)):
        for k in (1, 5, 10):
            out[f"{prefix}_r{k}"] = 100.0 * sum(r <= k for r in ranks) / len(ranks)
        out[f"{prefix}_r_mean"] = sum(ranks) / len(ranks)
        out[f"{prefix}_r_median"] = float(statistics.median(ranks))
    out["r_mean"] = sum(out[k] for k in RECALL_KEYS) / 6
    return out


def assert_metrics_equal(got: dict, expected: dict):
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def correlated_similarity(txt2img, n_images, generator, signal=1.5):
    """Random scores with a bonus on correct pairs, so recalls are neither 0 nor 100."""
    txt2img = torch.as_tensor(txt2img)
    sim = torch.randn(n_images, len(txt2img), generator=generator)
    sim[txt2img, torch.arange(len(txt2img))] += signal
    return sim


# --------------------------------------------------------------------------
# retrieval_metrics
# --------------------------------------------------------------------------


def test_worked_example_counts_ties_against_the_model():
    # 2 images, 3 texts; texts 0 and 1 describe image 0, text 2 describes image 1.
    sim = torch.tensor([[0.5, 0.2, 0.5], [0.1, 0.3, 0.3]])
    # Image -> text. Image 0: best correct score 0.5 (text 0); wrong text 2 also
    # scores 0.5 >= 0.5, so rank 2. Image 1: correct text 2 scores 0.3; wrong
    # text 1 scores 0.3 >= 0.3, text 0 scores 0.1, so rank 2.
    # Text -> image. Text 0: image 0 scores 0.5, image 1 0.1 -> rank 1. Text 1:
    # image 0 scores 0.2, image 1 0.3 -> rank 2. Text 2: image 1 scores 0.3,
    # image 0 0.5 -> rank 2.
    got = retrieval_metrics(sim, [0, 0, 1])
    assert got["txt_r1"] == 0.0 and got["txt_r5"] == 100.0
    assert got["txt_r_mean"] == 2.0 and got["txt_r_median"] == 2.0
    assert got["img_r1"] == pytest.approx(100 / 3)
    assert got["img_r5"] == 100.0 and got["img_r10"] == 100.0
    assert got["img_r_mean"] == pytest.approx(5 / 3) and got["img_r_median"] == 2.0
    assert got["r_mean"] == pytest.approx((0 + 100 + 100 + 100 / 3 + 100 + 100) / 6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_with_five_captions_each(seed):
    g = torch.Generator().manual_seed(seed)
    txt2img = torch.arange(7).repeat_interleave(5)
    sim = correlated_similarity(txt2img, 7, g, signal=0.8)
    assert_metrics_equal(retrieval_metrics(sim, txt2img), brute_force_metrics(sim, txt2img))


def test_matches_brute_force_with_uneven_captions_and_an_uncaptioned_image():
    g = torch.Generator().manual_seed(3)
    counts = [1, 3, 0, 2, 5, 1, 4, 2, 1, 3, 2, 1]  # image 2 has no caption: left out of TR
    txt2img = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    txt2img = txt2img[torch.randperm(len(txt2img), generator=g)]  # captions in any order
    sim = correlated_similarity(txt2img, len(counts), g)
    got = retrieval_metrics(sim, txt2img.tolist())
    assert_metrics_equal(got, brute_force_metrics(sim, txt2img))


@pytest.mark.parametrize("levels", [2, 3, 5])
def test_matches_brute_force_under_heavy_ties(levels):
    g = torch.Generator().manual_seed(levels)
    txt2img = torch.randint(0, 9, (31,), generator=g)
    sim = torch.randint(0, levels, (9, 31), generator=g).float() / levels
    assert_metrics_equal(retrieval_metrics(sim, txt2img), brute_force_metrics(sim, txt2img))


def test_constant_scores_give_worst_ranks():
    txt2img = torch.arange(4).repeat_interleave(3)
    got = retrieval_metrics(torch.zeros(4, 12), txt2img)
    # Every wrong candidate ties with the correct one: TR rank 1 + 9, IR rank 1 + 3.
    assert got["txt_r_mean"] == 10.0 and got["img_r_mean"] == 4.0
    assert got["txt_r1"] == 0.0 and got["img_r1"] == 0.0 and got["img_r5"] == 100.0


def test_nan_scores_count_against_the_model():
    # A NaN correct score ranks last; a NaN wrong score outranks the correct one.
    got = retrieval_metrics(torch.tensor([[float("nan"), 0.1], [0.2, 0.3]]), [0, 1])
    # TR: image 0 -> rank 2, image 1 -> rank 1. IR: text 0 -> rank 2, text 1 -> rank 1.
    assert got["txt_r1"] == 50.0 and got["img_r1"] == 50.0
    got = retrieval_metrics(torch.tensor([[0.9, float("nan")], [0.2, 0.3]]), [0, 1])
    # TR: image 0 has wrong NaN -> rank 2; image 1 rank 1. IR: text 1 has wrong NaN -> rank 2.
    assert got["txt_r_mean"] == 1.5 and got["img_r_mean"] == 1.5


def test_agrees_with_the_original_argsort_loop_on_tie_free_scores():
    original = _load_original_eval()
    g = torch.Generator().manual_seed(4)
    n_images = 40
    txt2img = torch.arange(n_images).repeat_interleave(5)
    sim = correlated_similarity(txt2img, n_images, g, signal=2.0).double()
    assert sim.flatten().unique().numel() == sim.numel()  # no ties
    img2txt = [(txt2img == i).nonzero().flatten().tolist() for i in range(n_images)]
    expected = original.itm_eval(sim.numpy(), sim.numpy().T, txt2img.numpy(), img2txt)
    got = retrieval_metrics(sim, txt2img)
    assert 0 < got["txt_r1"] < 100 and 0 < got["img_r1"] < 100
    for key in RECALL_KEYS + ["r_mean"]:
        assert got[key] == pytest.approx(expected[key]), key


@pytest.mark.parametrize("chunk_size", [1, 3, 7])
def test_chunking_does_not_change_results(chunk_size):
    g = torch.Generator().manual_seed(5)
    txt2img = torch.randint(0, 23, (57,), generator=g)
    sim = torch.randint(0, 6, (23, 57), generator=g).float()
    assert retrieval_metrics(sim, txt2img, chunk_size=chunk_size) == retrieval_metrics(sim, txt2img)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_is_compared_exactly(dtype):
    g = torch.Generator().manual_seed(6)
    txt2img = torch.arange(8).repeat_interleave(3)
    sim = correlated_similarity(txt2img, 8, g).to(dtype)
    assert_metrics_equal(retrieval_metrics(sim, txt2img), brute_force_metrics(sim.float(), txt2img))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(7)
    txt2img = torch.arange(50).repeat_interleave(5)
    sim = correlated_similarity(txt2img, 50, g)
    assert retrieval_metrics(sim.cuda(), txt2img.cuda()) == retrieval_metrics(sim, txt2img)


@pytest.mark.parametrize(
    "sim, txt2img, match",
    [
        (torch.zeros(3), [0, 1, 2], "2-D"),
        (torch.zeros(2, 3), [0, 1], "one entry per text"),
        (torch.zeros(2, 3), [0, 1, 2], r"\[0, 2\)"),
        (torch.zeros(2, 3), [0, -1, 1], r"\[0, 2\)"),
        (torch.zeros(2, 3), [0.0, 1.0, 1.0], "integer"),
        (torch.zeros(2, 3, dtype=torch.long), [0, 1, 1], "floating point"),
    ],
)
def test_invalid_inputs_raise_clear_errors(sim, txt2img, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(sim, txt2img)


@pytest.mark.parametrize(
    "sim, txt2img, message",
    [
        (torch.zeros(0, 3), [], r"^similarity must have at least one image and one text, got shape \(0, 3\)$"),
        (torch.zeros(2, 0), [], r"^similarity must have at least one image and one text, got shape \(2, 0\)$"),
        (torch.zeros(2, 3), [0.0, 1.0, 1.0], "^txt2img must hold integer indices, got dtype torch.float32"),
        (torch.zeros(2, 3), [True, False, True], "^txt2img must hold integer indices, got dtype torch.bool"),
    ],
)
def test_invalid_inputs_are_named_exactly(sim, txt2img, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(sim, txt2img)


@pytest.mark.parametrize("chunk_size", [0, -2])
def test_a_chunk_size_below_one_row_is_refused_by_every_metric(chunk_size):
    message = f"^chunk_size must be a positive number of rows, got {chunk_size}$"
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(torch.zeros(2, 2), [0, 1], chunk_size=chunk_size)
    with pytest.raises(ValueError, match=message):
        zeroshot_metrics(torch.eye(2), [0, 1], torch.eye(2), chunk_size=chunk_size)


def test_one_image_or_one_text_is_a_valid_retrieval_set():
    # One image with three captions: every query has a single candidate of its kind, rank 1.
    got = retrieval_metrics(torch.tensor([[0.3, -0.2, 0.1]]), [0, 0, 0])
    assert got["txt_r_mean"] == 1.0 and got["img_r_mean"] == 1.0 and got["r_mean"] == 100.0
    # One text describing image 1 of 2: image 0 has no caption and is left out of text retrieval.
    got = retrieval_metrics(torch.tensor([[0.2], [0.5]]), [1])
    assert got["txt_r1"] == 100.0 and got["img_r1"] == 100.0
    got = retrieval_metrics(torch.tensor([[0.7], [0.5]]), [1])
    assert got["txt_r1"] == 100.0 and got["img_r1"] == 0.0 and got["img_r_mean"] == 2.0


def test_ranks_are_integers_and_trailing_uncaptioned_images_are_flagged():
    # Images 2 and 3 have no caption: has_caption still has one entry per image.
    sim = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.0, 0.0]])
    text_ranks, image_ranks, has_caption = retrieval_ranks(sim, [0, 1])
    assert has_caption.tolist() == [True, True, False, False]
    assert text_ranks.dtype == torch.long and image_ranks.dtype == torch.long
    assert text_ranks[:2].tolist() == [1, 1] and image_ranks.tolist() == [1, 1]


def test_a_nan_correct_score_ranks_behind_negative_wrong_scores():
    # Image 0's only caption scores NaN: the wrong caption at -0.5 outranks it (rank 2), as it
    # would any finite score; a NaN read as 0 would put -0.5 below it and give rank 1.
    text_ranks, image_ranks, _ = retrieval_ranks(torch.tensor([[float("nan"), -0.5], [-0.9, -0.3]]), [0, 1])
    assert text_ranks.tolist() == [2, 1]
    assert image_ranks.tolist() == [2, 1]


def test_default_chunking_of_a_matrix_larger_than_one_chunk_matches_one_pass():
    # 1100 x 1000 scores exceed the CPU budget of 2^19 elements, so the default splits the rows.
    g = torch.Generator().manual_seed(8)
    txt2img = torch.randint(0, 1100, (1000,), generator=g)
    sim = torch.randint(0, 50, (1100, 1000), generator=g).float()
    assert retrieval_metrics(sim, txt2img) == retrieval_metrics(sim, txt2img, chunk_size=1100)


# --------------------------------------------------------------------------
# chance_levels
# --------------------------------------------------------------------------


def test_chance_levels_by_hand():
    # Image 0 has 3 of 4 texts, image 1 has 1, image 2 none (excluded from TR).
    got = chance_levels([0, 0, 0, 1], n_images=3, n_classes=1000)
    assert got["txt_r1"] == pytest.approx(100 * (3 / 4 + 1 / 4) / 2)
    assert got["txt_r5"] == 100.0  # K >= number of texts
    assert got["img_r1"] == pytest.approx(100 / 3) and got["img_r5"] == 100.0
    assert got["zeroshot_top1"] == pytest.approx(0.1) and got["zeroshot_top5"] == pytest.approx(0.5)
    assert "zeroshot_top1" not in chance_levels([0, 1], n_images=2)


def test_chance_levels_hypergeometric_by_hand():
    # 12 texts: image 0 has 2, image 1 has 1, image 2 has 9.
    # R@5: 1 - C(10,5)/C(12,5) = 1 - 252/792 = 15/22; 5/12; 1 (only 3 wrong texts).
    got = chance_levels([0, 0, 1] + [2] * 9, n_images=3)
    assert got["txt_r5"] == pytest.approx(100 * (15 / 22 + 5 / 12 + 1) / 3)
    assert got["txt_r1"] == pytest.approx(100 * (2 / 12 + 1 / 12 + 9 / 12) / 3)


def test_chance_levels_match_enumeration_of_all_top_k_sets():
    txt2img = [0, 0, 1, 1, 1, 2, 3, 3, 3, 3, 4, 4, 5]
    n_texts, images = len(txt2img), sorted(set(txt2img))
    got = chance_levels(txt2img, n_images=7)
    for k in (1, 5, 10):
        subsets = list(itertools.combinations(range(n_texts), k))
        hit = [sum(any(txt2img[t] == i for t in s) for s in subsets) / len(subsets) for i in images]
        assert got[f"txt_r{k}"] == pytest.approx(100 * sum(hit) / len(images))
        assert got[f"img_r{k}"] == pytest.approx(100 * min(k, 7) / 7)


def test_chance_levels_at_the_smallest_valid_sizes():
    # one image with one caption, one class: everything is a hit
    got = chance_levels([0], n_images=1, n_classes=1)
    assert all(value == 100.0 for value in got.values()) and len(got) == 8
    # texts all on the last image; image 0 has none and is left out of TR (bincount up to n_images)
    assert chance_levels([1, 1], n_images=2)["txt_r1"] == 100.0


@pytest.mark.parametrize(
    "args, message",
    [
        (([0], 0), "n_images must be >= 1, got 0"),
        (([], 3), "txt2img is empty; chance levels need at least one text"),
        (([0, 3], 3), r"txt2img values must lie in \[0, 3\), got range \[0, 3\]"),
        (([-1, 0], 3), r"txt2img values must lie in \[0, 3\), got range \[-1, 0\]"),
        (([0.0, 1.0], 3), "txt2img must hold integer indices, got dtype torch.float32"),
        (([0], 1, 0), r"n_classes must be >= 1 \(or None\), got 0"),
    ],
)
def test_chance_levels_reject_impossible_inputs_naming_them(args, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        chance_levels(*args)


@pytest.mark.parametrize(
    "features, labels, classifier, message",
    [
        (torch.zeros(2, 3), [0, 1], torch.zeros(4, 2), r"must agree on D; got \(2, 3\) and \(4, 2\)"),
        (torch.zeros(2, 3, 1), [0, 1], torch.zeros(3, 2), "must agree on D"),
        (torch.zeros(2, 3), [0, 1], torch.zeros(3), "must agree on D"),
        (torch.zeros(0, 3), [], torch.zeros(3, 2), "^image_features is empty$"),
        (torch.zeros(2, 3), [0], torch.zeros(3, 2), "labels has 1 entries for 2 images"),
        (
            torch.zeros(2, 3),
            [0.0, 1.0],
            torch.zeros(3, 2),
            "^labels must hold integer indices, got dtype torch.float32",
        ),
        (torch.zeros(2, 3), [0, 2], torch.zeros(3, 2), r"labels must lie in \[0, 2\) .* got range \[0, 2\]"),
    ],
)
def test_zeroshot_metrics_reject_mismatched_inputs_naming_them(features, labels, classifier, message):
    with pytest.raises(ValueError, match=message):
        zeroshot_metrics(features, labels, classifier)


# --------------------------------------------------------------------------
# Fakes: a dual encoder with known embeddings and a word-level tokenizer
# --------------------------------------------------------------------------


class FakeTokenizer:
    """Whitespace word-level tokenizer; id 0 is padding."""

    def __init__(self, words):
        self.vocab = {w: i + 1 for i, w in enumerate(words)}

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        assert padding == "max_length" and truncation and return_tensors == "pt"
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [self.vocab[w] for w in text.split()][:max_length]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}


class FakeDualEncoder(nn.Module):
    """Text = sum of word vectors; image = its first D pixel values. Dropout makes train mode visible."""

    def __init__(self, word_vectors: torch.Tensor):
        super().__init__()
        self.dim = word_vectors.shape[1]
        self.words = nn.Embedding.from_pretrained(torch.cat([torch.zeros(1, self.dim), word_vectors]))
        self.dropout = nn.Dropout(0.5)
        self.modes_seen: list[bool] = []
        self.text_calls = 0

    def encode_image(self, images):
        self.modes_seen.append(self.training)
        return self.dropout(images.flatten(1)[:, : self.dim])

    def encode_text(self, input_ids, attention_mask):
        self.modes_seen.append(self.training)
        self.text_calls += 1
        return self.dropout((self.words(input_ids) * attention_mask[..., None]).sum(dim=1))


def image_from_vector(vector: torch.Tensor) -> torch.Tensor:
    image = torch.zeros(3, 4, 4)
    image.view(-1)[: len(vector)] = vector
    return image


class FakeImageSet:
    """dataset[i] -> (image, ids[i]), or None for indices in `unreadable`."""

    def __init__(self, vectors, ids, unreadable=()):
        self.vectors, self.ids, self.unreadable = vectors, list(ids), set(unreadable)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return None if i in self.unreadable else (image_from_vector(self.vectors[i]), self.ids[i])


# --------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------


def test_extract_image_features_skips_unreadable_items_and_restores_modes():
    g = torch.Generator().manual_seed(8)
    vectors = torch.randn(6, 4, generator=g)
    model = FakeDualEncoder(torch.randn(3, 4, generator=g))
    model.train()
    model.dropout.eval()  # a submodule in its own mode must get it back
    dataset = FakeImageSet(vectors, range(6), unreadable={2, 3, 5})  # batch [2, 3] is all unreadable
    features, ids = extract_image_features(model, dataset, batch_size=2, progress=False)
    assert ids.tolist() == [0, 1, 4]
    torch.testing.assert_close(features, F.normalize(vectors[[0, 1, 4]], dim=-1))
    assert model.modes_seen and not any(model.modes_seen)
    assert model.training and not model.dropout.training and model.words.training


def test_extract_image_features_fails_clearly_when_nothing_is_readable():
    model = FakeDualEncoder(torch.eye(4))
    with pytest.raises(ValueError, match="no readable image"):
        extract_image_features(model, FakeImageSet(torch.eye(4), range(2), unreadable={0, 1}), progress=False)


def test_extract_text_features_in_batches_restores_training_mode():
    word_vectors = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0]])
    model = FakeDualEncoder(word_vectors).train()
    tokenizer = FakeTokenizer(["a", "b", "c"])
    texts = ["a", "a b", "c c", "b c a", "b"]
    got = extract_text_features(model, tokenizer, texts, batch_size=2, amp=True)  # amp: no-op on CPU
    expected = F.normalize(torch.tensor([[1.0, 0, 0], [1, 2, 0], [0, 0, 6], [1, 2, 3], [0, 2, 0]]), dim=-1)
    torch.testing.assert_close(got, expected)
    assert model.text_calls == 3 and not any(model.modes_seen) and model.training and model.dropout.training


# --------------------------------------------------------------------------
# evaluate_retrieval
# --------------------------------------------------------------------------


class FakeRetrievalSet(FakeImageSet):
    def __init__(self, vectors, texts, txt2img, unreadable=()):
        super().__init__(vectors, range(len(vectors)), unreadable)
        self.texts, self.txt2img = texts, txt2img
        self.img2txt = [[t for t, i in enumerate(txt2img) if i == j] for j in range(len(vectors))]


def make_retrieval_case(seed=9, unreadable=(2,), dim=6):
    g = torch.Generator().manual_seed(seed)
    txt2img = [0, 0, 1, 1, 1, 2, 2, 3, 4, 4, 4, 0]
    image_vectors = torch.randn(5, dim, generator=g)
    # Text t is word t, whose vector is its image's vector plus noise: recalls in (0, 100).
    word_vectors = image_vectors[txt2img] + 1.2 * torch.randn(len(txt2img), dim, generator=g)
    model = FakeDualEncoder(word_vectors)
    texts = [f"w{t}" for t in range(len(txt2img))]
    dataset = FakeRetrievalSet(image_vectors, texts, txt2img, unreadable)
    return model, FakeTokenizer(texts), dataset, image_vectors, word_vectors


def test_evaluate_retrieval_drops_unreadable_image_and_its_captions():
    model, tokenizer, dataset, image_vectors, word_vectors = make_retrieval_case()
    got = evaluate_retrieval(model, tokenizer, dataset, batch_size=2, text_batch_size=4, progress=False)
    # Brute force on what remains: images 0, 1, 3, 4 (renumbered 0..3), captions not of image 2.
    kept_images = [0, 1, 3, 4]
    kept_texts = [t for t, i in enumerate(dataset.txt2img) if i != 2]
    remapped = [kept_images.index(dataset.txt2img[t]) for t in kept_texts]
    sim = F.normalize(image_vectors[kept_images], dim=-1) @ F.normalize(word_vectors[kept_texts], dim=-1).T
    assert_metrics_equal(got, brute_force_metrics(sim, remapped))
    assert got["n_images"] == 4 and got["n_texts"] == 10 and got["n_skipped_images"] == 1
    assert 0 < got["img_r1"] < 100


def test_evaluate_retrieval_without_unreadable_images_matches_brute_force():
    model, tokenizer, dataset, image_vectors, word_vectors = make_retrieval_case(seed=10, unreadable=())
    got = evaluate_retrieval(model, tokenizer, dataset, progress=False)
    sim = F.normalize(image_vectors, dim=-1) @ F.normalize(word_vectors, dim=-1).T
    assert_metrics_equal(got, brute_force_metrics(sim, dataset.txt2img))
    assert got["n_skipped_images"] == 0 and got["n_texts"] == 12


def test_evaluate_retrieval_rejects_captions_of_missing_images():
    model, tokenizer, dataset, _, _ = make_retrieval_case()
    dataset.txt2img = dataset.txt2img[:-1] + [5]  # only 5 images
    with pytest.raises(ValueError, match="txt2img"):
        evaluate_retrieval(model, tokenizer, dataset, progress=False)


# --------------------------------------------------------------------------
# Zero-shot
# --------------------------------------------------------------------------

N_CLASSES, DIM = 7, 8
CLASSNAMES = [f"c{i}" for i in range(N_CLASSES)]
TEMPLATES = ["{}", "{} zz"]


def zeroshot_model_and_tokenizer():
    # Class word c_i -> unit vector e_i; template word "zz" -> 3 * e_7.
    word_vectors = torch.cat([torch.eye(DIM)[:N_CLASSES], 3 * torch.eye(DIM)[7:8]])
    return FakeDualEncoder(word_vectors), FakeTokenizer(CLASSNAMES + ["zz"])


def test_classifier_is_normalised_mean_of_normalised_template_embeddings():
    model, tokenizer = zeroshot_model_and_tokenizer()
    classifier = zeroshot_classifier(model, tokenizer, CLASSNAMES, TEMPLATES)
    assert classifier.shape == (DIM, N_CLASSES)
    # By hand for class c: template "{}" -> e_c; "{} zz" -> (e_c + 3 e_7) / sqrt(10).
    # Mean: a e_c + b e_7 with a = (1 + 1/sqrt(10)) / 2, b = 3 / (2 sqrt(10)).
    # Its norm^2 = a^2 + b^2 = (1 + 2/sqrt(10) + 10/10) / 4 = a, so the weight is
    # sqrt(a) e_c + (b / sqrt(a)) e_7 = 0.81124 e_c + 0.58471 e_7.
    a, b = (1 + 1 / math.sqrt(10)) / 2, 3 / (2 * math.sqrt(10))
    expected = torch.zeros(DIM, N_CLASSES)
    expected[:N_CLASSES, :] = math.sqrt(a) * torch.eye(N_CLASSES)
    expected[7, :] = b / math.sqrt(a)
    torch.testing.assert_close(classifier, expected)
    # Averaging unnormalised embeddings would give (e_c + 1.5 e_7)/|.| = 0.5547 e_c + ...: not this.
    assert abs(classifier[0, 0].item() - 1 / math.sqrt(1 + 1.5**2)) > 0.2
    assert model.text_calls == 1  # all 14 prompts in one batch, not one forward per class


def test_classifier_does_not_depend_on_batch_size():
    model, tokenizer = zeroshot_model_and_tokenizer()
    big = zeroshot_classifier(model, tokenizer, CLASSNAMES, TEMPLATES, batch_size=1024)
    small = zeroshot_classifier(model, tokenizer, CLASSNAMES, TEMPLATES, batch_size=3)
    torch.testing.assert_close(big, small)


def test_classifier_rejects_template_without_placeholder():
    model, tokenizer = zeroshot_model_and_tokenizer()
    with pytest.raises(ValueError, match="template"):
        zeroshot_classifier(model, tokenizer, CLASSNAMES, ["a photo"])


def zeroshot_images():
    """10 images; label j % 7. Hand-derived true-class ranks in comments."""
    e = torch.eye(DIM)
    vectors = [e[j % N_CLASSES] for j in range(10)]  # rank 1 unless replaced
    vectors[3] = e[5]  # label 3: class 5 wins, classes 0-4 and 6 tie at 0 -> rank 7
    vectors[4] = e[4] + e[1]  # label 4: tie with class 1 -> rank 2 (pessimistic)
    vectors[5] = 0.9 * e[0] + 0.8 * e[1] + 0.7 * e[2] + 0.6 * e[3] + 0.55 * e[4] + 0.5 * e[5]  # label 5: rank 6
    vectors[6] = 0.9 * e[0] + 0.8 * e[1] + 0.7 * e[2] + 0.6 * e[3] + 0.5 * e[6]  # label 6: rank 5
    labels = [j % N_CLASSES for j in range(10)]
    return torch.stack(vectors), labels


def test_zeroshot_metrics_on_constructed_case():
    model, tokenizer = zeroshot_model_and_tokenizer()
    classifier = zeroshot_classifier(model, tokenizer, CLASSNAMES, TEMPLATES)
    vectors, labels = zeroshot_images()
    got = zeroshot_metrics(F.normalize(vectors, dim=-1), labels, classifier)
    # Ranks: 1,1,1,7,2,6,5,1,1,1 -> top1 6/10, top5 8/10.
    assert got["top1"] == pytest.approx(60.0) and got["top5"] == pytest.approx(80.0)
    assert zeroshot_metrics(F.normalize(vectors, dim=-1), labels, classifier, chunk_size=3) == got


def test_zeroshot_top5_is_clipped_to_the_number_of_classes():
    classifier = torch.eye(3)
    features = torch.tensor([[0.0, 0.0, 1.0]])  # true class 0 ranks last of 3
    assert zeroshot_metrics(features, [0], classifier) == {"top1": 0.0, "top5": 100.0}


def test_zeroshot_metrics_validates_labels():
    with pytest.raises(ValueError, match="labels"):
        zeroshot_metrics(torch.eye(2), [0, 2], torch.eye(2))


class FakeZeroShotSet(FakeImageSet):
    def __init__(self, vectors, labels, unreadable=()):
        super().__init__(vectors, labels, unreadable)
        self.classnames, self.templates = CLASSNAMES, TEMPLATES


def test_evaluate_zeroshot_skips_unreadable_images():
    model, tokenizer = zeroshot_model_and_tokenizer()
    vectors, labels = zeroshot_images()
    got = evaluate_zeroshot(
        model, tokenizer, FakeZeroShotSet(vectors, labels, unreadable={3}), batch_size=4, progress=False
    )
    # Image 3 (rank 7) is gone: ranks 1,1,1,2,6,5,1,1,1 -> top1 6/9, top5 8/9.
    assert got["top1"] == pytest.approx(600 / 9) and got["top5"] == pytest.approx(800 / 9)
    assert got["n_images"] == 9 and got["n_skipped_images"] == 1


def test_evaluate_all_merges_both_and_averages_the_study_scores():
    model, tokenizer, retrieval_set, _, _ = make_retrieval_case(dim=DIM)
    zs_model, zs_tokenizer = zeroshot_model_and_tokenizer()
    vectors, labels = zeroshot_images()
    zeroshot_set = FakeZeroShotSet(vectors, labels)
    retrieval = evaluate_retrieval(model, tokenizer, retrieval_set, progress=False)
    zeroshot = evaluate_zeroshot(zs_model, zs_tokenizer, zeroshot_set, progress=False)
    # One model and tokenizer holding both vocabularies reproduces each score.
    both = FakeDualEncoder(torch.cat([model.words.weight[1:], zs_model.words.weight[1:]]))
    both_tokenizer = FakeTokenizer(retrieval_set.texts + CLASSNAMES + ["zz"])
    got = evaluate_all(both, both_tokenizer, retrieval_set, zeroshot_set, progress=False)

    for key in RECALL_KEYS + ["txt_r_mean", "img_r_median", "r_mean"]:
        assert got[key] == pytest.approx(retrieval[key]), key
    assert got["zeroshot_top1"] == pytest.approx(zeroshot["top1"])
    assert got["zeroshot_top5"] == pytest.approx(zeroshot["top5"])
    assert got["retrieval_n_skipped_images"] == 1 and got["zeroshot_n_images"] == 10
    assert got["average"] == pytest.approx((retrieval["txt_r1"] + retrieval["img_r1"] + zeroshot["top1"]) / 3)
    assert "average" not in evaluate_all(zs_model, zs_tokenizer, zeroshot_set=zeroshot_set, progress=False)
    with pytest.raises(ValueError, match="retrieval_set"):
        evaluate_all(model, tokenizer)
