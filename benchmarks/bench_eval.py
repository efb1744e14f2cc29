"""Benchmark of the evaluation code against the original study's code path.

1. Retrieval scoring on a random MSCOCO-sized similarity matrix (5k images x
   25k captions, 5 per image): ``clipstudy.engine.evaluate.retrieval_metrics`` vs the
   original argsort loop (``original_eval.itm_eval``), and one plain read of the
   matrix (``sim.sum()``) as the lower limit any exact method must pay.
2. Zero-shot classifier construction for 1000 classes x 80 templates with a
   tiny random-init DistilBERT: all prompts in big batches
   (``zeroshot_classifier``) vs one forward per class, as the original code did.
   The per-class path is timed on a subset of classes and extrapolated linearly
   (it is a loop of identical steps).

Usage: ``python benchmarks/bench_eval.py [--quick] [--threads N]``; writes
``reports/benchmarks/eval.json``. ``run(quick)`` does the same from Python.

Torch runs single-threaded by default: the original loop is single-threaded
numpy, so this compares like with like, and on a shared machine multi-threaded
kernels are dominated by contention (on 2 busy cores, 2 threads measured up to
30x slower than 1).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from original_eval import itm_eval  # noqa: E402

from clipstudy.engine.evaluate import extract_text_features, retrieval_metrics, zeroshot_classifier  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "reports" / "benchmarks" / "eval.json"
METADATA = REPO / "clipstudy" / "resources" / "imagenet_metadata.json"
RECALL_KEYS = ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"]


def _timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of `repeats` calls after one warm-up call, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


# --------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------


def bench_retrieval(n_images: int, captions_per_image: int = 5, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    n_texts = n_images * captions_per_image
    txt2img = torch.arange(n_images).repeat_interleave(captions_per_image)
    sim = torch.randn(n_images, n_texts, generator=generator)
    sim[txt2img, torch.arange(n_texts)] += 2.5  # some signal, so recalls are not all ~0
    img2txt = [list(range(i * captions_per_image, (i + 1) * captions_per_image)) for i in range(n_images)]

    limit_s, _ = _timed(lambda: sim.sum().item(), repeats=5)
    ours_s, ours = _timed(lambda: retrieval_metrics(sim, txt2img), repeats=3)
    start = time.perf_counter()
    # As in the original: scores_t2i is the transposed view of the same matrix.
    original = itm_eval(sim.numpy(), sim.numpy().T, txt2img.numpy(), img2txt)
    original_s = time.perf_counter() - start
    return {
        "n_images": n_images,
        "n_texts": n_texts,
        "matrix_mb": sim.numel() * sim.element_size() / 2**20,
        "limit_one_read_s": limit_s,
        "retrieval_metrics_s": ours_s,
        "original_itm_eval_s": original_s,
        "speedup_vs_original": original_s / ours_s,
        "retrieval_metrics_in_reads": ours_s / limit_s,
        # Random float32 scores are (almost surely) tie-free, so both must agree.
        "max_recall_difference": max(abs(ours[k] - original[k]) for k in RECALL_KEYS),
        "recalls": {k: ours[k] for k in RECALL_KEYS},
    }


# --------------------------------------------------------------------------
# Zero-shot classifier
# --------------------------------------------------------------------------


def _classnames_and_templates(n_classes: int) -> tuple[list[str], list[str]]:
    if METADATA.exists():
        meta = json.loads(METADATA.read_text())
        classnames, templates = list(meta["classnames"]), list(meta["templates"])
    else:  # synthetic names and 80 templates of similar length
        classnames = [f"object {i} kind" for i in range(1000)]
        templates = [f"a photo number {i} of the {{}}." for i in range(80)]
    return classnames[:n_classes], templates


def _tiny_tokenizer(prompts: list[str]):
    """A word-level tokenizer built in memory from the prompts' words, with [CLS]/[SEP]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    normalizer = normalizers.Lowercase()
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = set()
    for prompt in prompts:
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(prompt)))
    vocab = {token: i for i, token in enumerate(specials + sorted(words))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


class TinyTextEncoder(nn.Module):
    """2-layer random-init DistilBERT, [CLS] state projected: the study's text tower, scaled down."""

    def __init__(self, vocab_size: int, dim: int = 64, embed_dim: int = 32):
        super().__init__()
        from transformers import DistilBertConfig, DistilBertModel

        config = DistilBertConfig(
            vocab_size=vocab_size, dim=dim, hidden_dim=2 * dim, n_layers=2, n_heads=2, max_position_embeddings=64
        )
        self.bert = DistilBertModel(config)
        self.proj = nn.Linear(dim, embed_dim)

    def encode_text(self, input_ids, attention_mask):
        return self.proj(self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0])


def _per_class_classifier(model, tokenizer, classnames, templates, max_length=30) -> torch.Tensor:
    """The original pattern: one tokenisation and one forward per class."""
    weights = []
    for name in classnames:
        embedded = extract_text_features(
            model, tokenizer, [t.format(name) for t in templates], batch_size=len(templates), max_length=max_length
        )
        weights.append(F.normalize(embedded.mean(dim=0), dim=-1))
    return torch.stack(weights, dim=1)


def bench_zeroshot(n_classes: int, n_slow_classes: int, seed: int = 0) -> dict:
    classnames, templates = _classnames_and_templates(n_classes)
    tokenizer = _tiny_tokenizer([t.format(c) for c in classnames for t in templates])
    torch.manual_seed(seed)
    model = TinyTextEncoder(len(tokenizer)).eval()

    start = time.perf_counter()
    batched = zeroshot_classifier(model, tokenizer, classnames, templates, batch_size=1024)
    batched_s = time.perf_counter() - start
    subset = classnames[:n_slow_classes]
    start = time.perf_counter()
    per_class = _per_class_classifier(model, tokenizer, subset, templates)
    subset_s = time.perf_counter() - start
    per_class_s = subset_s * len(classnames) / len(subset)
    return {
        "n_classes": len(classnames),
        "n_templates": len(templates),
        "batched_s": batched_s,
        "per_class_s": per_class_s,
        "per_class_extrapolated_from_classes": len(subset),
        "per_class_measured_s": subset_s,
        "speedup": per_class_s / batched_s,
        "max_abs_difference": (batched[:, : len(subset)] - per_class).abs().max().item(),
    }


def run(quick: bool = False, out: str | Path | None = DEFAULT_OUT, threads: int | None = 1) -> dict:
    """Run both benchmarks and return the numbers.

    Args:
        quick: smaller sizes (1k x 5k matrix, 100 classes) for a fast check.
        out: JSON output path (default reports/benchmarks/eval.json; None: don't write).
        threads: torch intra-op threads while timing (default 1; None keeps torch's
            setting). Restored afterwards.
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        results = _run(quick)
    finally:
        torch.set_num_threads(previous_threads)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def _run(quick: bool) -> dict:
    return {
        "benchmark": "eval",
        "quick": quick,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "retrieval": bench_retrieval(n_images=1000 if quick else 5000),
        "zeroshot_classifier": bench_zeroshot(n_classes=100 if quick else 1000, n_slow_classes=20 if quick else 100),
    }


def _print(results: dict) -> None:
    r, z = results["retrieval"], results["zeroshot_classifier"]
    print(f"torch {results['torch']}, {results['torch_threads']} thread(s)")
    print(f"retrieval scoring, {r['n_images']} images x {r['n_texts']} texts ({r['matrix_mb']:.0f} MB float32)")
    print(f"  one read of the matrix (sim.sum): {r['limit_one_read_s']:.3f} s")
    print(
        f"  retrieval_metrics:                {r['retrieval_metrics_s']:.3f} s "
        f"({r['retrieval_metrics_in_reads']:.1f} x one read)"
    )
    print(f"  original itm_eval (argsort loop): {r['original_itm_eval_s']:.3f} s")
    print(f"  speed-up: {r['speedup_vs_original']:.0f} x; max recall difference {r['max_recall_difference']:.3g}")
    print(f"zero-shot classifier, {z['n_classes']} classes x {z['n_templates']} templates (tiny DistilBERT)")
    print(f"  batched:         {z['batched_s']:.2f} s")
    print(
        f"  one class a time: {z['per_class_s']:.2f} s (extrapolated from "
        f"{z['per_class_extrapolated_from_classes']} classes, {z['per_class_measured_s']:.2f} s)"
    )
    print(f"  speed-up: {z['speedup']:.1f} x; max abs difference {z['max_abs_difference']:.2g}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (1k x 5k matrix, 100 classes)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON output path (default: %(default)s)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads while timing (default: %(default)s; 0 keeps torch's default)",
    )
    args = parser.parse_args(argv)
    results = run(quick=args.quick, out=args.out, threads=args.threads or None)
    _print(results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
