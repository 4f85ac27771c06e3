"""What the churn and fault tests check after a run: no sequence holds any KV any more."""
from runtime.attention import AttentionMode, DenseAttention
from runtime.herald import HeraldAttention


def _dense_slots(mode: DenseAttention, slots: int, name: str) -> list[str]:
    problems = []
    if mode.slot_of:
        problems.append(f"{name}: KV slots still taken by sequences {sorted(mode.slot_of)}")
    if sorted(mode.free_slots) != list(range(slots)):
        problems.append(f"{name}: the free slots are {sorted(mode.free_slots)}, not 0..{slots - 1} once each")
    return problems


def still_held(attention: AttentionMode, slots: int) -> list[str]:
    """What `attention` (sized for `slots` sequences) still holds: empty when every KV slot, host
    page, row and cache partition is free again, as the mode's own `occupancy()` must say too."""
    if isinstance(attention, HeraldAttention):
        problems = []
        if attention.store.used_pages or attention.store.sequences:
            problems.append(f"herald: {attention.store.used_pages} host pages still used by "
                            f"{attention.store.sequences}")
        if attention.row_of or sorted(attention._free_rows) != list(range(slots)):
            problems.append(f"herald: rows {attention.row_of} taken, free rows {sorted(attention._free_rows)}")
        held = int((attention.fetcher.directory.held != -1).sum())
        if held:
            problems.append(f"herald: {held} cache partition slots still hold pages")
        if attention.dense is not None:
            problems += _dense_slots(attention.dense, slots, "herald dense layers")
    else:
        problems = _dense_slots(attention, slots, attention.name)
    occupied = {name: count for name, count in attention.occupancy().items() if count}
    if occupied:
        problems.append(f"occupancy() reports {occupied}")
    return problems


def assert_released(attention: AttentionMode, slots: int) -> None:
    problems = still_held(attention, slots)
    assert not problems, "; ".join(problems)
