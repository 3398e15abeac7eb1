"""Tiny, randomly initialised IDEFICS (v1), CLIP and DINOv2 checkpoints, built offline.

They stand in for ``HuggingFaceM4/idefics-80b-instruct``, ``HuggingFaceM4/idefics-9b-instruct``,
``openai/clip-vit-base-patch32`` and ``facebook/dinov2-small`` (a plain vision encoder, loaded by the
generic ``hf_vision`` adapter) in the demo and the tests.  Each build saves a model *and* its processor
with ``save_pretrained`` so that exactly the adapter code that loads the real checkpoints from the hub
(:mod:`medprobe.models`) loads these from a local directory.  Nothing here touches the network.

Facts this module relies on (transformers 5.x):

* A default ``IdeficsConfig`` initialises the cross-attention gates to zero, so text states would ignore
  the image; the tiny models open them with ``alpha_initializer="normal"`` and ``alpha_type="vector"``
  (``"normal"`` with ``"float"`` crashes in transformers' init).
* torchvision is not installed next to torch here, so the PIL image-processor classes are used.
* The tokenizers are trained on a small in-code corpus. The IDEFICS one comes out the same every run; the
  CLIP one's order of tied merges varies between runs (the trainer's hash order), which changes nothing the
  demo uses: its size, and so the weights, stay the same, and the CLIP adapter reads images only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["MODEL_NAMES", "build"]

# Text the tokenizers are trained on: the study's prompts and class vocabulary, so that the demo
# prompts split into plausible sub-words rather than single characters.
_TOKENIZER_CORPUS = [
    "User: What can you see on this histopathology image? Assistant:",
    "User: What can you see on this dermatoscopic image? Assistant:",
    "User: What can you see on this fundus photograph? Assistant:",
    "User: What can you see on this chest radiograph? Assistant:",
    "User: What can you see on this knee radiograph? Assistant:",
    "User: What type of tissue is shown in this image? Assistant:",
    "User: Is this image malignant or benign? Answer yes or no. Assistant:",
    "Describe this image. Assistant: An image of a histology slide.",
    "adipose background debris lymphocytes mucus smooth muscle normal colon mucosa "
    "cancer associated stroma colorectal adenocarcinoma epithelium",
    "melanoma nevus basal cell carcinoma actinic keratosis benign keratosis dermatofibroma vascular lesion",
    "chest x-ray cardiomegaly pleural effusion pneumonia nodule atelectasis scoliosis emphysema fracture",
    "knee osteoarthritis kellgren lawrence grade fundus diabetic retinopathy glaucoma",
    "a photo of a cat. a photo of a dog. a histopathology image of tissue.",
] * 20

_IDEFICS_SPECIAL_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
_TOKENIZER_VOCAB_SIZE = 300
_IMAGE_SIZE = 224
# Weight std of the tiny IDEFICS models.  The default 0.02 leaves the image's influence on the text
# states at ~1e-3 of their size; 0.3 makes the states blow up to ~1e2 (fp32 batch-vs-single noise
# ~1e-4); 0.1 gives O(1-10) states that the image moves by about their spread across images.
_IDEFICS_INIT_RANGE = 0.1

# Architecture of each tiny model.  "large" mimics the 80B (wider, deeper), "small" the 9B.
_IDEFICS_SHAPES = {
    "tiny-idefics-large": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=6, num_attention_heads=4),
    "tiny-idefics-small": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4),
}
_CLIP_NAME = "tiny-clip"
_DINOV2_NAME = "tiny-dinov2"
MODEL_NAMES: tuple[str, ...] = (*_IDEFICS_SHAPES, _CLIP_NAME, _DINOV2_NAME)


def _train_llama_like_tokenizer():
    """A SentencePiece-style (Metaspace) BPE tokenizer with LLaMA's <unk>/<s>/</s> = 0/1/2 and the
    three IDEFICS special tokens appended after the trained vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=_TOKENIZER_VOCAB_SIZE,
        special_tokens=["<unk>", "<s>", "</s>"],
        show_progress=False,
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!-'\n▁"),
    )
    tokenizer.train_from_iterator(_TOKENIZER_CORPUS, trainer=trainer)
    base_vocab_size = tokenizer.get_vocab_size()
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        extra_special_tokens=_IDEFICS_SPECIAL_TOKENS,
        # The hub's IDEFICS tokenizers pad on the left; say so explicitly, the default is "right".
        padding_side="left",
        add_bos_token=False,
        add_eos_token=False,
    )
    special_ids = hf_tokenizer.convert_tokens_to_ids(_IDEFICS_SPECIAL_TOKENS)
    expected_ids = [base_vocab_size, base_vocab_size + 1, base_vocab_size + 2]
    if special_ids != expected_ids:  # the decoupled embedding assumes they follow the trained vocab
        raise RuntimeError(f"IDEFICS special tokens got ids {special_ids}, expected {expected_ids}")
    return hf_tokenizer, base_vocab_size


def _train_clip_tokenizer():
    """A CLIP-style BPE (``</w>`` word suffix) wrapped as a real ``CLIPTokenizer``."""
    import json

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    tokenizer = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=_TOKENIZER_VOCAB_SIZE,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tokenizer.train_from_iterator([text.lower() for text in _TOKENIZER_CORPUS], trainer=trainer)
    spec = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    return CLIPTokenizer(vocab=spec["vocab"], merges=merges)


def _special_token_ids(tokenizer) -> dict[str, int]:
    """The model config's padding, start and end token ids: the tokenizer's own."""
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _save_idefics(name: str, out_dir: Path) -> None:
    from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsProcessor
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    tokenizer, base_vocab_size = _train_llama_like_tokenizer()
    config = IdeficsConfig(
        vocab_size=base_vocab_size,  # the pretrained part of IDEFICS' decoupled embedding
        additional_vocab_size=len(_IDEFICS_SPECIAL_TOKENS),
        **_IDEFICS_SHAPES[name],
        cross_layer_interval=2,
        max_position_embeddings=256,
        **_special_token_ids(tokenizer),
        # Open gates so that the image influences the text states, as in trained checkpoints.
        alpha_initializer="normal",
        alphas_initializer_range=1.0,
        alpha_type="vector",
        initializer_range=_IDEFICS_INIT_RANGE,
        use_resampler=True,
        vision_config=dict(
            embed_dim=48,
            image_size=_IMAGE_SIZE,
            patch_size=14,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
        ),
        perceiver_config=dict(
            use_resampler=True,
            resampler_n_latents=16,
            resampler_depth=1,
            resampler_n_heads=2,
            resampler_head_dim=16,
        ),
        freeze_text_layers=False,
        freeze_vision_layers=False,
    )
    model = IdeficsForVisionText2Text(config).eval()
    processor = IdeficsProcessor(image_processor=IdeficsImageProcessorPil(image_size=_IMAGE_SIZE), tokenizer=tokenizer)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def _save_clip(name: str, out_dir: Path) -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = _train_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            **_special_token_ids(tokenizer),
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=_IMAGE_SIZE,
            patch_size=32,
        ),
        projection_dim=32,
    )
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=tokenizer)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def _save_dinov2(name: str, out_dir: Path) -> None:
    """A vision-only backbone (no text tower, no tokenizer): ``Dinov2Model`` with DINOv2's own image
    processing (shortest edge to 256, centre crop to 224)."""
    from transformers import Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    config = Dinov2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=_IMAGE_SIZE,
        patch_size=32,
    )
    model = Dinov2Model(config).eval()
    processor = BitImageProcessorPil(
        size={"shortest_edge": 256}, crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


_BUILDERS: dict[str, Callable[[str, Path], None]] = {
    **{name: _save_idefics for name in _IDEFICS_SHAPES},
    _CLIP_NAME: _save_clip,
    _DINOV2_NAME: _save_dinov2,
}


def build(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny model ``name`` and save model + processor into ``out_dir``.

    Args:
        name: one of :data:`MODEL_NAMES` (``tiny-idefics-large``, ``tiny-idefics-small``, ``tiny-clip``,
            ``tiny-dinov2``).
        out_dir: the checkpoint directory to create; an existing one is replaced.
        seed: seeds the random weights; the same seed gives identical weights.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.  It only appears once the build is complete: files are
        written into a sibling temporary directory that is renamed into place at the end.

    Raises:
        ValueError: ``name`` is not a known tiny model.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown demo model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return build_seeded(lambda folder: _BUILDERS[name](name, folder), out_dir, seed)


def build_seeded(save: Callable[[Path], None], out_dir: str | Path, seed: int) -> Path:
    """Run ``save(folder)`` under ``torch.manual_seed(seed)`` into a sibling temporary folder renamed to
    ``out_dir`` once complete, so the directory never exists half-written; the caller's RNG is left alone."""
    import torch

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        # fork_rng keeps the caller's global RNG state untouched by our seeding.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            save(tmp_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)  # os.replace cannot overwrite a non-empty directory
        os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir
