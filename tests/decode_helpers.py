"""Helpers of the decoding tests."""


class Counter:
    """Counts model calls with a forward hook (independent of the decoder's own count), and
    keeps the (rows, columns) of each call's logits in `shapes`."""

    def __init__(self, model):
        self.calls = 0
        self.shapes: list[tuple[int, int]] = []
        self.handle = model.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.calls += 1
        logits = getattr(output, "logits", None)
        if logits is not None:
            self.shapes.append(tuple(logits.shape[:2]))

    def reset(self):
        self.calls = 0
        self.shapes = []
