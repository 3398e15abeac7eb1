"""Tiny, randomly initialised image-text-to-text checkpoints (Idefics3, LLaVA), built offline.

They stand in for the hub's current vision-language models (SmolVLM / Idefics3, LLaVA(-1.5))
in the tests of the generic ``hf_vlm`` adapter (:mod:`medprobe.models.vlm`).  As in
:mod:`medprobe.demo.models`, each build saves a model *and* its processor (tokenizer, image processor and
a minimal chat template) with ``save_pretrained``, so the adapter loads them exactly as it loads a hub
checkpoint.  Nothing here touches the network; the PIL image-processor classes are used because
torchvision is not installed next to torch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medprobe.demo.models import _TOKENIZER_CORPUS, build_seeded

__all__ = ["VLM_NAMES", "build_vlm"]

_VOCAB_SIZE = 300
# A small Llama-like language model shared by the families (4 decoder layers -> 5 hidden states).
_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)

# Minimal chat templates in the families' own turn markup (the hub's are longer, same structure).
_IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
_LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _tokenizer(special_tokens: list[str]):
    """A byte-level-free BPE tokenizer trained on the demo corpus, the family's special tokens appended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=["<unk>", "<s>", "</s>"],
        show_progress=False,
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!-'\n▁<>_|"),
    )
    tokenizer.train_from_iterator(_TOKENIZER_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        extra_special_tokens=special_tokens,
        padding_side="left",
    )


def _text_config(tokenizer) -> dict:
    return dict(
        _TEXT,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _save_idefics3(out_dir: Path) -> None:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = _tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"])
    text = dict(_text_config(tokenizer), model_type="llama")
    config = Idefics3Config(
        text_config=text,
        vision_config=dict(_VISION, image_size=32, patch_size=8),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    # Image splitting gives 1 global tile + rows x cols tiles of 32 px, 4 <image> tokens each, so images
    # of different shapes get different numbers of image tokens.
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=_IDEFICS3_TEMPLATE
    )
    Idefics3ForConditionalGeneration(config).eval().save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def _save_llava(out_dir: Path) -> None:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = _tokenizer(["<image>"])
    config = LlavaConfig(
        text_config=dict(_text_config(tokenizer), model_type="llama"),
        vision_config=dict(_VISION, model_type="clip_vision_model", image_size=32, patch_size=8, projection_dim=32),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_LLAVA_TEMPLATE,
    )
    LlavaForConditionalGeneration(config).eval().save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def _save_paligemma(out_dir: Path) -> None:
    """PaliGemma: a SigLIP tower, a Gemma language model, no chat template (the processor lays out the prompt)."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tokenizer = _tokenizer([])
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image_processor.image_seq_length = (32 // 8) ** 2  # 16 <image> tokens per image, whatever its shape
    # The processor adds the <image> token and PaliGemma's 1152 <locXXXX>/<segXXX> tokens to the tokenizer.
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text = dict(_text_config(tokenizer), model_type="gemma", head_dim=16)
    config = PaliGemmaConfig(
        text_config=text,
        vision_config=dict(_VISION, model_type="siglip_vision_model", image_size=32, patch_size=8),
        image_token_index=processor.image_token_id,
        vocab_size=len(tokenizer),
        projection_dim=_TEXT["hidden_size"],
        hidden_size=_TEXT["hidden_size"],
        pad_token_id=tokenizer.pad_token_id,
    )
    PaliGemmaForConditionalGeneration(config).eval().save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


_BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny-idefics3": _save_idefics3,
    "tiny-llava": _save_llava,
    "tiny-paligemma": _save_paligemma,
}
VLM_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_vlm(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny image-text-to-text model ``name`` (one of :data:`VLM_NAMES`) into ``out_dir``.

    The directory appears only once complete (written next to it, then renamed); the same seed gives the
    same weights, and the caller's torch RNG state is left untouched.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown tiny VLM {name!r}; valid names: {', '.join(VLM_NAMES)}")
    return build_seeded(_BUILDERS[name], out_dir, seed)
