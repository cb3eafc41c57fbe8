from pipeline.backends.torch_backend.backend import TorchBackend

__all__ = ["TorchBackend"]
