"""LiveTensorTracker counts each live storage once, from its creation to its real free."""

import torch

from memory.tracker import LiveTensorTracker


def test_counts_allocations_views_and_frees_exactly():
    with LiveTensorTracker("cpu") as t:
        a = torch.empty(1000, dtype=torch.float32)
        assert t.current == 4000
        v = a.view(10, 100)[2:5]  # a view shares the storage: nothing new
        a.add_(1.0)  # in place: nothing new
        assert t.current == 4000
        b = a * 2
        assert t.current == 8000 and t.peak == 8000
        del a
        assert t.current == 8000  # the view keeps the storage alive
        del v
        assert t.current == 4000
        del b
    assert t.current == 0 and t.peak == 8000


def test_views_of_tensors_that_predate_the_tracker_are_not_counted():
    w = torch.randn(64, 64)  # a "parameter" made before tracking
    with LiveTensorTracker("cpu") as t:
        wt = w.t()
        x = torch.randn(8, 64)
        y = x @ wt
        assert t.current == 8 * 64 * 4 * 2  # the input and the output, not w
        del x, y, wt
    t2 = LiveTensorTracker("cpu")
    with t2:
        t2.track([w])
        assert t2.current == 64 * 64 * 4
        _ = w.t().contiguous()  # a real copy
        assert t2.peak == 2 * 64 * 64 * 4


def test_saved_tensors_live_until_backward_frees_them():
    x = torch.randn(256, requires_grad=True)
    with LiveTensorTracker("cpu") as t:
        y = x.exp()  # saves its result for backward
        s = y.sum()
        del y
        assert t.current >= 256 * 4  # still held by the autograd graph
        s.backward()
        del s
        grad_bytes = 256 * 4  # x.grad
        assert t.current == grad_bytes
    assert x.grad is not None


def test_meta_tensors_are_counted_like_real_ones_and_tags_attribute_bytes():
    with LiveTensorTracker("meta", record=True) as t:
        a = torch.empty(100, device="meta", dtype=torch.bfloat16)
        with t.tagged("logits"):
            b = torch.empty(50, device="meta")
        t.mark("here")
        assert t.bytes_by_tag() == {"other": 200, "logits": 200}
        del a, b
    assert t.current == 0
    assert [e.marker for e in t.events if e.marker] == ["here"]
    assert sum(e.nbytes for e in t.events) == 0
