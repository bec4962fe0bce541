"""Long loader work (NF4 quantize on load) reports through ComfyUI's progress bar and stops
when the user interrupts. The runtime and format layers take a plain ``progress(done, total)``
callback and know nothing of ComfyUI; this module makes the one ComfyUI's UI understands."""


def comfy_progress():
    """``progress(done, total)``: raises ComfyUI's InterruptProcessingException when the user
    interrupted (checked first, so an interrupt stops the work at the next step), else moves
    a ``comfy.utils.ProgressBar`` (made on the first call, for the running node)."""
    import comfy.model_management as mm
    import comfy.utils

    bar = None

    def progress(done, total):
        nonlocal bar
        mm.throw_exception_if_processing_interrupted()
        if bar is None:
            bar = comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)

    return progress
