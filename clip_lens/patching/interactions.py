"""How much a joint intervention differs from its members made one at a time
(docs/methods.md#joint-interventions-and-their-interaction).

    table = clip_lens.interaction_table(model, target=plain, source=negated, image=images,
                                        groups=[(3, 5)], along="position", layers="all")

One `patch` call runs every group and every member of a group, on the same cached runs; the
table then sets each group's effect beside the sum of its members' effects.
"""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd

from clip_lens.model import HookedCLIP
from clip_lens.patching.engine import patch
from clip_lens.patching.result import PatchResult

ALONG = {"position": "positions", "layer": "layers"}
COLUMNS = ["joint", "alone", "interaction", "baseline"]  # and source_baseline where the result has one


def interaction_table(model: HookedCLIP, *, groups: Sequence[tuple], along: str = "position",
                      **patch_kwargs: Any) -> pd.DataFrame:
    """Each group's joint effect, the sum of its members' single effects, and their difference.

    Args:
        model: a HookedCLIP.
        groups: tuples of positions (along="position") or of layers (along="layer"), each one
            joint intervention, e.g. [(3, 5), (3, 6)].
        along: "position" or "layer": what the groups are made of. The other axis comes from
            `patch_kwargs` as usual ("layers" / "positions"), one row of the table each.
        **patch_kwargs: `clip_lens.patch`'s arguments (target, source, image or text, hook,
            intervention, heads / neurons / sae with latents, metric, ...), method "exact".

    Returns:
        One row per pair x (layer | position) x (unit) x group: the group's label, `joint` =
        metric(group) - metric(clean), `alone` = the sum over its members of metric(member) -
        metric(clean), `interaction` = joint - alone, the clean run's `baseline` (and with
        intervention="patch" the source run's `source_baseline`). Cells whose
        group lies past a pair's last token are left out (as in `PatchResult.to_frame`).
    """
    if along not in ALONG:
        raise ValueError(f"along={along!r}: use 'position' (groups of positions) or 'layer' (groups of layers)")
    axis = ALONG[along]
    if axis in patch_kwargs:
        raise ValueError(f"{axis}= is given by groups= when along={along!r}; leave it out")
    if patch_kwargs.get("metric") == "embedding" or patch_kwargs.get("method", "exact") != "exact":
        raise ValueError("an interaction table needs a scalar metric and method='exact'")
    group_list = _checked_groups(groups, along)
    members = sorted({member for group in group_list for member in group})
    result = patch(model, **{axis: members + group_list}, **patch_kwargs)
    return interactions(result, along=along)


def _checked_groups(groups: Sequence[tuple], along: str) -> list[tuple]:
    """`groups` as tuples of at least two members (`patch` checks each member against the tower)."""
    if isinstance(groups, (str, int)) or not groups:
        raise ValueError(f"groups={groups!r}: give a list of tuples of {along}s, e.g. [(3, 5)]")
    for group in groups:
        if not isinstance(group, (tuple, list)) or len(group) < 2:
            raise ValueError(f"group {group!r}: a joint intervention is a tuple of at least two {along}s")
    return [tuple(group) for group in groups]


def interactions(result: PatchResult, *, along: str) -> pd.DataFrame:
    """The table of `interaction_table` from a result whose `along` axis ("position" or "layer")
    holds each group (a tuple) and each of its members (single labels)."""
    frame = result.to_frame()
    frame["change"] = frame["metric"] - frame["baseline"]
    keys = ["pair"] + [d for d in result.dims if d not in ("pair", along)]
    is_group = frame[along].map(lambda label: isinstance(label, tuple))
    rows = frame[is_group].reset_index(drop=True).rename(columns={along: "group", "change": "joint"})
    singles = frame[~is_group].rename(columns={along: "member", "change": "alone"})[keys + ["member", "alone"]]
    members = rows[keys + ["group"]].assign(row=rows.index, member=rows["group"].map(list)).explode("member")
    found = members.merge(singles, on=keys + ["member"], how="left")
    if found["alone"].isna().any():
        missing = found.loc[found["alone"].isna(), "member"].iloc[0]
        raise ValueError(f"{along} {missing!r} of a group has no single intervention in the result")
    rows["alone"] = found.groupby("row")["alone"].sum()
    rows["interaction"] = rows["joint"] - rows["alone"]
    return rows[keys + ["group", *COLUMNS] + (["source_baseline"] if "source_baseline" in rows else [])]
