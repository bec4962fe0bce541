"""Progress of a model load, counted in parameters (weight elements), for any ``progress(done,
total)`` callback: loaders/comfyui/progress.py makes the one that drives ComfyUI's progress
bar and raises when the user interrupts. Knows nothing of ComfyUI.

The callback may raise to stop the load. Loaders call it only before anything is reserved or
pinned (``LoadProgress.finish`` is their last call before the VBARs are made), so stopping
leaves nothing behind but garbage for the collector.
"""
import contextlib
import threading
import weakref

import torch


def parameters(tensors):
    """The number of elements of ``tensors`` (a state dict's values): a load's total."""
    return sum(t.numel() for t in tensors if isinstance(t, torch.Tensor))


class LoadProgress:
    """Counts parameters done toward ``total`` and reports each step to ``report``.

    ``done`` is clamped to ``total``: a step list estimated from a file (ComfyUI may drop
    keys or fill missing ones) never reports past the end before ``finish``."""

    def __init__(self, report, total):
        self.report = report
        self.total = max(int(total), 1)
        self.done = 0

    def start(self):
        self.report(0, self.total)

    def add(self, n):
        if n <= 0:
            return
        self.done += int(n)
        self.report(min(self.done, self.total), self.total)

    def extend(self, n):
        """More work found on the way (e.g. tables to convert once the model is built)."""
        self.total += max(int(n), 0)

    def finish(self):
        """The last step (and the last chance to stop) before the caller builds VBARs."""
        self.done = self.total
        self.report(self.total, self.total)


def _own_parameters(module):
    n = sum(p.numel() for p in module._parameters.values() if p is not None)
    skip = module._non_persistent_buffers_set
    return n + sum(b.numel() for k, b in module._buffers.items() if b is not None and k not in skip)


@contextlib.contextmanager
def module_loads(add):
    """While inside: every module *constructed* in this thread reports, after its
    ``load_state_dict`` pass, the elements of its own parameters and persistent buffers to
    ``add(n)`` (modules with none report nothing).

    This reaches into loads that happen inside code we do not own (ComfyUI builds a model,
    then copies the file's tensors into it): torch's global module-registration hook marks
    each new submodule with a load-state-dict post-hook. Every hook is removed on the way out,
    so a later ``load_state_dict`` of the same modules reports nothing. ``add`` may raise; the
    exception leaves ``load_state_dict`` (and the build) at once. ``add=None``: a no-op."""
    register = getattr(torch.nn.modules.module, "register_module_module_registration_hook", None)
    if add is None or register is None:
        yield
        return
    thread = threading.get_ident()
    seen = weakref.WeakSet()
    handles = []

    def loaded(module, incompatible_keys):
        n = _own_parameters(module)
        if n:               # containers hold nothing of their own: no step
            add(n)

    def registered(parent, name, child):
        if child is None or threading.get_ident() != thread or child in seen:
            return None
        seen.add(child)
        handles.append(child.register_load_state_dict_post_hook(loaded))
        return None

    outer = register(registered)
    try:
        yield
    finally:
        outer.remove()
        for h in handles:
            h.remove()
