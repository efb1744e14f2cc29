"""The demo data set's tokenizer: a deterministic WordPiece vocabulary of the training captions."""

from __future__ import annotations

from collections import Counter

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] = 0


def build_tokenizer(texts: list[str]):
    """A BERT-style WordPiece fast tokenizer whose vocabulary covers ``texts``.

    Pipeline (``tokenizers`` library): BertNormalizer (lower case),
    BertPreTokenizer, WordPiece, "[CLS] $A [SEP]"; special tokens [PAD]=0,
    [UNK], [CLS], [SEP], [MASK]. The vocabulary is every character (and its
    "##" continuation) and every whole word of the corpus, words by
    descending count then alphabetically.

    Why not ``WordPieceTrainer``: its merge order breaks ties through a hash
    map, so the vocabulary changes from one process to the next; the demo
    data set must be byte-identical for a seed. With a vocabulary this small,
    keeping whole words is also what the trainer would converge to.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import DistilBertTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789").union(*words))
    vocab_list = SPECIAL_TOKENS + chars + ["##" + c for c in chars]
    seen = set(vocab_list)
    vocab_list += [w for w, _ in sorted(words.items(), key=lambda item: (-item[1], item[0])) if w not in seen]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece()
    return DistilBertTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )
