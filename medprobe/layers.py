"""Layer names and the authors' layer numbering.

Our layers are named after transformers' ``hidden_states`` tuple: ``hidden.i`` is ``hidden_states[i]``
(``hidden.0`` the embedding output), ``image_embeds`` a model's projected image embedding.

The authors' code (github.com/peterhan91/Multimodal-Probes) saves ``hidden_states[1:]`` as one file per layer,
``{name}.{lix}.pt`` with ``lix = i - 1``, and loads layer ``k`` as ``sorted(glob("*.pt"))[k]``: position ``k``
in the *text-sorted* list ``x.0.pt, x.1.pt, x.10.pt, x.11.pt, ...``. So the paper's "layer 32" of the 80-layer
model is the file ``x.38.pt`` = ``hidden_states[39]`` (``hidden.33`` if the index had meant file number 32),
and their per-layer curves run in that text-sorted order. ``authors:k`` in the config names such an index.
"""

from __future__ import annotations

import re
from typing import Sequence

EMBEDDINGS_LAYER = "image_embeds"
_HIDDEN = re.compile(r"^hidden\.(\d+)$")
_AUTHORS = re.compile(r"^authors:(\d+)$")


def authors_file_order(n_files: int) -> list[int]:
    """File numbers ``lix`` (0 … n_files - 1) in the order ``sorted(glob("x.*.pt"))`` lists them."""
    if n_files < 1:
        raise ValueError(f"the authors' layer files need n_files >= 1, got {n_files}")
    names = sorted(f"x.{lix}.pt" for lix in range(n_files))
    return [int(name.split(".")[1]) for name in names]


def authors_to_hidden(index: int, n_files: int) -> int:
    """``hidden_states`` index of the authors' layer index ``index`` (position in the text-sorted file list)."""
    order = authors_file_order(n_files)
    if not 0 <= index < n_files:
        raise ValueError(
            f"authors' layer index {index} is out of range: the model has {n_files} layer files "
            f"(hidden_states[1:]), indices 0 to {n_files - 1}"
        )
    return order[index] + 1


def hidden_to_authors(hidden: int, n_files: int) -> int | None:
    """The authors' layer index of ``hidden_states[hidden]``; None for the embedding output (never saved)."""
    if hidden < 1 or hidden > n_files:
        return None
    return authors_file_order(n_files).index(hidden - 1)


def hidden_index(name: str) -> int | None:
    """``i`` of a layer named ``hidden.i``; None for other names (``image_embeds``)."""
    match = _HIDDEN.match(str(name))
    return int(match.group(1)) if match else None


def layer_files(layer_names: Sequence[str], num_hidden_states: int | None = None) -> int:
    """How many layer files the authors' code would have saved for this model: ``num_hidden_states - 1``.

    ``num_hidden_states`` is the activations file's attribute of that name; files written without it
    (every layer stored) give the deepest stored ``hidden.i`` instead.
    """
    if num_hidden_states is not None:
        return int(num_hidden_states) - 1
    indices = [index for index in map(hidden_index, layer_names) if index is not None]
    if not indices:
        raise ValueError(f"no hidden.i layer among {list(layer_names)}: the authors' layer numbering does not apply")
    return max(indices)


def authors_labels(layer_names: Sequence[str], num_hidden_states: int | None = None) -> list[int | None]:
    """The authors' index of every layer name (None for ``hidden.0`` and ``image_embeds``)."""
    if not any(hidden_index(name) for name in layer_names):
        return [None] * len(layer_names)
    n_files = layer_files(layer_names, num_hidden_states)
    return [
        None if hidden_index(name) is None else hidden_to_authors(hidden_index(name), n_files) for name in layer_names
    ]


def resolve_layer(
    layer: int | str, layer_names: Sequence[str], source: str, num_hidden_states: int | None = None
) -> str:
    """The stored layer name a config value means: ``i`` or ``hidden.i``, ``image_embeds``, or ``authors:k``.

    ``source`` names the activations file in the error raised when the layer is not stored there.
    """
    if isinstance(layer, bool):
        raise ValueError(f"layer {layer!r} is not a layer: use an index, hidden.i, image_embeds or authors:k")
    text = str(layer)
    authors = _AUTHORS.match(text)
    if authors:
        n_files = layer_files(layer_names, num_hidden_states)
        name = f"hidden.{authors_to_hidden(int(authors.group(1)), n_files)}"
    elif text.isdigit():
        name = f"hidden.{text}"
    else:
        name = text
    if name not in layer_names:
        meaning = f" ({text} = {name})" if name != text else ""
        raise ValueError(
            f"layer {text!r}{meaning} is not in activations file {source}; stored layers: {list(layer_names)}"
        )
    return name
