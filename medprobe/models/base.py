"""The adapter base class and the decorator that registers an adapter.

An adapter wraps one family of Hugging Face models behind the four things extraction needs: the exact
prompt text, CPU preprocessing of a batch of images, a forward pass that returns one pooled vector per
hidden state, and a description of the layers.  Adding a model family is one module in this package
that subclasses :class:`Adapter` and decorates it with :func:`register`, and its name in
:data:`medprobe.models.ADAPTER_NAMES`; the registry imports every module of the package.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from PIL import Image

import medprobe.models
from medprobe.models import PROMPT_FORMATS

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "Adapter",
    "PROMPT_FORMATS",
    "QUANTIZATIONS",
    "TORCH_DTYPES",
    "quantization_config",
    "register",
    "resolve_device",
    "resolve_torch_dtype",
]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

QUANTIZATIONS = ("none", "8bit", "4bit")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


def quantization_config(name: str | None, compute_dtype: torch.dtype) -> Any:
    """transformers' ``BitsAndBytesConfig`` for the config's ``quantization`` (``None`` for ``none``).

    ``8bit`` is LLM.int8(), ``4bit`` NF4 with ``compute_dtype`` matmuls.  bitsandbytes is imported only
    here, so it is needed only by quantised models.
    """
    if name is None or name == "none":
        return None
    if name not in QUANTIZATIONS:
        raise ValueError(f"model config key 'quantization' is {name!r}; valid values: {', '.join(QUANTIZATIONS)}")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            f"model config key 'quantization: {name}' needs the bitsandbytes package, which is not installed; "
            "install it (pip install bitsandbytes, CUDA only) or set quantization: none"
        )
    from transformers import BitsAndBytesConfig

    if name == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def register(name: str) -> Callable[[type[Adapter]], type[Adapter]]:
    """Class decorator that registers an :class:`Adapter` subclass under ``name`` (the config's ``adapter``)."""

    def decorator(cls: type[Adapter]) -> type[Adapter]:
        if not (isinstance(cls, type) and issubclass(cls, Adapter)):
            raise TypeError(f"@register({name!r}) must decorate a subclass of Adapter, got {cls!r}")
        if name not in medprobe.models.ADAPTER_NAMES:
            raise ValueError(
                f"adapter name {name!r} is not declared: add it to ADAPTER_NAMES in medprobe/models/__init__.py "
                "(config validation reads the names there without importing torch)"
            )
        medprobe.models.ADAPTERS.register(name, cls)
        cls.name = name
        return cls

    return decorator


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means the first CUDA device when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_torch_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """Map the config's ``torch_dtype`` to a torch dtype; the default is float32 on CPU, bfloat16 on CUDA."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in TORCH_DTYPES:
        raise ValueError(f"model config key 'torch_dtype' is {name!r}; valid values: {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def _transformers_class(adapter: type[Adapter], attribute: str) -> Any:
    """The transformers class an adapter names in ``attribute`` (``model_class`` or ``processor_class``)."""
    name = getattr(adapter, attribute)
    if not name:
        raise NotImplementedError(f"{adapter.__name__} names no {attribute} and does not override its loading")
    import transformers

    return getattr(transformers, name)


class Adapter(abc.ABC):
    """A loaded model + processor that turns images and a prompt into per-layer pooled activations.

    Attributes:
        name: the registry name (set by :func:`register`).
        pooling: ``"last"`` (the last real prompt token) or ``"cls"`` (a vision tower's CLS token).
        prompt_formats: the values of :data:`PROMPT_FORMATS` the adapter implements; empty for
            image-only models, which ignore the prompt (and so any format).
        model_class, processor_class: the transformers classes :meth:`load_model` and :meth:`load_processor`
            call ``from_pretrained`` of.
        layer_names: ``hidden.i`` for every entry ``i`` of the model's ``hidden_states``.
        hidden_dim: width of the hidden states.
        embedding_dim: width of the model's own projected image embedding (CLIP), else ``None``.
        checkpoint: hub id or local directory the model was loaded from.
        revision: the hub revision, or ``None``.
        model: the ``torch.nn.Module`` (in eval mode).
        processor: the Hugging Face processor / image processor.
        device: where inputs go.
        dtype: the model's floating dtype; floating inputs are cast to it.
    """

    name: ClassVar[str] = ""
    pooling: ClassVar[str] = "last"
    prompt_formats: ClassVar[tuple[str, ...]] = ()
    # transformers' classes of the model and of its processor, by name: transformers is imported only when
    # a model loads. An adapter that loads otherwise overrides load_model / load_processor.
    model_class: ClassVar[str] = ""
    processor_class: ClassVar[str] = ""

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        *,
        checkpoint: str,
        revision: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.checkpoint = checkpoint
        self.revision = revision
        first_param = next(model.parameters())
        # With a device_map the model is already placed; inputs go where its first parameters live.
        self.device = torch.device(device) if device is not None else first_param.device
        self.dtype = dtype if dtype is not None else first_param.dtype
        self.layer_names: list[str] = [f"hidden.{i}" for i in range(self.num_hidden_states)]

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_config(cls, model_cfg: Mapping[str, Any], device: str | torch.device | None = None) -> Adapter:
        """Load the checkpoint named in ``model_cfg`` (see :func:`medprobe.models.load_adapter`)."""
        checkpoint = model_cfg.get("checkpoint")
        if not isinstance(checkpoint, str) or not checkpoint:
            raise ValueError(f"model config key 'checkpoint' must be a hub id or directory, got {checkpoint!r}")
        revision = model_cfg.get("revision") or None
        target = resolve_device(device)
        dtype = resolve_torch_dtype(model_cfg.get("torch_dtype"), target)
        quantization = quantization_config(model_cfg.get("quantization"), dtype)
        device_map = model_cfg.get("device_map")
        if quantization is not None and device_map is None:
            if target.type != "cuda":
                raise ValueError(
                    f"model config key 'quantization' is {model_cfg.get('quantization')!r}, which needs a CUDA "
                    f"device (bitsandbytes), but the model would run on {target}"
                )
            device_map = {"": target.index or 0}
        trust_remote_code = bool(model_cfg.get("trust_remote_code", False))
        load_kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
        model_kwargs: dict[str, Any] = {"dtype": dtype}
        attn_implementation = model_cfg.get("attn_implementation", "sdpa")
        if attn_implementation is not None and attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"model config key 'attn_implementation' is {attn_implementation!r}; valid values: "
                f"{', '.join(ATTN_IMPLEMENTATIONS)}"
            )
        if attn_implementation is not None:
            model_kwargs["attn_implementation"] = attn_implementation
        if device_map is not None:
            model_kwargs["device_map"] = device_map
        if quantization is not None:
            model_kwargs["quantization_config"] = quantization
        model = cls.load_model(checkpoint, **load_kwargs, **model_kwargs)
        if device_map is None:
            model = model.to(target)
        processor = cls.load_processor(checkpoint, **load_kwargs)
        return cls(
            model,
            processor,
            checkpoint=checkpoint,
            revision=revision,
            device=None if device_map is not None else target,
            dtype=dtype,
        )

    @classmethod
    def load_model(cls, checkpoint: str, **kwargs: Any) -> torch.nn.Module:
        """``from_pretrained`` of :attr:`model_class`; kwargs: revision, trust_remote_code, dtype, device_map."""
        return _transformers_class(cls, "model_class").from_pretrained(checkpoint, **kwargs)

    @classmethod
    def load_processor(cls, checkpoint: str, **kwargs: Any) -> Any:
        """``from_pretrained`` of :attr:`processor_class`; kwargs: revision, trust_remote_code."""
        return _transformers_class(cls, "processor_class").from_pretrained(checkpoint, **kwargs)

    # ------------------------------------------------------------------ description
    @property
    def layers_config(self) -> Any:
        """The part of the model's config that describes the pooled layers (CLIP: its ``vision_config``)."""
        return self.model.config

    @property
    def num_hidden_states(self) -> int:
        """Length of the model's ``hidden_states`` tuple (layers + the embedding output)."""
        return int(self.layers_config.num_hidden_layers) + 1

    @property
    def hidden_dim(self) -> int:
        """Width of the hidden states."""
        return int(self.layers_config.hidden_size)

    @property
    def embedding_dim(self) -> int | None:
        """Width of the model's projected image embedding, ``None`` when it has none."""
        return None

    # ------------------------------------------------------------------ running
    def check_prompt_format(self, prompt_format: str) -> None:
        """Raise ValueError unless ``prompt_format`` is one this adapter implements (any, when image-only)."""
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(
                f"extraction config key 'prompt_format' is {prompt_format!r}; valid values: {', '.join(PROMPT_FORMATS)}"
            )
        if self.prompt_formats and prompt_format not in self.prompt_formats:
            raise ValueError(
                f"extraction config key 'prompt_format' is {prompt_format!r}, which the {self.name!r} adapter does "
                f"not implement; it implements: {', '.join(self.prompt_formats)}"
            )

    @abc.abstractmethod
    def prompt_text(self, prompt: str, prompt_format: str = "chat") -> str:
        """The exact text given to the processor after the image (empty for image-only models)."""

    @abc.abstractmethod
    def preprocess(
        self, images: Sequence[Image.Image], prompt: str | Sequence[str], prompt_format: str = "chat"
    ) -> dict[str, torch.Tensor]:
        """Turn RGB images (and the prompt, one string for all or one per image) into CPU tensors.

        ``prompt_format`` (see :data:`PROMPT_FORMATS`) says how the prompt is laid out around the image.
        Uses only the processor, never the model, so it is safe to call in DataLoader workers.
        """

    @abc.abstractmethod
    def _pooled_states(
        self, batch: dict[str, torch.Tensor], keep: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the model on a batch already on ``self.device``.

        Returns (B, len(keep), D) pooled states of the hidden states ``keep`` (sorted, unique indices),
        on ``self.device``, and the (B, E) embeddings or None.  An adapter may stop the forward pass
        after the deepest kept hidden state when it needs nothing later (no embeddings).
        """

    def forward(
        self, batch: Mapping[str, torch.Tensor], layers: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled activations of every hidden state (or of ``layers``, indices into ``hidden_states``).

        Returns:
            ``(activations, embeddings)``: activations (B, L, D) float32 on the CPU, embeddings (B, E)
            float32 on the CPU or ``None``.  The pooling and layer selection happen on the device so
            that only the pooled vectors are copied back, once per batch.
        """
        wanted = list(range(self.num_hidden_states)) if layers is None else [int(i) for i in layers]
        for index in wanted:
            if not 0 <= index < self.num_hidden_states:
                raise ValueError(f"layer {index} is out of range: the model has {self.num_hidden_states} hidden states")
        keep = sorted(set(wanted))
        on_device = {
            key: (
                value.to(self.device, dtype=self.dtype, non_blocking=True)
                if value.is_floating_point()
                else value.to(self.device, non_blocking=True)
            )
            for key, value in batch.items()
        }
        with torch.inference_mode():
            pooled, embeddings = self._pooled_states(on_device, keep)
            if wanted != keep:
                order = torch.as_tensor([keep.index(i) for i in wanted], device=pooled.device)
                pooled = pooled[:, order]
            pooled = pooled.float().cpu()
            if embeddings is not None:
                embeddings = embeddings.float().cpu()
        return pooled, embeddings

    __call__ = forward

    def _gather_positions(self, hidden_states: Sequence[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
        """Stack ``hidden_states[i][b, positions[b]]`` into (B, L, D) on ``self.device``.

        With a ``device_map`` the hidden states of different layers live on different GPUs, so every
        layer is indexed where it lives and only the (B, D) slice moves.
        """
        rows = torch.arange(positions.shape[0], device=positions.device)
        gathered = []
        for state in hidden_states:
            if state.device != positions.device:
                rows_here, positions_here = rows.to(state.device), positions.to(state.device)
            else:
                rows_here, positions_here = rows, positions
            gathered.append(state[rows_here, positions_here].to(self.device))
        return torch.stack(gathered, dim=1)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(checkpoint={self.checkpoint!r}, revision={self.revision!r}, "
            f"layers={len(self.layer_names)}, hidden_dim={self.hidden_dim}, pooling={self.pooling!r})"
        )


class _StopForward(Exception):
    """Raised once the deepest kept hidden state is pooled: nothing after it is needed."""


def pooled_decoder_states(
    decoder: torch.nn.Module,
    run: Callable[[], Any],
    keep: Sequence[int],
    pool_state: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``(B, len(keep), D)``: each kept hidden state of a decoder, pooled by ``pool_state`` as it is produced.

    Hooks on ``decoder.layers`` see the states transformers records as ``hidden_states``: hidden.0 is the
    input of layer 0, hidden.i (0 < i < n) the output of layer i - 1, hidden.n the decoder's final normed
    output (``run()``'s ``last_hidden_state``). Full sequences are never collected, and the forward pass
    ``run`` stops once the deepest kept state is pooled.
    """
    n_layers = len(decoder.layers)
    deepest = max(keep)
    pooled: dict[int, torch.Tensor] = {}

    def pool(index: int, state: torch.Tensor) -> None:
        pooled[index] = pool_state(state)
        if index == deepest:
            raise _StopForward

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        pool(0, args[0] if args else kwargs["hidden_states"])

    def make_hook(index: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            pool(index, output[0] if isinstance(output, tuple) else output)

        return hook

    handles = [
        decoder.layers[index - 1].register_forward_hook(make_hook(index)) for index in keep if 0 < index < n_layers
    ]
    if 0 in keep:
        handles.append(decoder.layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
    try:
        pool(n_layers, run().last_hidden_state)  # reached only when the final state is kept
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([pooled[index] for index in keep], dim=1)


def continuation_loglikelihoods(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], prompt_ids: Sequence[int]
) -> tuple[list[float], list[int]]:
    """``(sums, n_tokens)``: the summed natural-log probability of each row's continuation and its token count, in
    one forward pass of ``model`` over ``batch`` (padded on either side).

    A row's continuation is its real tokens after the longest common prefix with ``prompt_ids`` (the tokenised
    prompt alone), so a token merged across the boundary counts as the continuation's.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    n_tokens = []
    for row, mask in zip(input_ids.tolist(), attention_mask.tolist()):
        real = [token for token, keep in zip(row, mask) if keep]
        common = 0
        for a, b in zip(prompt_ids, real):
            if a != b:
                break
            common += 1
        if common == len(real):
            raise ValueError("a continuation added no tokens to the conversation")
        n_tokens.append(len(real) - common)
    with torch.inference_mode():
        logits = model(**batch, use_cache=False, return_dict=True).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        targets = input_ids[:, 1:].to(logprobs.device)
        token_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        # A row's continuation is its last n real tokens (whichever side the padding is on).
        mask = attention_mask.to(token_logprobs.device).long()
        rank = mask.cumsum(dim=1)  # 1-based rank of each real token in its row
        first_scored = mask.sum(dim=1) - torch.tensor(n_tokens, device=mask.device) + 1
        scored = (mask[:, 1:] == 1) & (rank[:, 1:] >= first_scored.unsqueeze(1))
        sums = torch.where(scored, token_logprobs, torch.zeros_like(token_logprobs)).sum(dim=1)
    return [float(v) for v in sums.cpu()], n_tokens


def generation_options(
    tokenizer: Any,
    *,
    stop: Sequence[int],
    banned: Sequence[Sequence[int]],
    pad_token_id: int | None,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_k: int,
    num_return_sequences: int,
    stop_strings: Sequence[str] = (),
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``generate`` options of an NEJM answer: stop at the ``stop`` ids (and ``stop_strings``), never produce
    the ``banned`` sequences, greedy argmax or plain top-k sampling at ``temperature``; ``overrides`` last."""
    if max_new_tokens < 1 or num_return_sequences < 1:
        raise ValueError(
            f"max_new_tokens and num_return_sequences must be >= 1, got {max_new_tokens}, {num_return_sequences}"
        )
    options: dict[str, Any] = dict(
        max_new_tokens=int(max_new_tokens),
        eos_token_id=list(stop),
        pad_token_id=pad_token_id,
        num_return_sequences=int(num_return_sequences),
        do_sample=bool(do_sample),
    )
    if banned:
        options["bad_words_ids"] = [list(ids) for ids in banned]
    if stop_strings:
        options.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    if do_sample:
        options.update(temperature=float(temperature), top_k=int(top_k), top_p=1.0)
    else:
        options.update(temperature=None, top_k=None, top_p=None)
    return {**options, **(overrides or {})}


def generated_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    batch: Mapping[str, torch.Tensor],
    options: Mapping[str, Any],
    *,
    seed: int | None,
    device: torch.device,
) -> list[list[str]]:
    """``model.generate(**batch, **options)`` decoded: one list of ``options['num_return_sequences']`` texts per
    row of ``batch``. With a ``seed`` the sampling is seeded without touching the caller's random state, so an
    answer does not depend on what was generated before it."""
    devices = [device] if device.type == "cuda" else []
    with torch.inference_mode(), torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(int(seed))
        output = model.generate(**batch, **options)
    texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    n = int(options["num_return_sequences"])
    return [texts[i * n : (i + 1) * n] for i in range(batch["input_ids"].shape[0])]
