"""Errors a user can act on: each names the file (and tensor) and says what to do."""


class ModelFileError(ValueError):
    """A model file the pack refuses to load, or can no longer read."""

    def __init__(self, path, problem, hint=None, tensor=None):
        self.path = str(path)
        self.tensor = tensor
        self.problem = problem
        self.hint = hint
        where = f"{self.path}" + (f", tensor '{tensor}'" if tensor else "")
        msg = f"{where}: {problem}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)


class SafetensorsError(ModelFileError):
    pass


class GGUFError(ModelFileError):
    pass


class NF4Error(ModelFileError):
    pass


class FileChangedError(ModelFileError):
    """The file under a live mapping was truncated, replaced or deleted."""


class QuantError(ModelFileError):
    """A quantized layer (scaled fp8, ComfyUI ``comfy_quant``) the pack cannot load as stored."""
