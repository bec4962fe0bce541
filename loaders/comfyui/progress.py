"""Long loader work reports through ComfyUI's progress bar and stops when the user interrupts:
NF4 quantize on load, and the loads that copy or dequantize weights (the checkpoint loaders'
VAE, a GGUF text encoder's token tables). The runtime and format layers take a plain
``progress(done, total)`` callback and know nothing of ComfyUI; this module makes the one
ComfyUI's UI understands."""

# Bar updates a run sends at most (plus the first and the last): ComfyUI 0.3.x sends every
# update to the browser, and a load counts thousands of tensors.
BAR_STEPS = 200


def comfy_progress():
    """``progress(done, total)``: raises ComfyUI's InterruptProcessingException when the user
    interrupted (checked at every call, first, so an interrupt stops the work at the next
    step), else moves a ``comfy.utils.ProgressBar`` (made on the first call, for the running
    node; updated at most BAR_STEPS times between the first and the last step)."""
    import comfy.model_management as mm
    import comfy.utils

    bar = None
    sent = None

    def progress(done, total):
        nonlocal bar, sent
        mm.throw_exception_if_processing_interrupted()
        if bar is None:
            bar = comfy.utils.ProgressBar(total)
        if sent is None or done >= total or (done - sent) * BAR_STEPS >= total:
            sent = done
            bar.update_absolute(done, total)

    return progress


def load_progress(progress, total):
    """A ``LoadProgress`` over ``total`` parameters reporting to ``progress`` (default: ComfyUI's
    bar and interrupt), already started (it reported 0, and raised if interrupted)."""
    from ..runtime.progress import LoadProgress

    p = LoadProgress(progress or comfy_progress(), total)
    p.start()
    return p
