"""What each configuration field means, for ``--help`` and docs/reference.md ("Configuration fields").

One line per field of :class:`clipstudy.engine.config.RunConfig`, saying what it is
and what its special values mean; :func:`clipstudy.engine.config.add_config_arguments`
adds the default of the profile in use. A test checks every field has one.
"""

from __future__ import annotations

FIELD_HELP: dict[str, str] = {
    # the cell
    "profile": "built-in setting the other fields start from: paper (GPU hours), demo (minutes on a CPU) or smoke "
    "(seconds: 256 training pairs)",
    "optimizer": "a registered optimizer name (`python -m clipstudy list` shows them with their default rates)",
    "label": "the optimizer's name in run folders and reports, e.g. adam-nol2; empty = the optimizer name",
    "loss": "a registered loss name (`python -m clipstudy list` shows them and which the default grid runs)",
    "seed": "random seed of initial weights, data order and augmentation",
    "out": "run directory; empty = reports/runs/<profile>/<label>-<loss>-s<seed>",
    # data
    "data": "demo-layout data folder (DIR/train.json, DIR/images, DIR/retrieval.json, DIR/zeroshot); "
    "explicit paths below win",
    "train_ann": "training annotation JSON (list of image/caption/image_id); empty = DATA/train.json",
    "train_images": "folder the training image paths are relative to; empty = DATA/images",
    "retrieval_ann": "test retrieval annotation JSON (image + list of captions); empty = DATA/retrieval.json, "
    "none without DATA",
    "retrieval_images": "folder the retrieval image paths are relative to; empty = DATA/images",
    "zeroshot_images": "test zero-shot ImageFolder root (one folder per class); empty = DATA/zeroshot, none "
    "without DATA",
    "val_retrieval_ann": "validation retrieval annotations (the retrieval format); empty = DATA/val_retrieval.json, "
    "none without DATA",
    "val_retrieval_images": "folder the validation retrieval image paths are relative to; empty = DATA/images",
    "val_zeroshot_images": "validation zero-shot ImageFolder root; empty = DATA/val_zeroshot, none without DATA",
    "limit_train": "use only the first N training pairs; 0 = all",
    "max_words": "captions are cut to this many words",
    "max_length": "tokens per caption (longer ones are truncated)",
    "image_size": "training and evaluation image side, pixels",
    "crop_scale_min": "RandomResizedCrop keeps between this fraction and all of the image area",
    "hflip": "random horizontal flips while training",
    "augment": "extra augmentation: albef (the original code's RandomAugment), torchvision (RandAugment) or none",
    "num_workers": "data loading processes; 0 = load in the training process",
    "cache_images": "keep decoded images in memory (small sets such as the demo)",
    "zeroshot_transform": "zero-shot preprocessing: clip (square resize, CLIP statistics) or original "
    "(short side + centre crop, ImageNet statistics)",
    # model
    "image_encoder": "image tower: resnet50 (paper) or small_resnet (demo)",
    "text_encoder": "text tower: distilbert (paper) or small_distilbert (demo)",
    "pretrained": "start from pretrained towers (paper: cached weights, see fetch-weights; demo: pretrained by "
    "clipstudy.engine.pretrain); false = random initialisation",
    "image_weights": "ResNet-50 weights: timm-a1 (timm resnet50.a1_in1k) or torchvision (IMAGENET1K_V1)",
    "embed_dim": "dimension of the shared embedding space",
    "tokenizer": "tokenizer folder; empty = the text encoder's own (small_distilbert: DATA/tokenizer)",
    "small_resnet_widths": "small_resnet channels per stage, JSON list",
    "small_resnet_blocks": "small_resnet residual blocks per stage, JSON list (one per width)",
    "small_resnet_norm": "small_resnet normalisation: batch or group (group: exact multi-process equivalence on CPU)",
    "text_dim": "small_distilbert hidden size",
    "text_layers": "small_distilbert transformer layers",
    "pretrain": "demo towers' pretraining settings as JSON (see clipstudy.engine.pretrain.PretrainSettings); "
    "{} = its defaults",
    "text_pooling": "text feature: first (the [CLS] token, the original) or mean (mean over the caption's tokens)",
    # loss
    "temperature": "softmax temperature of the contrastive losses (> 0)",
    "loss_params": "extra loss parameters as JSON, e.g. '{\"gamma\": 0.8}' for sogclr; only the loss's own "
    "keys are accepted (the paper profile adds each loss's original settings)",
    # optimisation
    "lr": "peak learning rate; 0 = the optimizer's default",
    "weight_decay": "weight decay (decoupled for adamw, an L2 term for sgd and adam)",
    "optimizer_params": "extra optimizer arguments as JSON, e.g. '{\"momentum\": 0.9}' or '{\"betas\": [0.9, 0.98]}'",
    "epochs": "passes over the training set",
    "batch_size": "pairs per optimizer step, over all processes",
    "warmup_steps": "linear warm-up steps; -1 = one epoch",
    "lr_schedule": "smooth (warm-up per step, then cosine per step) or original (staircase warm-up, cosine per epoch)",
    "warmup_lr": "learning rate at the start of warm-up",
    "min_lr": "learning rate at the end of the cosine",
    "grad_clip": "clip the gradient norm to this value; 0 = no clipping (the norm is still logged)",
    "amp": "mixed precision: auto (bf16/fp16 on CUDA, none on CPU), bf16, fp16 or none",
    "max_steps": "stop after this many optimizer steps; 0 = no limit",
    # evaluation and bookkeeping
    "eval_every": "epochs between validation evaluations (the last epoch is always evaluated)",
    "evaluate_test": "score the test sets once when the run ends; false for tuning trials (test files never read)",
    "eval_batch_size": "images or captions per evaluation batch",
    "device": "auto (CUDA if present), cpu, cuda or cuda:N",
    "threads": "torch CPU threads; 0 = leave torch's default",
    "deterministic": "deterministic algorithms (reproducible, slower on GPU)",
    "keep_checkpoints": "checkpoints kept in RUN/checkpoints (the newest ones)",
    "log_every": "optimizer steps between rows of history.csv",
    "tensorboard": "also write history.csv and epochs.csv rows as TensorBoard event files in the run directory",
}
