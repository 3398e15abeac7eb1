"""Tiny, randomly initialised image-text-to-text checkpoints, built offline.

They stand in for the hub's current vision-language models in the tests of the generic ``hf_vlm`` adapter
(:mod:`medprobe.models.vlm`): Idefics3 (SmolVLM), LLaVA(-1.5), PaliGemma, Qwen2.5-VL (dynamic resolution,
3-D M-RoPE positions) and Gemma 3 (MedGemma's class).  As in :mod:`medprobe.demo.models`, each build saves a
model *and* its processor (tokenizer with the family's special tokens, image processor and a minimal chat
template in the family's markup) with ``save_pretrained``, so the adapter loads them exactly as it loads a
hub checkpoint.  Nothing here touches the network; the PIL image-processor classes are used because
torchvision is not installed next to torch.  For the same reason the Qwen2.5-VL processor is built and
saved without its video processor (every transformers video processor needs torchvision), as
:func:`medprobe.models.vlm.without_video_processor`; the adapter loads it the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medprobe.demo.models import _TOKENIZER_CORPUS, build_seeded

__all__ = ["QWEN_MAX_PIXELS", "QWEN_MIN_PIXELS", "VLM_NAMES", "build_vlm"]

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


def _tokenizer(
    special_tokens: list[str] | dict[str, str],
    *,
    base_tokens: tuple[str, ...] = ("<unk>", "<s>", "</s>"),
    bos: str | None = "<s>",
    eos: str = "</s>",
    pad: str = "<unk>",
    add_bos: bool = False,
):
    """A byte-level-free BPE tokenizer trained on the demo corpus, the family's special tokens appended.

    ``base_tokens`` take the first ids (LLaMA's ``<unk> <s> </s>`` by default); ``special_tokens`` is a list, or
    a dict naming them (``{"image_token": ...}`` gives ``tokenizer.image_token`` / ``image_token_id``).
    ``add_bos`` puts ``bos`` in front of every encoded text, as Gemma's tokenizer does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=list(base_tokens),
        show_progress=False,
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!-'\n▁<>_|"),
    )
    tokenizer.train_from_iterator(_TOKENIZER_CORPUS, trainer=trainer)
    if add_bos:
        bos_id = tokenizer.token_to_id(bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        unk_token="<unk>",
        pad_token=pad,
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


# Qwen2.5-VL's template without its tools and video branches: the default system turn, then ChatML turns
# with each image as <|vision_start|><|image_pad|><|vision_end|>.
_QWEN2_5_VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Gemma 3's: BOS written by the template, <start_of_turn>user / model turns, <start_of_image> per image.
_GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image>"
    "{% else %}{{ part['text'] | trim }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# The tiny Qwen image processor's budget: 28 x 28 px (one merged token) to 56 x 56 px (four) per image.
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 28 * 28, 56 * 56


def _save_qwen2_5_vl(out_dir: Path) -> None:
    """Qwen2.5-VL: dynamic resolution (14-px patches merged 2 x 2 into one token), 3-D M-RoPE positions."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from medprobe.models.vlm import without_video_processor

    tokenizer = _tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
         "<|video_pad|>"],
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
    )  # fmt: skip
    ids = tokenizer.convert_tokens_to_ids
    # head_dim 16: the rotary half (8 frequencies) split over the temporal, height and width positions.
    text = dict(_text_config(tokenizer), rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1], out_hidden_size=_TEXT["hidden_size"],
    )  # fmt: skip
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    image_processor = Qwen2VLImageProcessorPil(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS)
    processor = without_video_processor(Qwen2_5_VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=_QWEN2_5_VL_TEMPLATE
    )
    Qwen2_5_VLForConditionalGeneration(config).eval().save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def _save_gemma3(out_dir: Path) -> None:
    """Gemma 3 (MedGemma): a SigLIP tower whose 4 x 4 patches are average-pooled into 4 soft tokens."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    # Gemma's ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3; BOS in front of every text.
    tokenizer = _tokenizer(
        {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
         "start_of_turn": "<start_of_turn>", "end_of_turn": "<end_of_turn>"},
        base_tokens=("<pad>", "<eos>", "<bos>", "<unk>"),
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        add_bos=True,
    )  # fmt: skip
    text = dict(
        _text_config(tokenizer),
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=dict(_VISION, model_type="siglip_vision_model", image_size=32, patch_size=8),
        mm_tokens_per_image=4,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=_GEMMA3_TEMPLATE, image_seq_length=4
    )
    model = Gemma3ForConditionalGeneration(config).eval()
    # transformers initialises the image projection to zeros (the text states would ignore the image).
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.1)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


_BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny-idefics3": _save_idefics3,
    "tiny-llava": _save_llava,
    "tiny-paligemma": _save_paligemma,
    "tiny-qwen2_5_vl": _save_qwen2_5_vl,
    "tiny-gemma3": _save_gemma3,
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
