"""Helpers of the decoding tests."""


class Counter:
    """Counts model calls with a forward hook (independent of the decoder's own count)."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_hook(self)

    def __call__(self, *args):
        self.calls += 1

    def reset(self):
        self.calls = 0
