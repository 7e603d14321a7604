"""One bad item does not fail its batch neighbours; results come back in the caller's order."""

from caslie_core.models.batching import error_text, run_batched


def test_bad_item_is_isolated_and_order_kept():
    calls = []

    def run(chunk):
        calls.append(list(chunk))
        if "bad" in chunk:
            raise ValueError("no")
        return [x.upper() for x in chunk]

    items = ["ccc", "bad", "a", "bb"]
    out = run_batched(items, 2, run, lambda e: f"ERR {error_text(e)}", sort_key=len)
    assert out == ["CCC", "ERR ValueError: no", "A", "BB"]
    assert calls[0] == ["a", "bb"]  # sorted by length: fewer padding tokens per batch
    assert ["bad"] in calls and ["ccc"] in calls  # the failing batch was retried item by item


def test_short_result_counts_as_failure():
    out = run_batched([1, 2], 2, lambda chunk: [0] if len(chunk) > 1 else [chunk[0] * 10], lambda e: None)
    assert out == [10, 20]
