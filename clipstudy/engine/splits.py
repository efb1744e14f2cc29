"""A run's evaluation splits: validation, for every epoch and every selection; test, once at the end.

The protocol (docs/protocol.md) keeps the two apart: per-epoch evaluation, early
judgement and every choice made by tuning read the *validation* sets only; the
*test* sets are scored once, when a final run ends, and a tuning trial
(``evaluate_test=False``) never builds them, so their files are not even opened.
Scores carry their split in their name: ``val_txt_r1`` ... ``val_average`` for
validation, ``txt_r1`` ... ``average`` (the study's headline names) for test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no torch at import: the sweep's and the report's --help stay quick
    from torch.utils.data import Dataset

VALIDATION, TEST = "validation", "test"
#: the configuration fields holding each split's (retrieval annotations, retrieval images, zero-shot folder)
FIELDS = {
    VALIDATION: ("val_retrieval_ann", "val_retrieval_images", "val_zeroshot_images"),
    TEST: ("retrieval_ann", "retrieval_images", "zeroshot_images"),
}
#: how a split's scores are named: the prefix before evaluate_all's keys
PREFIX = {VALIDATION: "val_", TEST: ""}


@dataclass
class EvalSets:
    split: str
    retrieval: Dataset | None = None
    zeroshot: Dataset | None = None

    def __bool__(self) -> bool:
        return self.retrieval is not None or self.zeroshot is not None


def build_eval_sets(config, split: str) -> EvalSets:
    """The retrieval and zero-shot sets of ``split`` that the configuration names (either may be absent);
    fails in seconds, not after an epoch, when a whole set is unreadable."""
    from clipstudy.data.datasets import RetrievalSet, require_readable_image, transforms_for
    from clipstudy.data.zeroshot import ZeroShotSet

    ann_field, images_field, zeroshot_field = FIELDS[split]
    paths = config.resolved_paths()
    transforms = transforms_for(config)
    sets = EvalSets(split)
    if paths[ann_field]:
        sets.retrieval = RetrievalSet(
            paths[ann_field],
            paths[images_field],
            transforms["retrieval"],
            max_words=config.max_words,
            cache_images=config.cache_images,
        )
        require_readable_image(sets.retrieval, f"{split} retrieval", paths[ann_field])
    if paths[zeroshot_field]:
        sets.zeroshot = ZeroShotSet(paths[zeroshot_field], transforms["zeroshot"], cache_images=config.cache_images)
        require_readable_image(sets.zeroshot, f"{split} zero-shot", paths[zeroshot_field])
    return sets


def score(model, tokenizer, sets: EvalSets, config, *, device, amp, progress: bool = False) -> dict[str, float]:
    """Every score of ``sets`` (:func:`~clipstudy.engine.evaluate.evaluate_all`), named with the split's prefix."""
    from clipstudy.engine.evaluate import evaluate_all

    # Image reading uses the training loader's worker count: one process would bound every
    # evaluation (MSCOCO 5k + ImageNet 50k images in the paper setting) by one core's decoding.
    scores = evaluate_all(
        model,
        tokenizer,
        retrieval_set=sets.retrieval,
        zeroshot_set=sets.zeroshot,
        batch_size=config.eval_batch_size,
        device=device,
        max_length=config.max_length,
        amp=amp,
        progress=progress,
        num_workers=config.num_workers,
    )
    return {PREFIX[sets.split] + key: value for key, value in scores.items()}
