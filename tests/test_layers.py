"""The authors' layer numbering (text-sorted per-layer files) against a direct simulation of their code."""

import glob
import os

import pytest

from medprobe.layers import (
    authors_file_order,
    authors_labels,
    authors_to_hidden,
    hidden_to_authors,
    layer_files,
    resolve_layer,
)


def _authors_sorted_files(tmp_path, n_files):
    """What `sorted(glob("*.pt"))` returns for the files activation.py writes (x.{lix}.pt, lix over hidden_states[1:])."""
    for lix in range(n_files):
        (tmp_path / f"x.{lix}.pt").write_bytes(b"")
    return [os.path.basename(path) for path in sorted(glob.glob(str(tmp_path / "*.pt")))]


@pytest.mark.parametrize("n_files", [80, 32, 12])
def test_mapping_matches_a_glob_of_real_files(tmp_path, n_files):
    files = _authors_sorted_files(tmp_path, n_files)
    for index, name in enumerate(files):
        lix = int(name.split(".")[1])
        assert authors_to_hidden(index, n_files) == lix + 1
        assert hidden_to_authors(lix + 1, n_files) == index


def test_the_papers_layer_32_of_the_80_layer_model():
    assert authors_to_hidden(32, 80) == 39
    assert hidden_to_authors(33, 80) == 26  # hidden.33 is "file number 32"
    assert authors_file_order(80)[:4] == [0, 1, 10, 11]


def test_index_32_does_not_exist_for_32_files():
    with pytest.raises(ValueError, match="out of range.*32 layer files"):
        authors_to_hidden(32, 32)


def test_resolve_layer_forms():
    names = [f"hidden.{i}" for i in range(81)]
    assert resolve_layer("authors:32", names, "a.h5") == "hidden.39"
    assert resolve_layer(32, names, "a.h5") == "hidden.32"
    assert resolve_layer("hidden.33", names, "a.h5") == "hidden.33"
    with pytest.raises(ValueError, match="image_embeds.*a.h5"):
        resolve_layer("image_embeds", names, "a.h5")


def test_subset_of_layers_needs_num_hidden_states():
    stored = ["hidden.0", "hidden.39", "hidden.80"]
    assert layer_files(stored, 81) == 80
    assert resolve_layer("authors:32", stored, "a.h5", num_hidden_states=81) == "hidden.39"
    assert authors_labels(stored, 81) == [None, 32, hidden_to_authors(80, 80)]
    assert authors_labels(["image_embeds"]) == [None]
