"""Datasets for the studies: VALSE (existence rephrasing), later CANNOT and minimal pairs."""

from clip_lens.data.valse import ExistencePairs, load_valse, prepare_existence, rephrase_non_negated

__all__ = ["ExistencePairs", "load_valse", "prepare_existence", "rephrase_non_negated"]
