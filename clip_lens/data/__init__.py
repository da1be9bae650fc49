"""Datasets for the studies: VALSE (existence rephrasing, images, aligned positions), CANNOT, and
minimal pairs from any VALSE piece or a user's file."""

from clip_lens.data.cannot import NegatorPairs, load_cannot, load_spacy, no_determiner_pairs
from clip_lens.data.pairs import (
    VALSE_PIECES,
    MinimalPairs,
    cannot_pairs,
    check_pairs,
    load_valse_pieces,
    read_pairs_file,
    refuse_if_none_kept,
    valse_existence_pairs,
    valse_pairs,
)
from clip_lens.data.valse import (
    ALIGNED_SLOTS,
    ExistencePairs,
    ResolvedImages,
    align_positions,
    load_valse,
    prepare_existence,
    rephrase_non_negated,
    resolve_images,
    weighted_slot_mean,
)

__all__ = [
    "ALIGNED_SLOTS",
    "MinimalPairs",
    "VALSE_PIECES",
    "cannot_pairs",
    "check_pairs",
    "load_valse_pieces",
    "read_pairs_file",
    "refuse_if_none_kept",
    "valse_existence_pairs",
    "valse_pairs",
    "ExistencePairs",
    "NegatorPairs",
    "ResolvedImages",
    "align_positions",
    "load_cannot",
    "load_spacy",
    "load_valse",
    "no_determiner_pairs",
    "prepare_existence",
    "rephrase_non_negated",
    "resolve_images",
    "weighted_slot_mean",
]
